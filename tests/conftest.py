"""Test-session setup: repo root importable (for tests.*), data and the XLA
compilation cache in temp dirs."""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Never touch the user's ~/tensorflow_datasets; each session builds its own copy.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="fanas_tfds_"))
# Nor the user's XLA compilation cache: the session's processes (xdist workers and the
# runs they start) share one of their own, so a program compiles once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fanas_xla_"))


def pytest_configure(config):
  """`-m "not slow"` leaves out what runs whole stages or fresh processes of JAX."""
  config.addinivalue_line(
      "markers", "slow: runs pipeline stages or subprocesses (minutes on a CPU)")
