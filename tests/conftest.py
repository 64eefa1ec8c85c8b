"""Test-session setup: repo root importable (for tests.*), data in temp dirs, and an
XLA compilation cache kept between sessions."""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def temp_dir(prefix: str) -> str:
  """A new temp dir that this process (the one that made it) removes at exit."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


# Never touch the user's ~/tensorflow_datasets; each session builds its own copy (xdist's
# workers inherit it).
if "TFDS_DATA_DIR" not in os.environ:
  os.environ["TFDS_DATA_DIR"] = temp_dir("fanas_tfds_")


def xla_cache_dir() -> str:
  """The tests' own XLA compilation cache: $FANAS_TEST_XLA_CACHE, or
  $XDG_CACHE_HOME (or ~/.cache)/fanas_jax/xla-tests; 'fresh' = a new temp dir.

  Kept between sessions, and shared by a session's processes (xdist workers and the
  runs they start), so a program compiles once per machine and jax version. An
  entry's key hashes the program, the compile options and the jax and XLA versions,
  so a changed program never reads a stale entry. Not the user's own cache.
  """
  path = os.environ.get("FANAS_TEST_XLA_CACHE", "")
  if path == "fresh":
    return temp_dir("fanas_xla_")
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return path or os.path.join(base, "fanas_jax", "xla-tests")


def prune(directory: str, max_bytes: int, keep_bytes: int) -> None:
  """Oldest entries first, down to keep_bytes, once the cache passes max_bytes."""
  if not os.path.isdir(directory):
    return
  entries = [e for e in os.scandir(directory) if e.is_file()]
  total = sum(e.stat().st_size for e in entries)
  if total <= max_bytes:
    return
  for entry in sorted(entries, key=lambda e: e.stat().st_mtime):
    if total <= keep_bytes:
      break
    total -= entry.stat().st_size
    os.remove(entry.path)


# A directory the user names in JAX_COMPILATION_CACHE_DIR is used as it is, never pruned.
PRUNE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if PRUNE:   # (xdist's workers inherit the session's directory)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = xla_cache_dir()
# Sub-second programs too (as fanas_jax.compile_cache keeps them): every process of a
# session initialises networks from the same few hundred tiny programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config):
  """`-m "not slow"` leaves out what runs whole stages or fresh processes of JAX."""
  if PRUNE and not hasattr(config, "workerinput"):  # Once, before the xdist workers.
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
    prune(os.environ["JAX_COMPILATION_CACHE_DIR"], 4 << 30, 2 << 30)
  config.addinivalue_line(
      "markers", "slow: runs pipeline stages or subprocesses (minutes on a CPU)")
  if os.environ.get("FANAS_TEST_COMPILE_REPORT"):  # where each test's compile time goes
    from tests.compile_report import Report
    config.pluginmanager.register(Report(os.environ["FANAS_TEST_COMPILE_REPORT"],
                                         first=not hasattr(config, "workerinput")))


def pytest_collection_finish(session):
  """Each test process (every xdist worker) collects garbage as the command line does,
  once the test modules, and jax with them, are imported (fanas_jax/host.py)."""
  from fanas_jax import host
  host.collect_garbage_less_often()
