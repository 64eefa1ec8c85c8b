"""Derive a discrete genotype from architecture weights.

`constrained` is the rule of the original parser, solved exactly: per stage choose
the three ops maximising the summed log softmax(alpha) subject to at most
`max_window7` 7x7 local ops and at most `max_global` global ops in the stage. The
search space is small (n_ops**3 = 343 assignments per stage), so exhaustive search
is both exact and cheap. `greedy` is the authors' own parser: layer by layer, in
order, the best op whose class (7x7 window, global) has not reached its limit in the
stage; it can miss the constrained optimum (an early layer takes a limited op that a
later layer needed more). `argmax` takes each layer's best op, unconstrained.

An optional `Budget` caps the derived network's parameters and/or MACs (from the
cost model, at the width and input size it will be trained at). It couples the
stages, and is still solved exactly: each stage's legal assignments are reduced to
their Pareto front (score up, params and MACs down), and the fronts are combined
stage by stage, keeping only non-dominated partial networks.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping

import numpy as np

from fanas_jax.cost import network_cost
from fanas_jax.data.datasets import get_dataset, stage_dataset
from fanas_jax.genotype import (NUM_STAGES, DeriveLimits, Genotype,
                                SearchSpace, stage_name)
from fanas_jax.registry import Registry


def log_softmax(alpha: np.ndarray) -> np.ndarray:
  a = np.asarray(alpha, np.float64)
  a = a - a.max(axis=-1, keepdims=True)
  return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


def _stage_constrained(logp: np.ndarray, ops: tuple[str, ...],
                       limits: DeriveLimits) -> tuple[str, ...]:
  best, best_score = None, -np.inf
  for choice in itertools.product(range(len(ops)), repeat=len(logp)):
    score = sum(logp[l, c] for l, c in enumerate(choice))
    if score > best_score and not limits.violations([ops[c] for c in choice]):
      best, best_score = choice, score
  if best is None:
    raise ValueError(f"No assignment of {list(ops)} satisfies the derive limits.")
  return tuple(ops[c] for c in best)


def _stage_greedy(logp: np.ndarray, ops: tuple[str, ...],
                  limits: DeriveLimits) -> tuple[str, ...]:
  chosen: list[str] = []
  for layer in range(len(logp)):
    for c in np.argsort(-logp[layer], kind="stable"):  # ties: the first op
      if not limits.violations(chosen + [ops[c]]):
        chosen.append(ops[c])
        break
    else:
      raise ValueError(f"No op of {list(ops)} for layer {layer + 1} satisfies the "
                       "derive limits.")
  return tuple(chosen)


def _stage_argmax(logp: np.ndarray, ops: tuple[str, ...],
                  limits: DeriveLimits) -> tuple[str, ...]:
  del limits
  return tuple(ops[int(i)] for i in np.argmax(logp, axis=-1))


DERIVE_RULES: Registry = Registry("derive rule")
DERIVE_RULES.add("constrained", _stage_constrained)
DERIVE_RULES.add("greedy", _stage_greedy)
DERIVE_RULES.add("argmax", _stage_argmax)
# Rules the exact budget solver can honour (it enumerates whole stages).
BUDGET_RULES = ("argmax", "constrained")


@dataclasses.dataclass(frozen=True)
class Budget:
  """A cap on the derived network's cost, at the settings it will be trained at."""
  max_params: int | None = None
  max_macs: int | None = None
  width: int = 96
  image_size: int = 32
  in_channels: int = 3
  stem: str = "attention"
  num_classes: int | None = 10

  @property
  def active(self) -> bool:
    return bool(self.max_params) or bool(self.max_macs)


def budget_from_config(config: Any) -> Budget:
  """derive.max_params / max_macs, at the settings the train stage will use."""
  spec = get_dataset(stage_dataset(config, "train"))
  return Budget(max_params=config.derive.max_params or None,
                max_macs=config.derive.max_macs or None, width=config.train.width,
                image_size=config.image_size, in_channels=spec.channels,
                stem=config.model.stem, num_classes=spec.num_classes)


def derive(alphas: Mapping[str, np.ndarray], space: SearchSpace, rule: str = "constrained",
           limits: DeriveLimits = DeriveLimits(), budget: Budget | None = None) -> Genotype:
  stage_rule = DERIVE_RULES.get(rule, key="derive.rule")
  for name, shape in space.alpha_shapes().items():
    if np.shape(alphas[name]) != shape:
      raise ValueError(
          f"alpha {name} is {np.shape(alphas[name])}, where the search space's is {shape} "
          "(search.layers_per_stage, candidates); derive with the search's space.")
  logps = [log_softmax(np.asarray(alphas[stage_name(s)])) for s in range(NUM_STAGES)]
  if budget is not None and budget.active:
    if rule not in BUDGET_RULES:
      raise ValueError(
          f"derive.rule={rule!r} cannot be combined with derive.max_params / "
          f"derive.max_macs: the budget is solved exactly per stage; use one of "
          f"{', '.join(BUDGET_RULES)}, or set both caps to 0.")
    return _derive_within_budget(logps, space, rule, limits, budget)
  return Genotype(tuple(stage_rule(logp, space.candidates[s], limits)
                        for s, logp in enumerate(logps)))


