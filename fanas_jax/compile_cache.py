"""The persistent XLA compilation cache: reruns, resumed runs and new seeds reuse
compiled steps instead of spending minutes in XLA again.

`config.compile_cache` is 'default' (on, in the user's cache directory), 'off', or a
directory. An entry's key is a hash of the program (debug info stripped), the jax and
XLA versions, the compile options and the devices, so a changed program never reads
a stale entry, and a run that differs only in its seed or its data (both are inputs
of the compiled step, never constants in it) reads the entry of the first.

No size limit is set: jax's size limit keeps per-entry access-time files, and a
directory that other jax programs also write (without them) would then refuse every
new entry. Concurrent processes are safe without it: only process 0 of a job writes,
and a reader that meets a half-written entry compiles instead (with a warning).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

CHOICES = ("default", "off")
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Every compilation is kept, also the sub-second ones (jax's own default keeps those
# over 1 s): initialising a supernet compiles ~160 tiny initializer programs, which
# from the cache take 7 s instead of 17 s on a 2-core CPU (1.1 MB of entries).
MIN_COMPILE_SECONDS = 0.0


def default_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME (or ~/.cache)/fanas_jax/xla."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(base, "fanas_jax", "xla")


def check_config(value: Any) -> None:
  """One line for a bad config.compile_cache, before anything compiles."""
  if not isinstance(value, str) or not value:
    raise ValueError(f"compile_cache={value!r} must be 'default', 'off' or a directory.")
  if value not in CHOICES and os.path.exists(value) and not os.path.isdir(value):
    raise ValueError(f"compile_cache={value!r} is a file, not a directory; use "
                     "'default', 'off' or a directory.")


def directory(value: str) -> str | None:
  """The cache directory config.compile_cache names, or None when it is off."""
  check_config(value)
  if value == "off":
    return None
  return default_dir() if value == "default" else os.path.abspath(value)


def enable(value: str) -> str | None:
  """Points this process's XLA compilation cache at `directory(value)` (or turns it
  off) and returns the directory. Takes effect for every later compilation, also
  when an earlier run in the same process used another directory."""
  path = directory(value)
  if path is not None:
    os.makedirs(path, exist_ok=True)
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path


@contextlib.contextmanager
def counting_hits() -> Iterator[list[str]]:
  """Collects one entry per executable read from the cache inside the block."""
  hits: list[str] = []

  def listen(event: str, **kwargs: Any) -> None:
    del kwargs
    if event == _HIT_EVENT:
      hits.append(event)

  jax.monitoring.register_event_listener(listen)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listen)
