"""The persistent XLA compilation cache: where it lives, what it reuses, what it refuses."""
import os

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import numpy as np
import pytest

from fanas_jax.configs import quickstart
from fanas_jax import compile_cache, config_checks


@pytest.fixture
def restore_cache():
  """Puts the session's cache settings back after a test that moves the cache."""
  directory = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  yield
  jax_cache.reset_cache()
  jax_cache.set_cache_dir(directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.directory("default") == str(tmp_path / "jax")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.directory("default") == str(tmp_path / "xdg" / "fanas_jax" / "xla")
  assert compile_cache.directory("off") is None
  assert compile_cache.directory("rel/dir") == os.path.abspath("rel/dir")


def test_bad_values_are_refused_by_the_config_check(tmp_path):
  config = quickstart.get_config("tiny")
  config.compile_cache = ""
  with pytest.raises(config_checks.ConfigError, match="compile_cache='' must be 'default'"):
    config_checks.validate(config)
  (tmp_path / "file").write_text("")
  config.compile_cache = str(tmp_path / "file")
  with pytest.raises(config_checks.ConfigError, match="is a file, not a directory"):
    config_checks.validate(config)


def _compile(fn, *args):
  with compile_cache.counting_hits() as hits:
    compiled = jax.jit(fn).lower(*args).compile()
  return compiled, len(hits)


def _entries(directory, name):
  return sorted(n for n in os.listdir(directory) if n.startswith(f"jit_{name}-") and n.endswith("-cache"))


def step(w, x, key):
  return jnp.tanh(x @ w) + jax.random.normal(key, x.shape)


def changed(w, x, key):
  return jnp.tanh(x @ w) - jax.random.normal(key, x.shape)


def test_same_program_with_new_values_is_read_back_and_a_changed_one_is_not(
    tmp_path, restore_cache):
  keys = jax.random.key(0), jax.random.key(1)
  w, x = np.ones((8, 8), np.float32), np.ones((4, 8), np.float32)
  assert compile_cache.enable(str(tmp_path)) == str(tmp_path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  first, hits = _compile(step, w, x, keys[0])
  assert hits == 0 and len(_entries(tmp_path, "step")) == 1
  jax.clear_caches()                       # Only the files remain.
  again, hits = _compile(step, 2 * w, x - 1, keys[1])  # a new seed and new data
  assert hits == 1 and len(_entries(tmp_path, "step")) == 1
  args = (2 * w, x - 1, keys[1])
  np.testing.assert_array_equal(again(*args), first(*args))
  _, hits = _compile(changed, w, x, keys[0])
  assert hits == 0 and len(_entries(tmp_path, "changed")) == 1


def test_off_writes_nothing(tmp_path, restore_cache, monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
  assert compile_cache.enable("off") is None
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  _, hits = _compile(step, np.ones((8, 8), np.float32), np.ones((4, 8), np.float32),
                     jax.random.key(2))
  assert hits == 0 and _entries(tmp_path, "step") == []
