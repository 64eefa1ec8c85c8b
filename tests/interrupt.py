"""A run killed in-process at a chosen point, for the resume tests."""
from __future__ import annotations

from fanas_jax.builders import Builder
from fanas_jax.logging_utils import MetricWriter


def builder_dying_after_epoch(epoch: int) -> type[Builder]:
  """A Builder whose metric writers raise KeyboardInterrupt right after writing epoch
  `epoch`'s record, before that epoch's checkpoint is saved."""

  class DyingWriter(MetricWriter):
    def write(self, step, metrics):
      super().write(step, metrics)
      if metrics.get("epoch") == epoch:
        raise KeyboardInterrupt("simulated kill")

  class DyingBuilder(Builder):
    def writer(self, stage, purge_step=None):
      return DyingWriter(self.workdir, stage, purge_step=purge_step)

  return DyingBuilder
