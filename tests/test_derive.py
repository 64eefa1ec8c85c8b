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
