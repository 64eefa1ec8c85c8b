"""The command line's process settings (fanas_jax/host.py)."""
import gc

from fanas_jax import host


def test_collect_garbage_less_often_freezes_what_is_loaded_and_keeps_a_higher_threshold():
  before = gc.get_threshold()
  try:
    gc.set_threshold(700, 10, 10)           # CPython 3.11's defaults
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    host.collect_garbage_less_often()
    assert gc.get_threshold() == (host.GC_GEN0_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 1000     # jax, numpy, this module ...
    gc.set_threshold(10 * host.GC_GEN0_THRESHOLD, 5, 5)   # a user's own, higher
    host.collect_garbage_less_often()
    assert gc.get_threshold() == (10 * host.GC_GEN0_THRESHOLD, 5, 5)
  finally:
    gc.set_threshold(*before)
  assert gc.isenabled()
