"""Derive a discrete genotype from architecture weights.

`constrained` is the rule of the original parser, solved exactly: per stage choose
the three ops maximising the summed log softmax(alpha) subject to at most
`max_window7` 7x7 local ops and at most `max_global` global ops in the stage. The
search space is small (n_ops**3 = 343 assignments per stage), so exhaustive search
is both exact and cheap. `argmax` takes each layer's best op, unconstrained.
"""
from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np

from fanas_jax.genotype import (LAYERS_PER_STAGE, NUM_STAGES, DeriveLimits, Genotype,
                                SearchSpace, stage_name)
from fanas_jax.registry import Registry


def log_softmax(alpha: np.ndarray) -> np.ndarray:
  a = np.asarray(alpha, np.float64)
  a = a - a.max(axis=-1, keepdims=True)
  return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))


def _stage_constrained(logp: np.ndarray, ops: tuple[str, ...],
                       limits: DeriveLimits) -> tuple[str, ...]:
  best, best_score = None, -np.inf
  for choice in itertools.product(range(len(ops)), repeat=LAYERS_PER_STAGE):
    score = sum(logp[l, c] for l, c in enumerate(choice))
    if score > best_score and not limits.violations([ops[c] for c in choice]):
      best, best_score = choice, score
  if best is None:
    raise ValueError(f"No assignment of {list(ops)} satisfies the derive limits.")
  return tuple(ops[c] for c in best)


def _stage_argmax(logp: np.ndarray, ops: tuple[str, ...],
                  limits: DeriveLimits) -> tuple[str, ...]:
  del limits
  return tuple(ops[int(i)] for i in np.argmax(logp, axis=-1))


DERIVE_RULES: Registry = Registry("derive rule")
DERIVE_RULES.add("constrained", _stage_constrained)
DERIVE_RULES.add("argmax", _stage_argmax)


def derive(alphas: Mapping[str, np.ndarray], space: SearchSpace, rule: str = "constrained",
           limits: DeriveLimits = DeriveLimits()) -> Genotype:
  stage_rule = DERIVE_RULES.get(rule, key="derive.rule")
  stages = []
  for s in range(NUM_STAGES):
    logp = log_softmax(np.asarray(alphas[stage_name(s)]))
    stages.append(stage_rule(logp, space.candidates[s], limits))
  return Genotype(tuple(stages))


def layer_entropy(alphas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-layer entropy of softmax(alpha) in nats: a collapse shows as a fall to 0."""
  out = {}
  for name, a in alphas.items():
    logp = log_softmax(np.asarray(a))
    out[name] = -(np.exp(logp) * logp).sum(axis=-1)
  return out
