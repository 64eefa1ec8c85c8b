"""Checks a config before any compute, so a bad one fails with one clear line.

Each error names the config key, what was wrong and the valid choices. The checks
live next to what they check: each stage's `check_config` (found through the stage
registry), the checkpoint settings' (fanas_jax.loop), the evaluators'; here are the
run-wide keys and the calls.
"""
from __future__ import annotations

from typing import Any

from fanas_jax import checks, compile_cache, loop, model, parallel
from fanas_jax.data.datasets import prepare_stage_data
from fanas_jax.data.pipeline import BAD_EXAMPLE_POLICIES
from fanas_jax.derive import DERIVE_RULES
from fanas_jax.genotype import search_space_from_config
from fanas_jax.ops.layers import STEMS
from fanas_jax.registry import ConfigError
from fanas_jax.search import SELECT_CHOICES
from fanas_jax.stages import STAGES, check_needs, stage_names

__all__ = ["ConfigError", "validate"]


def _check_run_keys(config: Any) -> None:
  if not isinstance(config.num_devices, int):
    raise ConfigError(f"num_devices={config.num_devices!r} must be an integer (0 = all).")
  if not isinstance(config.lr_reference_batch, int) or config.lr_reference_batch < 0:
    raise ConfigError(f"lr_reference_batch={config.lr_reference_batch!r} must be a "
                      "non-negative integer (0 = learning rates as given).")
  checks.check_choice(config.bad_examples, BAD_EXAMPLE_POLICIES, "bad_examples")
  try:
    compile_cache.check_config(config.compile_cache)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not isinstance(config.data_workers, int) or config.data_workers < 0:
    raise ConfigError(f"data_workers={config.data_workers!r} must be a non-negative "
                      "integer (0 = read threads only).")
  for key in ("max_params", "max_macs"):
    if not isinstance(config.derive[key], int) or config.derive[key] < 0:
      raise ConfigError(f"derive.{key}={config.derive[key]!r} must be a non-negative "
                        "integer (0 = no cap).")
  seeds = config.search.num_seeds
  if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
    raise ConfigError(f"search.num_seeds={seeds!r} must be an integer >= 1 (the number "
                      "of independent searches a search phase runs).")
  if config.derive.select not in SELECT_CHOICES:
    raise ConfigError(f"Unknown derive.select {config.derive.select!r}; valid choices: "
                      f"{', '.join(SELECT_CHOICES)}.")


def _check_model(config: Any) -> None:
  try:
    model.check_config(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  reduction = checks.input_reduction(config)
  size = config.image_size
  if size <= 0 or size % reduction:
    raise ConfigError(
        f"image_size={size} cannot pass through the 5-stage network with the "
        f"{config.model.stem!r} stem: it must be a positive multiple of {reduction} "
        f"(e.g. {max(reduction, (max(size, 1) // reduction) * reduction)}).")


def validate(config: Any, workdir: str | None = None) -> None:
  """Raises ConfigError for the first problem found.

  With a workdir, also refuses a `stages` list in which a stage needs what no
  stage before it gives and the workdir holds no finished stage that does.
  """
  run = stage_names(config)
  _check_run_keys(config)
  try:
    parallel.check_mesh(config.num_devices)
    STEMS.get(config.model.stem, key="model.stem")
    search_space_from_config(config.search)
    DERIVE_RULES.get(config.derive.rule, key="derive.rule")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_model(config)
  for name in run:
    STAGES.get(name).check_config(config, name)
  checks.check_batch(config.eval_batch_size, "eval_batch_size", config.num_devices)
  loop.check_config(config.checkpoint)
  try:  # Last: preparing may build the embedded digits.
    for name in run:
      prepare_stage_data(config, name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if workdir is not None:
    check_needs(config, workdir)
