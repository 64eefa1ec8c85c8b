"""Genotype data and the derive rules, against exhaustive references."""
import itertools

import ml_collections
import numpy as np
import pytest

from fanas_jax.derive import derive, layer_entropy, log_softmax
from fanas_jax.genotype import (NAMED_GENOTYPES, DeriveLimits, Genotype, SearchSpace,
                                search_space_from_config)
from fanas_jax.ops.layers import ORIGINAL_OPS, OPS

SPACE = SearchSpace.uniform()
LIMITS = DeriveLimits(1, 1)


def _brute_force_best(logp, ops):
  """Best legal score over every assignment of the layers (independent of derive)."""
  best = -np.inf
  for choice in itertools.product(range(len(ops)), repeat=len(logp)):
    names = [ops[c] for c in choice]
    n7 = sum(n.startswith("local7") for n in names)
    ng = sum(n == "nonlocal" for n in names)
    if n7 <= 1 and ng <= 1:
      best = max(best, sum(logp[l, c] for l, c in enumerate(choice)))
  return best


@pytest.mark.parametrize("seed, layers", [(s, 3) for s in range(6)] + [(0, 2), (1, 4)])
def test_constrained_derive_is_the_exhaustive_optimum(seed, layers):
  rng = np.random.default_rng(seed)
  alphas = {f"stage{s + 1}": rng.normal(size=(layers, 7)) * 3 for s in range(5)}
  # Push some stages towards breaking the limits so the constraint binds.
  alphas["stage1"][:, ORIGINAL_OPS.index("local7_h4")] += 10
  alphas["stage5"][:, ORIGINAL_OPS.index("nonlocal")] += 10
  g = derive(alphas, SearchSpace.uniform(layers=layers), "constrained", LIMITS)
  assert g.layers == layers
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


def test_alphas_of_another_space_are_refused():
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  with pytest.raises(ValueError, match=r"alpha stage1 is \(3, 7\), where the search "
                                       r"space's is \(1, 7\)"):
    derive(alphas, SearchSpace.uniform(layers=1), "constrained", LIMITS)


def test_unknown_rule_lists_choices():
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  with pytest.raises(ValueError, match=r"derive\.rule.*argmax, constrained, greedy"):
    derive(alphas, SPACE, "greedy_typo", LIMITS)


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
  with pytest.raises(ValueError, match="stage2 of the genotype has 3 layers; every stage"):
    Genotype((("local3_h4",),) + g.stages[1:])


def _search(candidates, layers_per_stage=3):
  return ml_collections.ConfigDict(dict(candidates=candidates,
                                        layers_per_stage=layers_per_stage))


def test_search_space_from_config():
  assert search_space_from_config(_search(list(ORIGINAL_OPS))) == SPACE
  per_stage = [["local3_h4", "nonlocal"]] * 5
  assert search_space_from_config(_search(per_stage)).alpha_shapes()["stage3"] == (3, 2)
  one = search_space_from_config(_search(per_stage, 1))
  assert one.alpha_shapes()["stage3"] == (1, 2)
  assert one.layer_ops()[2] == (("local3_h4", "nonlocal"),)
  with pytest.raises(ValueError, match="valid choices"):
    search_space_from_config(_search(["local3_h4", "conv3"]))
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="search.layers_per_stage"):
      search_space_from_config(_search(per_stage, bad))
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


# The authors' greedy parser.


def _stage_alphas(rows):
  """[3, 7] alphas from {op: value} per layer, every other op 0."""
  a = np.zeros((3, len(ORIGINAL_OPS)))
  for l, row in enumerate(rows):
    for op, v in row.items():
      a[l, ORIGINAL_OPS.index(op)] = v
  return a


