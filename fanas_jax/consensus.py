"""Many searches, one architecture: how far the seeds agree, and what they agree on.

N independent searches (search.num_seeds) each derive a genotype. Per layer, the
pairwise agreement is the fraction of the N(N-1)/2 seed pairs that chose the same op:
1 when all seeds agree, 0 when all differ. Alone it means little, so it stands beside
the agreement of chance: two independent uniform draws of a legal genotype choose the
same op of a layer with probability sum over ops of p(op)^2, which is 1/K for K ops
when no limit binds and more where the per-stage limits make some ops likelier.

The consensus genotype is derive's rule, limits and budget applied to the per-seed
log-probabilities summed over seeds: the genotype the seeds find most probable
together (the product of their softmax distributions).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from fanas_jax.baseline import legal_stage_choices, random_genotypes
from fanas_jax.derive import Budget, derive, log_softmax
from fanas_jax.genotype import (NUM_STAGES, DeriveLimits, Genotype,
                                SearchSpace, stage_name)

# With a params/MACs budget the chance level is estimated from this many seeded draws
# of random_genotypes (about 1 s): each layer's estimate has a standard error below
# 2 * sqrt(Var p(X) / CHANCE_DRAWS) < 0.007, since Var p(X) <= 27/256 for any p.
CHANCE_DRAWS = 10_000
CHANCE_SEED = 0


def pairwise_agreement(genotypes: Sequence[Genotype]) -> dict[str, np.ndarray]:
  """Per stage name, [layers]: the fraction of seed pairs whose genotypes chose the
  same op for that layer."""
  if len(genotypes) < 2:
    raise ValueError(f"Agreement across seeds needs at least 2 genotypes, got "
                     f"{len(genotypes)}.")
  if len({g.layers for g in genotypes}) > 1:
    raise ValueError("Agreement across seeds needs genotypes of as many layers per stage.")
  pairs = math.comb(len(genotypes), 2)
  out = {}
  for s in range(NUM_STAGES):
    agree = []
    for layer in range(genotypes[0].layers):
      counts = collections.Counter(g.stages[s][layer] for g in genotypes)
      agree.append(sum(math.comb(c, 2) for c in counts.values()) / pairs)
    out[stage_name(s)] = np.asarray(agree)
  return out


def mean_over_layers(per_layer: Mapping[str, np.ndarray]) -> float:
  """The mean over every layer of every stage."""
  return float(np.mean(np.concatenate([np.asarray(v) for v in per_layer.values()])))


def summed_log_probs(seed_alphas: Sequence[Mapping[str, np.ndarray]]
                     ) -> dict[str, np.ndarray]:
  """Per stage name, [layers, ops]: log softmax(alpha) summed over the seeds."""
  return {name: sum(log_softmax(np.asarray(a[name])) for a in seed_alphas)
          for name in seed_alphas[0]}


def consensus_genotype(seed_alphas: Sequence[Mapping[str, np.ndarray]],
                       space: SearchSpace, rule: str = "constrained",
                       limits: DeriveLimits = DeriveLimits(),
                       budget: Budget | None = None) -> Genotype:
  """derive() of the summed per-seed log-probabilities, passed as alphas.

  derive ranks log softmax of what it is given, and log softmax shifts each layer's
  row by one constant. Every rule compares ops within a layer (argmax, greedy) or sums
  of one entry per layer (constrained, and the budget's Pareto fronts over stages),
  so a per-layer shift moves every candidate alike: the choice is the one that
  maximises the summed log-probabilities themselves.
  """
  return derive(summed_log_probs(seed_alphas), space, rule, limits, budget)


@dataclasses.dataclass(frozen=True)
class ChanceAgreement:
  """Per stage name, [layers]: the probability that two independent uniform draws of a
  legal genotype choose the same op. draws == 0: exact; else estimated from draws."""
  per_layer: dict[str, np.ndarray]
  draws: int

  def describe(self) -> str:
    if not self.draws:
      return "exact, over the legal genotypes"
    return f"estimated from {self.draws:,} random legal genotypes within the budget"


def exact_chance_agreement(space: SearchSpace, limits: DeriveLimits
                           ) -> dict[str, np.ndarray]:
  """sum_op p(op)^2 per layer, p the op's share of its stage's legal assignments (the
  stages are independent when no budget couples them)."""
  out = {}
  for s, ops in enumerate(space.candidates):
    choices = np.asarray(legal_stage_choices(ops, limits, space.layers)
                         ).reshape(-1, space.layers)
    if not len(choices):
      raise ValueError(f"No assignment of {list(ops)} to {stage_name(s)} satisfies the "
                       "derive limits (derive.max_window7, derive.max_global).")
    p = np.stack([np.bincount(choices[:, layer], minlength=len(ops))
                  for layer in range(space.layers)]) / len(choices)
    out[stage_name(s)] = (p ** 2).sum(axis=1)
  return out


def estimated_chance_agreement(space: SearchSpace, limits: DeriveLimits,
                               budget: Budget | None, draws: int,
                               rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Per layer, the unbiased estimate sum_op c(c - 1) / (n(n - 1)) of sum_op p(op)^2
  from the op counts c of n = `draws` random legal genotypes (within the budget)."""
  if draws < 2:
    raise ValueError(f"Estimating the chance agreement needs at least 2 draws, got "
                     f"{draws}.")
  genotypes = random_genotypes(space, limits, budget, draws, rng)
  out = {}
  for s, ops in enumerate(space.candidates):
    picks = np.asarray([[ops.index(op) for op in g.stages[s]] for g in genotypes])
    counts = np.stack([np.bincount(picks[:, layer], minlength=len(ops))
                       for layer in range(space.layers)]).astype(np.float64)
    out[stage_name(s)] = (counts * (counts - 1)).sum(axis=1) / (draws * (draws - 1))
  return out


def chance_agreement(space: SearchSpace, limits: DeriveLimits,
                     budget: Budget | None = None, draws: int = CHANCE_DRAWS,
                     seed: int = CHANCE_SEED) -> ChanceAgreement:
  """Exact without an active budget; with one (it couples the stages), estimated from
  `draws` seeded draws."""
  if budget is None or not budget.active:
    return ChanceAgreement(exact_chance_agreement(space, limits), 0)
  rng = np.random.default_rng(seed)
  return ChanceAgreement(estimated_chance_agreement(space, limits, budget, draws, rng),
                         draws)
