"""Cost arithmetic (parameters and multiply-accumulates) shared by every module.

Each registered op and stem carries its own cost function (OpSpec.cost,
StemSpec.cost), built from these terms; fanas_jax.cost adds them up over a
network. MACs count only products; BatchNorm's scale and bias are parameters,
its running statistics are not.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cost:
  """Parameters and MACs of one part of a network."""
  params: int = 0
  macs: int = 0

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.params + other.params, self.macs + other.macs)


def conv_cost(in_channels: int, out_channels: int, out_pixels: int,
              kernel: int = 1, bias: bool = False) -> Cost:
  """A bias-free (by default) kernel x kernel conv or dense layer."""
  fan_in = kernel * kernel * in_channels
  return Cost(fan_in * out_channels + (out_channels if bias else 0),
              out_pixels * fan_in * out_channels)


def batch_norm_cost(channels: int, affine: bool = True) -> Cost:
  return Cost(params=2 * channels if affine else 0)
