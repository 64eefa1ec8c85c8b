"""Checks a config before any compute, so a bad one fails with one clear line.

Each error names the config key, what was wrong and the valid choices.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fanas_jax import parallel
from fanas_jax.cost import require_cost_function
from fanas_jax.cpc import grid_size
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset, stage_dataset
from fanas_jax.data.pipeline import BAD_EXAMPLE_POLICIES
from fanas_jax.derive import DERIVE_RULES, budget_from_config, derive
from fanas_jax.genotype import DeriveLimits, NAMED_GENOTYPES, search_space_from_config
from fanas_jax.model import DTYPES
from fanas_jax.objectives import OBJECTIVES
from fanas_jax.ops.attention import IMPLEMENTATIONS
from fanas_jax.ops.layers import OPS, STEMS
from fanas_jax.steps import SEARCH_MODES

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


def _check_batch(value: int, key: str, num_devices: int) -> None:
  if value <= 0:
    raise ConfigError(f"{key}={value} must be positive.")
  try:
    parallel.check_batch_size(value, key, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_choice(value: Any, choices: Any, key: str) -> None:
  if value not in choices:
    raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}.")


def _check_cpc(cpc: Any, image_size: int, reduction: int, stem: str, key: str) -> None:
  """Every patch runs through the whole network, so it obeys image_size's rule."""
  size, stride = cpc.patch_size, cpc.patch_stride
  if size <= 0 or size % reduction or size > image_size:
    raise ConfigError(
        f"{key}.patch_size={size} cannot pass through the 5-stage network with the "
        f"{stem!r} stem: it must be a positive multiple of {reduction} no larger than "
        f"image_size ({image_size}).")
  if stride < 1:
    raise ConfigError(f"{key}.patch_stride={stride} must be at least 1.")
  rows = grid_size(image_size, size, stride)
  offsets = tuple(cpc.offsets)
  if not offsets or len(set(offsets)) < len(offsets) or not all(
      0 < k < rows for k in offsets):
    raise ConfigError(
        f"{key}.offsets={offsets} must be distinct rows ahead in 1..{rows - 1}: "
        f"image_size {image_size}, patch_size {size} and patch_stride {stride} give "
        f"{rows} patch row(s).")
  if cpc.context_layers < 1:
    raise ConfigError(f"{key}.context_layers={cpc.context_layers} must be at least 1.")
  if cpc.context_heads < 1 or cpc.embed_dim % cpc.context_heads:
    raise ConfigError(f"{key}.embed_dim={cpc.embed_dim} must be divisible by "
                      f"{key}.context_heads={cpc.context_heads} (at least 1).")


def _check_bilevel(cfg: Any, stage: str) -> None:
  """The search step's mode, alpha warm-up and Gumbel temperatures."""
  _check_choice(cfg.mode, SEARCH_MODES, f"{stage}.mode")
  if not 0 <= cfg.warmup_epochs < cfg.epochs:
    raise ConfigError(f"{stage}.warmup_epochs={cfg.warmup_epochs} must be in "
                      f"0..{cfg.epochs - 1}: alpha needs at least one epoch of updates.")
  if cfg.mode == "gumbel":
    if not cfg.gumbel_tau_min > 0:
      raise ConfigError(f"{stage}.gumbel_tau_min={cfg.gumbel_tau_min} must be positive.")
    if not cfg.gumbel_tau_max >= cfg.gumbel_tau_min:
      raise ConfigError(f"{stage}.gumbel_tau_max={cfg.gumbel_tau_max} must be at least "
                        f"gumbel_tau_min ({cfg.gumbel_tau_min}).")


