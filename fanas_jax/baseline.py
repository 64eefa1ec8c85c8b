"""The random-architecture baseline: does the searched genotype beat random ones?

One-shot NAS is often no better than random search (Li & Talwalkar 2019; Yang et
al. 2020), so the stage `baseline` measures it: it trains K genotypes drawn
uniformly from the legal ones (the derive limits per stage, and the derive budget
when one is set) with the train stage's recipe, width, epochs and seed, and ranks the
genotype the train stage trained among them by test top-1. Each random genotype is a
train stage of its own under workdir/baseline/randomK/, so it checkpoints, resumes
and is skipped once finished like any stage.
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Any, Callable, Sequence

import numpy as np

from fanas_jax import train
from fanas_jax.derive import Budget, budget_from_config, layer_costs
from fanas_jax.genotype import (DeriveLimits, Genotype, SearchSpace,
                                search_space_from_config)
from fanas_jax.logging_utils import note
from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need, StageContext, register_stage, run_once, write_json

TRAINED = Need("the trained genotype's test top-1", ("train",),
               "baseline ranks the genotype the train stage trained")
# Draws of a whole genotype before a budget that almost nothing fits is given up on.
MAX_BUDGET_DRAWS = 10_000


def legal_stage_choices(ops: Sequence[str], limits: DeriveLimits,
                        layers: int) -> list[tuple[int, ...]]:
  """Every assignment of ops to a stage's layers (op indices) within the limits."""
  return [c for c in itertools.product(range(len(ops)), repeat=layers)
          if not limits.violations([ops[i] for i in c])]


def _fits_budget(space: SearchSpace, budget: Budget | None) -> Callable[[list], bool]:
  """picks (op indices per stage) -> whether the network is within the budget."""
  if budget is None or not budget.active:
    return lambda picks: True
  fixed, per_op = layer_costs(space, budget)
  caps = np.asarray([budget.max_params or np.inf, budget.max_macs or np.inf])

  def fits(picks: list[tuple[int, ...]]) -> bool:
    cost = fixed + sum(per_op[s, l, o] for s, p in enumerate(picks)
                       for l, o in enumerate(p))
    return bool(np.all(cost <= caps))

  return fits


def random_genotypes(space: SearchSpace, limits: DeriveLimits, budget: Budget | None,
                     count: int, rng: np.random.Generator) -> list[Genotype]:
  """`count` genotypes, each stage uniform over its legal assignments; with an active
  budget, drawn until the whole network fits (uniform over the fitting ones)."""
  choices = [legal_stage_choices(ops, limits, space.layers) for ops in space.candidates]
  fits = _fits_budget(space, budget)
  out = []
  for _ in range(count):
    for _ in range(MAX_BUDGET_DRAWS):
      picks = [c[rng.integers(len(c))] for c in choices]
      if fits(picks):
        break
    else:
      raise ValueError(f"No random genotype fitted the derive budget in "
                       f"{MAX_BUDGET_DRAWS} draws; raise derive.max_params / max_macs.")
    out.append(Genotype(tuple(tuple(space.candidates[s][i] for i in p)
                              for s, p in enumerate(picks))))
  return out


def rank_stats(searched: float, random: Sequence[float]) -> dict[str, float]:
  """Where `searched` stands among the random scores (higher is better).

  rank: 1 + the random scores above it + half the ties, among K + 1 (1 = best);
  beats: the fraction of random scores below it (ties count half); mean and std
  (ddof 1) of the random scores, and their range.
  """
  r = np.asarray(random, np.float64)
  above, ties = float(np.sum(r > searched)), float(np.sum(r == searched))
  return {"searched": float(searched), "rank": 1 + above + ties / 2, "of": int(r.size) + 1,
          "beats": (r.size - above - ties / 2) / r.size,
          "mean": float(r.mean()), "std": float(r.std(ddof=1)) if r.size > 1 else 0.0,
          "min": float(r.min()), "max": float(r.max())}


def _needs(config: Any, stage: str) -> list[Need]:
  del config, stage
  return [TRAINED]


def check_config(config: Any, stage: str) -> None:
  """The count, the train block every random genotype trains with, and some legal
  assignment in every stage."""
  del stage
  if config.baseline.num_genotypes < 1:
    raise ConfigError(f"baseline.num_genotypes={config.baseline.num_genotypes} must be at "
                      f"least 1.")
  train.check_config(config, "train")
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  space = search_space_from_config(config.search)
  for s, ops in enumerate(space.candidates):
    if not legal_stage_choices(ops, limits, space.layers):
      raise ConfigError(f"No assignment of {list(ops)} to stage{s + 1} satisfies the "
                        f"derive limits (derive.max_window7, derive.max_global).")


def summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result["rank"]
  return ["## random-architecture baseline", "",
          f"- searched genotype test top-1 {r['searched']:.4f}: rank {r['rank']:g} of "
          f"{r['of']} (beats {100 * r['beats']:.0f}% of {r['of'] - 1} random genotypes)",
          f"- random genotypes: mean {r['mean']:.4f}, std {r['std']:.4f}, range "
          f"{r['min']:.4f} .. {r['max']:.4f} (`baseline/result.json`)", ""]


def _train_random(ctx: StageContext, k: int, genotype: Genotype) -> dict[str, Any]:
  """Genotype k as a train stage of its own in workdir/baseline/random<k>/."""
  workdir = os.path.join(ctx.out_dir, f"random{k}")
  path = os.path.join(workdir, "genotype.json")
  write_json(path, {"genotype": genotype.to_dict()})
  config = copy.deepcopy(ctx.config)
  config.train.genotype = path
  build = copy.copy(ctx.build)
  build.config, build.workdir = config, workdir
  return run_once(StageContext(config, workdir, "train", build, {}))


@register_stage("baseline", needs=_needs, check_config=check_config, summary=summary)
def run_baseline(ctx: StageContext) -> dict[str, Any]:
  """Trains baseline.num_genotypes random legal genotypes; ranks the trained one."""
  config = ctx.config
  _, trained = ctx.source(TRAINED)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  rng = np.random.default_rng([config.seed, config.baseline.sample_seed])
  genotypes = random_genotypes(search_space_from_config(config.search), limits,
                               budget_from_config(config), config.baseline.num_genotypes,
                               rng)
  results = [_train_random(ctx, k + 1, g) for k, g in enumerate(genotypes)]
  scores = [r["test_top1"] for r in results]
  rank = rank_stats(trained["test_top1"], scores)
  note(f"[baseline] searched top-1 {rank['searched']:.4f}: rank {rank['rank']:g} of "
       f"{rank['of']}; random mean {rank['mean']:.4f} +- {rank['std']:.4f}")
  return {"rank": rank, "searched_genotype": trained["genotype"],
          "random": [{"genotype": g.to_dict(), "test_top1": s}
                     for g, s in zip(genotypes, scores)]}