def test_greedy_and_constrained_differ_on_a_hand_worked_stage():
  # Layer 1 prefers local7_h4 by 0.1 over local3_h4; layer 2 needs its 7x7 op
  # (local7_h8 by 4 over local5_h4). Greedy spends the stage's one 7x7 on layer 1
  # and layer 2 falls back to local5_h4: score 2.0 + 1 + 3 (in alpha units, the
  # softmax normalisers being equal either way) against 1.9 + 5 + 3 exactly.
  stage = _stage_alphas([{"local7_h4": 2.0, "local3_h4": 1.9},
                         {"local7_h8": 5.0, "local5_h4": 1.0},
                         {"local3_h8": 3.0}])
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  alphas["stage1"] = stage
  greedy = derive(alphas, SPACE, "greedy", LIMITS)
  exact = derive(alphas, SPACE, "constrained", LIMITS)
  assert greedy.stages[0] == ("local7_h4", "local5_h4", "local3_h8")
  assert exact.stages[0] == ("local3_h4", "local7_h8", "local3_h8")
  logp = log_softmax(stage)
  score = lambda ops: sum(logp[l, ORIGINAL_OPS.index(op)] for l, op in enumerate(ops))
  assert score(exact.stages[0]) - score(greedy.stages[0]) == pytest.approx(3.9, abs=1e-9)


def test_greedy_global_limit_falls_back_layer_by_layer():
  stage = _stage_alphas([{"nonlocal": 4.0, "local3_h4": 1.0},
                         {"nonlocal": 3.0, "local5_h8": 2.0},
                         {"nonlocal": 5.0, "local7_h4": 0.5}])
  alphas = {f"stage{s + 1}": stage for s in range(5)}
  g = derive(alphas, SPACE, "greedy", LIMITS)
  assert g.stages == (("nonlocal", "local5_h8", "local7_h4"),) * 5
  g.check_limits(LIMITS)


def _greedy_reference(logp, ops, max7, max_global):
  """The authors' parser written out: per layer, ops by descending weight, first legal."""
  n7 = ng = 0
  out = []
  for row in logp:
    for c in sorted(range(len(ops)), key=lambda c: (-row[c], c)):
      is7, isg = ops[c].startswith("local7"), ops[c] == "nonlocal"
      if n7 + is7 <= max7 and ng + isg <= max_global:
        n7, ng = n7 + is7, ng + isg
        out.append(ops[c])
        break
  return tuple(out)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_the_reference_and_never_beats_constrained(seed):
  rng = np.random.default_rng(seed)
  alphas = {f"stage{s + 1}": rng.normal(size=(3, 7)) * 3 for s in range(5)}
  alphas["stage1"][:, ORIGINAL_OPS.index("local7_h4")] += 4
  alphas["stage5"][:, ORIGINAL_OPS.index("nonlocal")] += 4
  greedy = derive(alphas, SPACE, "greedy", LIMITS)
  exact = derive(alphas, SPACE, "constrained", LIMITS)
  greedy.check_limits(LIMITS)
  for s in range(5):
    logp = log_softmax(alphas[f"stage{s + 1}"])
    assert greedy.stages[s] == _greedy_reference(logp, ORIGINAL_OPS, 1, 1)
    score = lambda ops: sum(logp[l, ORIGINAL_OPS.index(op)] for l, op in enumerate(ops))
    assert score(greedy.stages[s]) <= score(exact.stages[s]) + 1e-12


def test_greedy_with_a_budget_is_refused_in_one_line():
  from fanas_jax.derive import Budget
  alphas = {f"stage{s + 1}": np.zeros((3, 7)) for s in range(5)}
  with pytest.raises(ValueError, match=r"derive\.rule='greedy' cannot be combined with "
                     r"derive\.max_params / derive\.max_macs.*argmax, constrained"):
    derive(alphas, SPACE, "greedy", LIMITS, Budget(max_params=10**9))
  assert derive(alphas, SPACE, "greedy", LIMITS, Budget()) == derive(
      alphas, SPACE, "greedy", LIMITS)


def test_greedy_with_no_legal_op_names_the_layer():
  space = SearchSpace.uniform(("local7_h4", "local7_h8"))
  alphas = {f"stage{s + 1}": np.zeros((3, 2)) for s in range(5)}
  with pytest.raises(ValueError, match="layer 2 satisfies the derive limits"):
    derive(alphas, space, "greedy", LIMITS)
