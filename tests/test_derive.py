"""Genotype data and the derive rules, against exhaustive references."""
import itertools

import numpy as np
import pytest

from fanas_jax.derive import derive, layer_entropy, log_softmax
from fanas_jax.genotype import (NAMED_GENOTYPES, DeriveLimits, Genotype, SearchSpace,
                                search_space_from_config)
from fanas_jax.ops.layers import ORIGINAL_OPS, OPS

SPACE = SearchSpace.uniform()
LIMITS = DeriveLimits(1, 1)


def _brute_force_best(logp, ops):
  """Best legal score over every assignment of the 3 layers (independent of derive)."""
  best = -np.inf
  for choice in itertools.product(range(len(ops)), repeat=3):
    names = [ops[c] for c in choice]
    n7 = sum(n.startswith("local7") for n in names)
    ng = sum(n == "nonlocal" for n in names)
    if n7 <= 1 and ng <= 1:
      best = max(best, sum(logp[l, c] for l, c in enumerate(choice)))
  return best


@pytest.mark.parametrize("seed", range(6))
def test_constrained_derive_is_the_exhaustive_optimum(seed):
  rng = np.random.default_rng(seed)
  alphas = {f"stage{s + 1}": rng.normal(size=(3, 7)) * 3 for s in range(5)}
  # Push some stages towards breaking the limits so the constraint binds.
  alphas["stage1"][:, ORIGINAL_OPS.index("local7_h4")] += 10
  alphas["stage5"][:, ORIGINAL_OPS.index("nonlocal")] += 10
  g = derive(alphas, SPACE, "constrained", LIMITS)
  g.check_limits(LIMITS)
  for s in range(5):
    logp = log_softmax(alphas[f"stage{s + 1}"])
    score = sum(logp[l, ORIGINAL_OPS.index(op)] for l, op in enumerate(g.stages[s]))
    assert score == pytest.approx(_brute_force_best(logp, ORIGINAL_OPS), abs=1e-9)
  assert sum(op.startswith("local7") for op in g.stages[0]) == 1
  assert sum(op == "nonlocal" for op in g.stages[4]) == 1


def test_argmax_ignores_limits():
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  alphas["stage2"][:, ORIGINAL_OPS.index("nonlocal")] = 5.0
  g = derive(alphas, SPACE, "argmax", LIMITS)
  assert g.stages[1] == ("nonlocal",) * 3
  with pytest.raises(ValueError, match="breaks the derive limits"):
    g.check_limits(LIMITS)
  assert derive(alphas, SPACE, "constrained", LIMITS).stages[1].count("nonlocal") == 1


def test_unknown_rule_lists_choices():
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  with pytest.raises(ValueError, match="argmax, constrained"):
    derive(alphas, SPACE, "greedy", LIMITS)


def test_entropy_uniform_and_one_hot():
  ent = layer_entropy({"stage1": np.zeros((3, 7)), "stage2": np.eye(3, 7) * 100})
  np.testing.assert_allclose(ent["stage1"], np.log(7))
  np.testing.assert_allclose(ent["stage2"], 0.0, atol=1e-6)


def test_genotype_json_round_trip_and_validation():
  g = NAMED_GENOTYPES["original"]
  assert Genotype.from_json(g.to_json()) == g
  g.check_limits(LIMITS)
  assert "local7_h4" in g.table() and "(stride 2)" in g.table()
  with pytest.raises(ValueError, match="valid choices"):
    Genotype((("local9_h4", "local3_h4", "local3_h4"),) + g.stages[1:])
  with pytest.raises(ValueError, match="5 stages"):
    Genotype(g.stages[:4])
  with pytest.raises(ValueError, match="3"):
    Genotype((("local3_h4",),) + g.stages[1:])


def test_search_space_from_config():
  assert search_space_from_config(list(ORIGINAL_OPS)) == SPACE
  per_stage = [["local3_h4", "nonlocal"]] * 5
  assert search_space_from_config(per_stage).alpha_shapes()["stage3"] == (3, 2)
  with pytest.raises(ValueError, match="valid choices"):
    search_space_from_config(["local3_h4", "conv3"])
  assert set(ORIGINAL_OPS) <= set(OPS.names())


BUDGET_OPS = ("local3_h4", "local7_h8", "nonlocal")