def layer_costs(space: SearchSpace, budget: Budget) -> tuple[np.ndarray, np.ndarray]:
  """(fixed [params, macs], per-layer [stage, layer, op, 2]) of the networks derivable
  from `space`: a derived network costs fixed + the sum of its chosen ops' rows."""
  table = network_cost(space.layer_ops(), budget.width, budget.image_size,
                       in_channels=budget.in_channels, stem=budget.stem,
                       num_classes=budget.num_classes, preprocess_affine=True)
  n_ops = max(len(c) for c in space.candidates)
  per_op = np.zeros((NUM_STAGES, space.layers, n_ops, 2), np.int64)
  fixed = np.zeros(2, np.int64)
  for row in table.layers:
    parts = row.layer.split("_layer")
    if len(parts) != 2:  # stem, stage pre convs, head
      fixed += (row.params, row.macs)
      continue
    s, l = int(parts[0][len("stage"):]) - 1, int(parts[1]) - 1
    for o, cand in enumerate(row.candidates or (row,)):
      per_op[s, l, o] = (cand.params, cand.macs)
  return fixed, per_op


def _pareto(score: np.ndarray, cost: np.ndarray) -> np.ndarray:
  """Indices of the options no other option beats (score >=, every cost <=, one strict).

  Ties in everything keep the first occurrence, so results are deterministic.
  """
  order = np.lexsort((np.arange(len(score)), *cost.T[::-1], -score))
  kept: list[int] = []
  for i in order:
    if kept:
      k = np.asarray(kept)
      if np.any(np.all(cost[k] <= cost[i], axis=1)):  # k scores >= i (sorted)
        continue
    kept.append(i)
  return np.asarray(kept, np.int64)


def _derive_within_budget(logps: list[np.ndarray], space: SearchSpace, rule: str,
                          limits: DeriveLimits, budget: Budget) -> Genotype:
  fixed, per_op = layer_costs(space, budget)
  # Per stage, a lower bound on its layers' cost (cheapest op per layer).
  floor = np.stack([per_op[t, :, :len(ops)].min(axis=1).sum(axis=0)
                    for t, ops in enumerate(space.candidates)])
  caps = np.asarray([budget.max_params or np.iinfo(np.int64).max,
                     budget.max_macs or np.iinfo(np.int64).max], np.int64)
  # Partial networks: (score, cost[2], choice per stage so far).
  score, cost = np.zeros(1), fixed[None].copy()
  choices: list[tuple] = [()]
  for s, ops in enumerate(space.candidates):
    options = [c for c in itertools.product(range(len(ops)), repeat=space.layers)
               if rule == "argmax" or not limits.violations([ops[i] for i in c])]
    if not options:
      raise ValueError(f"No assignment of {list(ops)} satisfies the derive limits.")
    opt = np.asarray(options)
    layers = np.arange(space.layers)
    opt_score = logps[s][layers, opt].sum(axis=1)
    opt_cost = per_op[s, layers, opt].sum(axis=1)
    front = _pareto(opt_score, opt_cost)
    opt, opt_score, opt_cost = opt[front], opt_score[front], opt_cost[front]
    score = (score[:, None] + opt_score[None]).reshape(-1)
    cost = (cost[:, None] + opt_cost[None]).reshape(-1, 2)
    choices = [c + (tuple(o),) for c in choices for o in opt]
    # The cheapest completion of the remaining stages must still fit.
    fits = np.all(cost + floor[s + 1:].sum(axis=0) <= caps, axis=1)
    if not fits.any():
      least = fixed + floor.sum(axis=0)
      raise ValueError(
          f"No derivable network fits the budget (derive.max_params="
          f"{budget.max_params}, derive.max_macs={budget.max_macs}): at width "
          f"{budget.width} and {budget.image_size}x{budget.image_size} inputs every "
          f"one needs at least {int(least[0]):,} params and {int(least[1]):,} MACs "
          "(within the per-stage limits, possibly more).")
    keep = np.flatnonzero(fits)
    keep = keep[_pareto(score[keep], cost[keep])]
    score, cost, choices = score[keep], cost[keep], [choices[i] for i in keep]
  best = int(np.argmax(score))  # first maximum: deterministic
  return Genotype(tuple(tuple(space.candidates[s][i] for i in c)
                        for s, c in enumerate(choices[best])))


def layer_entropy(alphas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-layer entropy of softmax(alpha) in nats: a collapse shows as a fall to 0."""
  out = {}
  for name, a in alphas.items():
    logp = log_softmax(np.asarray(a))
    out[name] = -(np.exp(logp) * logp).sum(axis=-1)
  return out