def validate(config: Any) -> None:
  """Raises ConfigError for the first problem found."""
  run = stages(config)
  if not isinstance(config.num_devices, int):
    raise ConfigError(f"num_devices={config.num_devices!r} must be an integer (0 = all).")
  if not isinstance(config.lr_reference_batch, int) or config.lr_reference_batch < 0:
    raise ConfigError(f"lr_reference_batch={config.lr_reference_batch!r} must be a "
                      "non-negative integer (0 = learning rates as given).")
  try:
    parallel.check_mesh(config.num_devices)
    spec = get_dataset(config.dataset)  # a folder: dataset is scanned here
    STEMS.get(config.model.stem, key="model.stem")
    space = search_space_from_config(config.search.candidates)
    DERIVE_RULES.get(config.derive.rule, key="derive.rule")
    for stage in SEARCH_STAGES:
      OBJECTIVES.get(config[stage].objective, key=f"{stage}.objective")
    if "derive" in run:  # derive reports the cost of what it derives
      for ops in space.candidates:
        for op in ops:
          require_cost_function(op)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_choice(config.bad_examples, BAD_EXAMPLE_POLICIES, "bad_examples")
  if not isinstance(config.data_workers, int) or config.data_workers < 0:
    raise ConfigError(f"data_workers={config.data_workers!r} must be a non-negative "
                      "integer (0 = read threads only).")
  for key in ("max_params", "max_macs"):
    if not isinstance(config.derive[key], int) or config.derive[key] < 0:
      raise ConfigError(f"derive.{key}={config.derive[key]!r} must be a non-negative "
                        "integer (0 = no cap).")
  if "derive" in run and (config.derive.max_params or config.derive.max_macs):
    try:  # Does any network within the limits fit? (Exact, milliseconds.)
      derive({name: np.zeros(shape) for name, shape in space.alpha_shapes().items()},
             space, config.derive.rule,
             DeriveLimits(config.derive.max_window7, config.derive.max_global),
             budget_from_config(config))
    except ValueError as e:
      raise ConfigError(str(e)) from None
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
    _check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
    if cfg.epochs < 1:
      raise ConfigError(f"{stage}.epochs={cfg.epochs} must be at least 1.")
    if cfg.init_alpha_from and cfg.init_alpha_from not in SEARCH_STAGES:
      raise ConfigError(f"Unknown {stage}.init_alpha_from {cfg.init_alpha_from!r}; "
                        f"valid choices: '', {', '.join(SEARCH_STAGES)}.")
    _check_bilevel(cfg, stage)
    if cfg.objective == "car":
      if not 0 < cfg.box_size <= size:
        raise ConfigError(f"{stage}.box_size={cfg.box_size} must be in 1..image_size "
                          f"({size}).")
      if cfg.num_boxes < 1:
        raise ConfigError(f"{stage}.num_boxes={cfg.num_boxes} must be at least 1.")
    if cfg.objective == "cpc":
      _check_cpc(cfg.cpc, size, reduction, config.model.stem, f"{stage}.cpc")
  if any(s in run for s in SEARCH_STAGES):
    _check_width(config.model.width, search_ops, "model.width")

  genotype_name = config.train.genotype
  if genotype_name != "searched" and genotype_name not in NAMED_GENOTYPES:
    raise ConfigError(f"Unknown train.genotype {genotype_name!r}; valid choices: searched, "
                      f"{', '.join(sorted(NAMED_GENOTYPES))}.")
  all_ops = set(OPS.names())
  for stage in ("train", "retrieval"):
    if stage in run:
      _check_batch(config[stage].batch_size, f"{stage}.batch_size", config.num_devices)
      _check_width(config[stage].width, all_ops & (search_ops | _named_ops()),
                   f"{stage}.width")
  _check_batch(config.eval_batch_size, "eval_batch_size", config.num_devices)

  if "retrieval" in run:
    spec = get_dataset(stage_dataset(config, "retrieval"))
    train_c, test_c = list(config.retrieval.train_classes), list(config.retrieval.test_classes)
    bad = [c for c in train_c + test_c if not 0 <= c < spec.num_classes]
    if bad:
      raise ConfigError(f"retrieval classes {bad} are outside 0..{spec.num_classes - 1} "
                        f"of dataset {stage_dataset(config, 'retrieval')}.")
    if set(train_c) & set(test_c):
      raise ConfigError("retrieval.train_classes and retrieval.test_classes overlap: "
                        "zero-shot retrieval needs disjoint classes.")

  ckpt = config.checkpoint
  for key, least in (("every_steps", 0), ("keep", 1), ("keep_every_epochs", 0),
                     ("max_rollbacks", 0)):
    value = ckpt[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ConfigError(f"checkpoint.{key}={value!r} must be an integer >= {least}.")
  _check_choice(ckpt.nan_policy, ("stop", "rollback"), "checkpoint.nan_policy")
  try:  # Last: it may build the embedded digits.
    pipeline.check_config(config, run)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _named_ops() -> set[str]:
  return {op for g in NAMED_GENOTYPES.values() for ops in g.stages for op in ops}
