"""The derive stage: the final genotype from the last search phase's alphas.

It reads the alphas of the epoch the search phase selected (derive.select),
derives the genotype under the per-stage limits and the optional params/MACs
caps, and writes workdir/genotype.json (with the derived network's cost at the
train stage's width) and workdir/genotype.png.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fanas_jax.cost import network_cost
from fanas_jax.derive import budget_from_config, derive
from fanas_jax.genotype import DeriveLimits, Genotype, search_space_from_config
from fanas_jax.logging_utils import note
from fanas_jax.plots import plot_genotype
from fanas_jax.registry import ConfigError
from fanas_jax.search import SEARCH_STAGES
from fanas_jax.stage import Need, StageContext, read_result, register_stage, write_json

SEARCHED_ALPHAS = Need("searched alphas", tuple(reversed(SEARCH_STAGES)),
                       "derive reads the last search phase's alphas")


def _needs(config: Any, stage: str) -> list[Need]:
  del config, stage
  return [SEARCHED_ALPHAS]


def check_config(config: Any, stage: str) -> None:
  """Some network within the per-stage limits fits the caps (every registered op
  brings its cost function, so the cost of whatever is derived is known)."""
  del stage
  space = search_space_from_config(config.search.candidates)
  try:
    if config.derive.max_params or config.derive.max_macs:
      # Does any network within the limits fit? (Exact, milliseconds.)
      derive({name: np.zeros(shape) for name, shape in space.alpha_shapes().items()},
             space, config.derive.rule,
             DeriveLimits(config.derive.max_window7, config.derive.max_global),
             budget_from_config(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  g = Genotype.from_dict(result["genotype"])
  return [f"## derived architecture ({result['rule']} rule, from "
          f"{result['from_stage']})", "", g.table(), "", "Saved as `genotype.json`.", ""]


@register_stage("derive", needs=_needs, check_config=check_config, summary=summary)
def run_derive(ctx: StageContext) -> dict[str, Any]:
  source, _ = ctx.source(SEARCHED_ALPHAS)
  return derive_stage(ctx.config, ctx.workdir, source)


def derive_stage(config: Any, workdir: str, search_stage: str) -> dict[str, Any]:
  """The final genotype from `search_stage`'s alphas (its selected epoch)."""
  found = read_result(workdir, search_stage)
  space = search_space_from_config(config.search.candidates)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  alphas = {k: np.asarray(v) for k, v in found["alphas"].items()}
  budget = budget_from_config(config)
  genotype = derive(alphas, space, config.derive.rule, limits, budget)
  genotype.check_limits(limits)
  # The cost of the network the train stage builds from it (arithmetic, no tracing).
  cost = network_cost(genotype.layer_ops(), budget.width, budget.image_size,
                      in_channels=budget.in_channels, stem=budget.stem,
                      num_classes=budget.num_classes)
  record = {"genotype": genotype.to_dict(), "from_stage": search_stage,
            "epoch": found["epoch"], "select": config.derive.select,
            "rule": config.derive.rule,
            "limits": {"max_window7": limits.max_window7, "max_global": limits.max_global,
                       "max_params": budget.max_params, "max_macs": budget.max_macs},
            "cost": cost.totals(),
            "alphas": found["alphas"]}
  write_json(os.path.join(workdir, "genotype.json"), record)
  if jax.process_index() == 0:
    plot_genotype(genotype, os.path.join(workdir, "genotype.png"),
                  title=f"derived genotype ({config.derive.rule} rule)")
  note("[derive] genotype (" + config.derive.rule + " rule):\n" + genotype.table())
  note(f"[derive] at train width {cost.width}, {cost.image_size}x{cost.image_size} "
       f"input, {cost.stem} stem, {cost.num_classes}-class head: "
       f"{cost.params / 1e6:.3f}M params, {cost.macs / 1e9:.4f} GMACs per image")
  return record