def _every_legal_network(alphas, budget, limits):
  """Score and [params, MACs] of every legal network (13 per stage, 13**5 in all),
  with costs from the cost model of each layer's bottleneck."""
  from fanas_jax import cost
  space = SearchSpace.uniform(BUDGET_OPS)
  table = cost.network_cost(space.layer_ops(), budget.width, budget.image_size,
                            in_channels=budget.in_channels, stem=budget.stem,
                            num_classes=budget.num_classes, preprocess_affine=True)
  rows = {r.layer: r for r in table.layers}
  fixed = np.asarray([sum(r.params for r in table.layers if not r.candidates),
                      sum(r.macs for r in table.layers if not r.candidates)])
  legal = [c for c in itertools.product(range(3), repeat=3)
           if not limits.violations([BUDGET_OPS[i] for i in c])]
  stage_score, stage_cost = [], []
  for s in range(5):
    logp = log_softmax(alphas[f"stage{s + 1}"])
    stage_score.append([sum(logp[l, c[l]] for l in range(3)) for c in legal])
    stage_cost.append([np.sum([(rows[f"stage{s + 1}_layer{l + 1}"].candidates[c[l]].params,
                                rows[f"stage{s + 1}_layer{l + 1}"].candidates[c[l]].macs)
                               for l in range(3)], axis=0) for c in legal])
  grids = np.meshgrid(*[np.arange(len(legal))] * 5, indexing="ij")
  idx = [g.reshape(-1) for g in grids]
  score = sum(np.asarray(stage_score[s])[idx[s]] for s in range(5))
  costs = fixed + sum(np.asarray(stage_cost[s])[idx[s]] for s in range(5))
  return score, costs


@pytest.mark.parametrize("seed,cap_params,cap_macs", [
    (0, False, True), (1, True, False), (2, True, True), (3, False, True)])
def test_budgeted_derive_is_the_exhaustive_optimum(seed, cap_params, cap_macs):
  """Caps at the cost of a legal network cheaper than the unconstrained pick in
  both params and MACs (so some network fits and the pick does not)."""
  from fanas_jax import cost
  from fanas_jax.derive import Budget
  rng = np.random.default_rng(seed)
  alphas = {f"stage{s + 1}": rng.normal(size=(3, 3)) * 2 for s in range(5)}
  space = SearchSpace.uniform(BUDGET_OPS)
  free = derive(alphas, space, "constrained", LIMITS)
  full = cost.network_cost(free.layer_ops(), 32, 32, num_classes=10)
  score, costs = _every_legal_network(alphas, Budget(width=32, image_size=32), LIMITS)
  cheaper = np.flatnonzero((costs[:, 0] < full.params) & (costs[:, 1] < full.macs))
  cap = costs[cheaper[np.argsort(score[cheaper])[len(cheaper) // 2]]]
  budget = Budget(max_params=int(cap[0]) if cap_params else None,
                  max_macs=int(cap[1]) if cap_macs else None,
                  width=32, image_size=32, num_classes=10)
  g = derive(alphas, space, "constrained", LIMITS, budget)
  g.check_limits(LIMITS)
  got = cost.network_cost(g.layer_ops(), 32, 32, num_classes=10)
  assert not cap_params or got.params <= budget.max_params
  assert not cap_macs or got.macs <= budget.max_macs
  fits = ((costs[:, 0] <= (budget.max_params or np.inf))
          & (costs[:, 1] <= (budget.max_macs or np.inf)))
  derived_score = sum(log_softmax(alphas[f"stage{s + 1}"])[l, BUDGET_OPS.index(op)]
                      for s, ops in enumerate(g.stages) for l, op in enumerate(ops))
  assert derived_score == pytest.approx(score[fits].max(), abs=1e-9)
  assert g != free  # the budget binds in every case above


def test_budget_that_nothing_fits_is_a_clear_error():
  from fanas_jax.derive import Budget
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  with pytest.raises(ValueError, match="No derivable network fits the budget.*at least"):
    derive(alphas, SPACE, "constrained", LIMITS, Budget(max_params=10_000))
  assert derive(alphas, SPACE, "constrained", LIMITS, Budget()) == derive(
      alphas, SPACE, "constrained", LIMITS)
