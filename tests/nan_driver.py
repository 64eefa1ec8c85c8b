"""`python -m fanas_jax.main` with one poisoned training batch, for tests/test_faults.py.

Batch number $FANAS_TEST_NAN_BATCH (1-based, counted along each training stream) of
every training iterator gets a NaN pixel, so that step's loss is NaN: the command
runs with a Builder whose training iterators are wrapped. The wrapper is
checkpointable like the grain iterator it wraps, so a resumed or rolled-back run
poisons the same batch again.

  FANAS_TEST_NAN_BATCH=5 python -m tests.nan_driver --config=... --workdir=...
"""
import functools
import os
from typing import Any

from absl import app
import numpy as np

from fanas_jax import main
from fanas_jax.builders import Builder


class NanAtBatch:
  def __init__(self, inner: Any, bad: int):
    self.inner, self.bad, self.consumed = inner, bad, 0

  def __iter__(self) -> "NanAtBatch":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.inner)
    self.consumed += 1
    if self.consumed == self.bad:
      image = np.array(batch["image"], copy=True)
      image[0, 0, 0, 0] = np.nan
      batch = dict(batch, image=image)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"inner": self.inner.get_state(), "consumed": self.consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    self.inner.set_state(state["inner"])
    self.consumed = state["consumed"]


class PoisonedBuilder(Builder):
  """Every training iterator it makes poisons batch $FANAS_TEST_NAN_BATCH."""

  def train_iterator(self, stage: str, ds: Any, seed: int) -> NanAtBatch:
    return NanAtBatch(super().train_iterator(stage, ds, seed),
                      int(os.environ["FANAS_TEST_NAN_BATCH"]))


if __name__ == "__main__":
  app.run(functools.partial(main.main, builder=PoisonedBuilder),
          flags_parser=main.parse_flags)
