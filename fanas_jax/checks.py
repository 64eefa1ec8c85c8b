"""Small config checks that several components share; each raises ConfigError with
one line naming the key."""
from __future__ import annotations

from typing import Any, Iterable

from fanas_jax import parallel
from fanas_jax.data import datasets, transforms
from fanas_jax.genotype import NETWORK_REDUCTION
from fanas_jax.ops.layers import OPS, STEMS
from fanas_jax.registry import ConfigError


def check_choice(value: Any, choices: Iterable[Any], key: str) -> None:
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}.")


def check_batch(value: int, key: str, num_devices: int) -> None:
  """Positive and split evenly over the mesh's devices and the processes."""
  if value <= 0:
    raise ConfigError(f"{key}={value} must be positive.")
  try:
    parallel.check_batch_size(value, key, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_epochs(value: int, key: str) -> None:
  if value < 1:
    raise ConfigError(f"{key}={value} must be at least 1.")


def check_width(width: int, ops: Iterable[str], key: str) -> None:
  """Each bottleneck runs its op on width/2 channels split into heads."""
  channels = width // 2
  for op in sorted(ops):
    heads = OPS.get(op).num_heads
    if width % 2 or channels % heads or channels % 2:
      raise ConfigError(
          f"{key}={width} cannot hold op {op}: its {channels} op channels must be even and "
          f"divisible by {heads} heads; use a multiple of {2 * max(heads, 2)}.")


def input_reduction(config: Any) -> int:
  """Image pixels per pixel of the last feature map, per side (stem and stages)."""
  return STEMS.get(config.model.stem, key="model.stem").reduction * NETWORK_REDUCTION


def check_stage_data(config: Any, stage: str, splits: Iterable[str],
                     evaluates: bool) -> datasets.DatasetSpec:
  """The stage's dataset (exists, has `splits`, is prepared) and its preprocessing
  keys (and the evaluation ones if it `evaluates`); returns the dataset's spec."""
  try:
    spec = datasets.check_stage_data(config, stage, tuple(splits))
    transforms.check_stage(config[stage], stage, config.image_size, spec, evaluates)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return spec
