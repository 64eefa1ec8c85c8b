"""The derive stage: the final genotype from the last search phase's alphas.

It reads the alphas of the epoch the search phase selected (derive.select),
derives the genotype under the per-stage limits and the optional params/MACs
caps, and writes workdir/genotype.json (with the derived network's cost at the
train stage's width) and workdir/genotype.png.

A search of several seeds (its result has "seed_alphas") derives each seed's genotype,
their per-layer agreement beside the agreement of chance, and writes the consensus
genotype (fanas_jax/consensus.py) as genotype.json, so `train` uses it by default.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fanas_jax import consensus
from fanas_jax.cost import network_cost
from fanas_jax.derive import Budget, budget_from_config, derive
from fanas_jax.genotype import (DeriveLimits, Genotype, SearchSpace,
                                search_space_from_config)
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
  space = search_space_from_config(config.search)
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
  if not result.get("consensus"):
    return [f"## derived architecture ({result['rule']} rule, from "
            f"{result['from_stage']})", "", g.table(), "", "Saved as `genotype.json`.",
            ""]
  n = result["num_seeds"]
  return [f"## derived architecture (consensus of {n} seeds, {result['rule']} rule, "
          f"from {result['from_stage']})", "",
          f"- per-layer agreement of the {n} seeds' genotypes (fraction of seed pairs "
          f"choosing the same op): mean {result['mean_agreement']:.3f}, against "
          f"{result['mean_chance_agreement']:.3f} by chance ({result['chance']})", "",
          _agreement_table(result["agreement"], result["chance_agreement"]), "",
          "The consensus, from the per-seed log-probabilities summed over seeds:", "",
          g.table(), "", "Saved as `genotype.json` (each seed's genotype under "
          "`seed_genotypes`); `train` uses the consensus.", ""]


def _agreement_table(agreement: dict[str, list[float]],
                     chance: dict[str, list[float]]) -> str:
  """One row per stage: each layer's agreement, with chance's in brackets."""
  layers = range(1, len(next(iter(agreement.values()))) + 1)
  rows = ["| stage | " + " | ".join(f"layer {l}" for l in layers) + " |",
          "|---|" + "---|" * len(layers)]
  for name in sorted(agreement):
    cells = [f"{a:.2f} ({c:.2f})" for a, c in zip(agreement[name], chance[name])]
    rows.append(f"| {name[len('stage'):]} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


@register_stage("derive", needs=_needs, check_config=check_config, summary=summary)
def run_derive(ctx: StageContext) -> dict[str, Any]:
  source, _ = ctx.source(SEARCHED_ALPHAS)
  return derive_stage(ctx.config, ctx.workdir, source)


def derive_stage(config: Any, workdir: str, search_stage: str) -> dict[str, Any]:
  """The final genotype from `search_stage`'s alphas (its selected epoch); from a
  search of several seeds, their consensus."""
  found = read_result(workdir, search_stage)
  space = search_space_from_config(config.search)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  budget = budget_from_config(config)
  if "seed_alphas" in found:
    genotype, seeds = _derive_consensus(found, space, config.derive.rule, limits, budget)
  else:
    alphas = {k: np.asarray(v) for k, v in found["alphas"].items()}
    genotype, seeds = derive(alphas, space, config.derive.rule, limits, budget), {}
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
  record.update(seeds)
  write_json(os.path.join(workdir, "genotype.json"), record)
  what = config.derive.rule
  if seeds:
    what = f"consensus of {seeds['num_seeds']} seeds, {what}"
  if jax.process_index() == 0:
    plot_genotype(genotype, os.path.join(workdir, "genotype.png"),
                  title=f"derived genotype ({what} rule)")
  note(f"[derive] genotype ({what} rule):\n" + genotype.table())
  note(f"[derive] at train width {cost.width}, {cost.image_size}x{cost.image_size} "
       f"input, {cost.stem} stem, {cost.num_classes}-class head: "
       f"{cost.params / 1e6:.3f}M params, {cost.macs / 1e9:.4f} GMACs per image")
  return record


def _derive_consensus(found: dict[str, Any], space: SearchSpace, rule: str,
                      limits: DeriveLimits, budget: Budget
                      ) -> tuple[Genotype, dict[str, Any]]:
  """(the consensus genotype, the record's fields on the seeds): each seed's genotype
  under the same rule, limits and budget, their agreement and chance's."""
  seed_alphas = [{k: np.asarray(v) for k, v in a.items()} for a in found["seed_alphas"]]
  genotypes = [derive(a, space, rule, limits, budget) for a in seed_alphas]
  for g in genotypes:
    g.check_limits(limits)
  agreement = consensus.pairwise_agreement(genotypes)
  chance = consensus.chance_agreement(space, limits, budget)
  epochs = found["seed_epochs"]
  _note_seeds(genotypes, epochs, agreement, chance)
  summed = consensus.summed_log_probs(seed_alphas)
  fields = {"consensus": True, "num_seeds": len(genotypes),
            "seed_genotypes": [g.to_dict() for g in genotypes], "seed_epochs": epochs,
            "agreement": {k: v.tolist() for k, v in agreement.items()},
            "mean_agreement": consensus.mean_over_layers(agreement),
            "chance_agreement": {k: v.tolist() for k, v in chance.per_layer.items()},
            "mean_chance_agreement": consensus.mean_over_layers(chance.per_layer),
            "chance": chance.describe(), "chance_draws": chance.draws,
            # What the consensus is derived from: derive(alphas) gives the genotype.
            "alphas": {k: v.tolist() for k, v in summed.items()}}
  return consensus.consensus_genotype(seed_alphas, space, rule, limits, budget), fields


def _note_seeds(genotypes: list[Genotype], epochs: list[int],
                agreement: dict[str, np.ndarray],
                chance: consensus.ChanceAgreement) -> None:
  """One line per seed's genotype, then per stage each layer's agreement beside chance."""
  for i, (g, epoch) in enumerate(zip(genotypes, epochs)):
    note(f"[derive] seed {i} (epoch {epoch}): "
         + " | ".join(" ".join(ops) for ops in g.stages))
  for name, agree in agreement.items():
    note(f"[derive] {name} agreement " + " ".join(f"{a:.2f}" for a in agree)
         + "  chance " + " ".join(f"{c:.2f}" for c in chance.per_layer[name]))
  note(f"[derive] mean per-layer agreement of {len(genotypes)} seeds "
       f"{consensus.mean_over_layers(agreement):.3f}, chance "
       f"{consensus.mean_over_layers(chance.per_layer):.3f} ({chance.describe()})")
