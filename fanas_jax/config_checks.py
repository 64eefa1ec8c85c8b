"""Checks a config before any compute, so a bad one fails with one clear line.

Each error names the config key, what was wrong and the valid choices.
"""
from __future__ import annotations

from typing import Any

import jax

from fanas_jax import parallel
from fanas_jax.cost import op_cost
from fanas_jax.data.datasets import DATASETS
from fanas_jax.derive import DERIVE_RULES
from fanas_jax.genotype import NAMED_GENOTYPES, search_space_from_config
from fanas_jax.model import DTYPES
from fanas_jax.objectives import OBJECTIVES
from fanas_jax.ops.attention import IMPLEMENTATIONS
from fanas_jax.ops.layers import OPS, STEMS

ALL_STAGES = ("search_phase1", "search_phase2", "derive", "train", "retrieval")
SEARCH_STAGES = ("search_phase1", "search_phase2")
# Two reduce stages halve the resolution twice; the CAR decoder also needs the
# stage-2 map to be at least 2x2.
NETWORK_REDUCTION = 4


class ConfigError(ValueError):
  """A config that cannot run; its message is the one line a user sees."""


def stages(config: Any) -> list[str]:
  names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  for name in names:
    if name not in ALL_STAGES:
      raise ConfigError(f"Unknown stage {name!r} in config key stages; valid choices: "
                        f"{', '.join(ALL_STAGES)}.")
  return names


def _check_width(width: int, ops: set[str], key: str) -> None:
  """Each bottleneck runs its op on width/2 channels split into heads."""
  channels = width // 2
  for op in sorted(ops):
    heads = OPS.get(op).num_heads
    if width % 2 or channels % heads or channels % 2:
      raise ConfigError(
          f"{key}={width} cannot hold op {op}: its {channels} op channels must be even and "
          f"divisible by {heads} heads; use a multiple of {2 * max(heads, 2)}.")


def _check_batch(value: int, key: str) -> None:
  if value <= 0:
    raise ConfigError(f"{key}={value} must be positive.")
  try:
    parallel.check_batch_size(value, key)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if value % jax.process_count():
    raise ConfigError(f"{key}={value} is not divisible by the process count "
                      f"{jax.process_count()}.")


def _check_choice(value: Any, choices: Any, key: str) -> None:
  if value not in choices:
    raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}.")


def validate(config: Any) -> None:
  """Raises ConfigError for the first problem found."""
  run = stages(config)
  try:
    DATASETS.get(config.dataset, key="dataset")
    STEMS.get(config.model.stem, key="model.stem")
    space = search_space_from_config(config.search.candidates)
    DERIVE_RULES.get(config.derive.rule, key="derive.rule")
    for stage in SEARCH_STAGES:
      OBJECTIVES.get(config[stage].objective, key=f"{stage}.objective")
    if "derive" in run:  # derive reports the cost of what it derives
      for ops in space.candidates:
        for op in ops:
          op_cost(op, 16, 8, 8)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  spec = DATASETS.get(config.dataset)
  _check_choice(config.model.dtype, DTYPES, "model.dtype")
  _check_choice(config.model.attention_impl, IMPLEMENTATIONS, "model.attention_impl")

  reduction = STEMS.get(config.model.stem).reduction * NETWORK_REDUCTION
  size = config.image_size
  if size <= 0 or size % reduction:
    raise ConfigError(
        f"image_size={size} cannot pass through the 5-stage network with the "
        f"{config.model.stem!r} stem: it must be a positive multiple of {reduction} "
        f"(e.g. {max(reduction, (max(size, 1) // reduction) * reduction)}).")
  if config.derive.select not in ("best", "last"):
    raise ConfigError(f"Unknown derive.select {config.derive.select!r}; valid choices: "
                      "best, last.")

  search_ops = {op for ops in space.candidates for op in ops}
  for stage in SEARCH_STAGES:
    if stage not in run:
      continue
    cfg = config[stage]
    _check_batch(cfg.batch_size, f"{stage}.batch_size")
    if cfg.epochs < 1:
      raise ConfigError(f"{stage}.epochs={cfg.epochs} must be at least 1.")
    if cfg.init_alpha_from and cfg.init_alpha_from not in SEARCH_STAGES:
      raise ConfigError(f"Unknown {stage}.init_alpha_from {cfg.init_alpha_from!r}; "
                        f"valid choices: '', {', '.join(SEARCH_STAGES)}.")
    if cfg.objective == "car":
      if not 0 < cfg.box_size <= size:
        raise ConfigError(f"{stage}.box_size={cfg.box_size} must be in 1..image_size "
                          f"({size}).")
      if cfg.num_boxes < 1:
        raise ConfigError(f"{stage}.num_boxes={cfg.num_boxes} must be at least 1.")
  if any(s in run for s in SEARCH_STAGES):
    _check_width(config.model.width, search_ops, "model.width")

  genotype_name = config.train.genotype
  if genotype_name != "searched" and genotype_name not in NAMED_GENOTYPES:
    raise ConfigError(f"Unknown train.genotype {genotype_name!r}; valid choices: searched, "
                      f"{', '.join(sorted(NAMED_GENOTYPES))}.")
  all_ops = set(OPS.names())
  for stage in ("train", "retrieval"):
    if stage in run:
      _check_batch(config[stage].batch_size, f"{stage}.batch_size")
      _check_width(config[stage].width, all_ops & (search_ops | _named_ops()),
                   f"{stage}.width")
  _check_batch(config.eval_batch_size, "eval_batch_size")

  if "retrieval" in run:
    train_c, test_c = list(config.retrieval.train_classes), list(config.retrieval.test_classes)
    bad = [c for c in train_c + test_c if not 0 <= c < spec.num_classes]
    if bad:
      raise ConfigError(f"retrieval classes {bad} are outside 0..{spec.num_classes - 1} "
                        f"of dataset {config.dataset}.")
    if set(train_c) & set(test_c):
      raise ConfigError("retrieval.train_classes and retrieval.test_classes overlap: "
                        "zero-shot retrieval needs disjoint classes.")


def _named_ops() -> set[str]:
  return {op for g in NAMED_GENOTYPES.values() for ops in g.stages for op in ops}
