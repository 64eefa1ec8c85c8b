"""Many-seed derive: agreement, consensus and chance against hand-worked cases,
brute-force references and a simulation; the derive stage on hand-made results."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from fanas_jax.baseline import random_genotypes
from fanas_jax.configs import default
from fanas_jax.consensus import (chance_agreement, consensus_genotype,
                                 estimated_chance_agreement, exact_chance_agreement,
                                 mean_over_layers, pairwise_agreement, summed_log_probs)
from fanas_jax.cost import network_cost
from fanas_jax.data.datasets import get_dataset
from fanas_jax.derive import Budget, derive, layer_costs, log_softmax
from fanas_jax.derive_stage import derive_stage, summary
from fanas_jax.genotype import DeriveLimits, Genotype, SearchSpace
from fanas_jax.ops.layers import ORIGINAL_OPS
from fanas_jax.stage import write_json

LIMITS = DeriveLimits(1, 1)
SMALL_OPS = ("local3_h4", "local5_h4", "nonlocal")
BUDGET_OPS = ("local3_h4", "local7_h8", "nonlocal")
BASE = Genotype((("local3_h4",) * 3,) * 5)


def _with_stage1(ops):
  return Genotype((tuple(ops),) + BASE.stages[1:])


# Agreement.


def test_agreement_hand_worked_layer_by_layer():
  # Stage 1 across 3 seeds: layer 1 [a, a, b] -> 1 of 3 pairs agree; layer 2 all
  # local5_h4 -> 1; layer 3 all different -> 0. Every other stage is identical.
  seeds = [_with_stage1(("local3_h4", "local5_h4", "local3_h4")),
           _with_stage1(("local3_h4", "local5_h4", "local5_h4")),
           _with_stage1(("nonlocal", "local5_h4", "nonlocal"))]
  agreement = pairwise_agreement(seeds)
  np.testing.assert_allclose(agreement["stage1"], [1 / 3, 1.0, 0.0])
  for s in range(2, 6):
    np.testing.assert_array_equal(agreement[f"stage{s}"], [1.0, 1.0, 1.0])
  assert mean_over_layers(agreement) == pytest.approx((1 / 3 + 1 + 0 + 12) / 15)
  # 4 seeds [a, a, b, b]: 2 of the 6 pairs agree.
  four = [_with_stage1((op, "local3_h4", "local3_h4"))
          for op in ("local3_h4", "local3_h4", "nonlocal", "nonlocal")]
  assert pairwise_agreement(four)["stage1"][0] == pytest.approx(2 / 6)


def test_agreement_matches_counting_every_pair():
  rng = np.random.default_rng(0)
  seeds = random_genotypes(SearchSpace.uniform(SMALL_OPS), LIMITS, None, 5, rng)
  agreement = pairwise_agreement(seeds)
  for s in range(5):
    for layer in range(3):
      same = [a.stages[s][layer] == b.stages[s][layer]
              for a, b in itertools.combinations(seeds, 2)]
      assert agreement[f"stage{s + 1}"][layer] == pytest.approx(np.mean(same))


def test_agreement_needs_two_seeds():
  with pytest.raises(ValueError, match="at least 2 genotypes, got 1"):
    pairwise_agreement([BASE])


# The consensus.


def _alphas(stage1, rest=None):
  """Alphas whose softmax is the given probabilities (log p), [3, ops] per stage."""
  rest = rest if rest is not None else [[0.6, 0.3, 0.1]] * 3
  return {f"stage{s + 1}": np.log(np.asarray(stage1 if s == 0 else rest))
          for s in range(5)}


def test_consensus_picks_the_op_of_the_summed_log_probabilities():
  # Layer 1: seed A 0.7 / 0.29 / 0.01, seed B 0.01 / 0.29 / 0.7. Each seed picks
  # its own op and the mean probabilities tie ops 1 and 3 (0.355) above op 2 (0.29),
  # but the products are 0.007, 0.0841, 0.007: the consensus is op 2, local5_h4.
  a = _alphas([[0.7, 0.29, 0.01], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
  b = _alphas([[0.01, 0.29, 0.7], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
  space = SearchSpace.uniform(SMALL_OPS)
  assert derive(a, space, "constrained", LIMITS).stages[0][0] == "local3_h4"
  assert derive(b, space, "constrained", LIMITS).stages[0][0] == "nonlocal"
  got = consensus_genotype([a, b], space, "constrained", LIMITS)
  assert got.stages[0] == ("local5_h4", "local3_h4", "local3_h4")
  np.testing.assert_allclose(summed_log_probs([a, b])["stage1"][0],
                             np.log([0.007, 0.0841, 0.007]))


def test_consensus_obeys_the_per_stage_limits():
  # Summed over the seeds, layers 1 and 2 both prefer nonlocal (0.32 and 0.4 against
  # at most 0.04): argmax takes it twice. At most one global op: nonlocal in layer 1
  # scores 0.32 x 0.03 (layer 2's best other op, local3_h4) = 0.0096, in layer 2
  # 0.04 x 0.4 = 0.016, so the consensus is local5_h4, nonlocal, local3_h4.
  a = _alphas([[0.1, 0.1, 0.8], [0.3, 0.2, 0.5], [0.6, 0.3, 0.1]])
  b = _alphas([[0.2, 0.4, 0.4], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
  space = SearchSpace.uniform(SMALL_OPS)
  assert consensus_genotype([a, b], space, "argmax", LIMITS).stages[0] == (
      "nonlocal", "nonlocal", "local3_h4")
  got = consensus_genotype([a, b], space, "constrained", LIMITS)
  assert got.stages[0] == ("local5_h4", "nonlocal", "local3_h4")
  got.check_limits(LIMITS)
  greedy = consensus_genotype([a, b], space, "greedy", LIMITS)
  assert greedy.stages[0] == ("nonlocal", "local3_h4", "local3_h4")  # layer by layer


def _best_summed(seed_alphas, ops, stage):
  """The legal assignment of a stage with the largest summed log-probability."""
  logp = sum(log_softmax(a[f"stage{stage + 1}"]) for a in seed_alphas)
  legal = [c for c in itertools.product(range(len(ops)), repeat=3)
           if not LIMITS.violations([ops[i] for i in c])]
  best = max(legal, key=lambda c: sum(logp[l, c[l]] for l in range(3)))
  return tuple(ops[i] for i in best)


@pytest.mark.parametrize("seed", range(3))
def test_consensus_is_the_exhaustive_optimum_of_the_summed_log_probabilities(seed):
  rng = np.random.default_rng(seed)
  seeds = []
  for _ in range(3):
    alphas = {f"stage{s + 1}": rng.normal(size=(3, 7)) * 2 for s in range(5)}
    alphas["stage1"][:, ORIGINAL_OPS.index("nonlocal")] += 4  # the limit binds
    seeds.append(alphas)
  got = consensus_genotype(seeds, SearchSpace.uniform(), "constrained", LIMITS)
  for s in range(5):
    assert got.stages[s] == _best_summed(seeds, ORIGINAL_OPS, s)


def _every_legal_network(budget):
  """Per legal network of BUDGET_OPS (13 assignments a stage, 13**5 networks): the
  op index of each of its 15 layers and its [params, MACs]."""
  space = SearchSpace.uniform(BUDGET_OPS)
  fixed, per_op = layer_costs(space, budget)
  legal = np.asarray([c for c in itertools.product(range(3), repeat=3)
                      if not LIMITS.violations([BUDGET_OPS[i] for i in c])])
  idx = [g.reshape(-1) for g in np.meshgrid(*[np.arange(len(legal))] * 5, indexing="ij")]
  ops = np.concatenate([legal[i] for i in idx], axis=1)  # [networks, 15]
  costs = fixed + sum(per_op[s, l, ops[:, 3 * s + l]]
                      for s in range(5) for l in range(3))
  return ops, costs


def test_consensus_within_a_budget_is_the_exhaustive_optimum():
  rng = np.random.default_rng(4)
  seeds = [{f"stage{s + 1}": rng.normal(size=(3, 3)) * 2 for s in range(5)}
           for _ in range(3)]
  space = SearchSpace.uniform(BUDGET_OPS)
  sizes = dict(width=32, image_size=32, num_classes=10)
  free = consensus_genotype(seeds, space, "constrained", LIMITS)
  ops, costs = _every_legal_network(Budget(**sizes))
  logp = np.concatenate([sum(log_softmax(a[f"stage{s + 1}"]) for a in seeds)
                         for s in range(5)])  # [15, 3]
  score = logp[np.arange(15), ops].sum(axis=1)
  free_macs = network_cost(free.layer_ops(), 32, 32, num_classes=10).macs
  cheaper = np.flatnonzero(costs[:, 1] < free_macs)
  cap = int(costs[cheaper[np.argsort(score[cheaper])[len(cheaper) // 2]], 1])
  got = consensus_genotype(seeds, space, "constrained", LIMITS,
                           Budget(max_macs=cap, **sizes))
  assert got != free
  assert network_cost(got.layer_ops(), 32, 32, num_classes=10).macs <= cap
  best = ops[np.argmax(np.where(costs[:, 1] <= cap, score, -np.inf))]
  assert got.stages == tuple(tuple(BUDGET_OPS[i] for i in best[3 * s:3 * s + 3])
                             for s in range(5))


# Chance agreement.


def test_chance_hand_worked():
  # The original 7 ops, at most one 7x7 and one global op: of the 256 legal stage
  # assignments, a layer holds each of the 4 unlimited ops in 44, each 7x7 op in 24
  # and nonlocal in 32, so chance = (4 * 44^2 + 2 * 24^2 + 32^2) / 256^2.
  chance = exact_chance_agreement(SearchSpace.uniform(), LIMITS)
  for s in range(5):
    np.testing.assert_allclose(chance[f"stage{s + 1}"], 9920 / 65536, rtol=1e-12)
  # Two ops, at most one 7x7: 4 legal assignments (none or one local7_h4), so a
  # layer holds local7_h4 with probability 1/4: chance 9/16 + 1/16.
  two = SearchSpace.uniform(("local3_h4", "local7_h4"))
  np.testing.assert_allclose(exact_chance_agreement(two, LIMITS)["stage3"], 10 / 16)


@pytest.mark.parametrize("ops,limits", [(ORIGINAL_OPS, DeriveLimits(None, None)),
                                        (("local3_h4", "local5_h4", "local3_h8"), LIMITS),
                                        (ORIGINAL_OPS, DeriveLimits(3, 3))])
def test_chance_is_one_over_k_when_no_limit_binds(ops, limits):
  chance = exact_chance_agreement(SearchSpace.uniform(ops), limits)
  for values in chance.values():
    np.testing.assert_allclose(values, 1 / len(ops), rtol=1e-12)


@pytest.mark.parametrize("ops", [ORIGINAL_OPS, ("local3_h4", "local7_h4")])
def test_chance_against_a_simulation(ops):
  # 20,000 independent pairs of random legal genotypes: per layer the fraction of
  # pairs that agree, within 4.5 binomial standard deviations of the exact value.
  # With two ops that is 0.625 +- 0.016, far from 1/K = 0.5: the limits are seen.
  space, n = SearchSpace.uniform(ops), 20_000
  draws = random_genotypes(space, LIMITS, None, 2 * n, np.random.default_rng(1))
  exact = exact_chance_agreement(space, LIMITS)
  for s in range(5):
    for layer in range(3):
      same = np.mean([draws[2 * i].stages[s][layer] == draws[2 * i + 1].stages[s][layer]
                      for i in range(n)])
      p = exact[f"stage{s + 1}"][layer]
      assert abs(same - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_estimated_chance_within_a_budget_against_enumeration():
  # Uniform over the legal networks that fit: the exact per-layer chance from all
  # 13**5 of them, against the estimate from 10,000 draws (standard error < 0.007).
  sizes = dict(width=32, image_size=32, num_classes=10)
  ops, costs = _every_legal_network(Budget(**sizes))
  cap = int(np.quantile(costs[:, 0], 0.3))
  fits = ops[costs[:, 0] <= cap]
  p = np.stack([np.bincount(fits[:, j], minlength=3) / len(fits) for j in range(15)])
  exact = (p ** 2).sum(axis=1)
  budget = Budget(max_params=cap, **sizes)
  got = chance_agreement(SearchSpace.uniform(BUDGET_OPS), LIMITS, budget)
  assert got.draws == 10_000 and "estimated from 10,000" in got.describe()
  flat = np.concatenate([got.per_layer[f"stage{s + 1}"] for s in range(5)])
  np.testing.assert_allclose(flat, exact, atol=0.02)
  unbudgeted = exact_chance_agreement(SearchSpace.uniform(BUDGET_OPS), LIMITS)
  assert np.max(np.abs(exact - np.concatenate(list(unbudgeted.values())))) > 0.05


def test_estimate_without_a_budget_agrees_with_the_exact_value():
  space = SearchSpace.uniform()
  est = estimated_chance_agreement(space, LIMITS, None, 4000, np.random.default_rng(2))
  exact = chance_agreement(space, LIMITS)
  assert exact.draws == 0 and exact.describe().startswith("exact")
  for name, values in exact.per_layer.items():
    np.testing.assert_allclose(est[name], values, atol=0.02)


# The derive stage.


def _seed_alphas(rng, n_ops):
  return {f"stage{s + 1}": (rng.normal(size=(3, n_ops)) * 2).tolist() for s in range(5)}


def _write_search(tmp_path, result):
  write_json(os.path.join(tmp_path, "search_phase2", "result.json"), result)


def test_derive_stage_writes_the_consensus_of_several_seeds(tmp_path, capsys):
  config = default.get_config()
  rng = np.random.default_rng(5)
  seed_alphas = [_seed_alphas(rng, 7) for _ in range(4)]
  _write_search(tmp_path, {"alphas": seed_alphas[0], "epoch": 3, "num_seeds": 4,
                           "seed_alphas": seed_alphas, "seed_epochs": [3, 2, 3, 1],
                           "seed_genotypes": [BASE.to_dict()] * 4})
  record = derive_stage(config, str(tmp_path), "search_phase2")
  with open(tmp_path / "genotype.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(record))
  seeds = [{k: np.asarray(v) for k, v in a.items()} for a in seed_alphas]
  want = Genotype(tuple(_best_summed(seeds, ORIGINAL_OPS, s) for s in range(5)))
  assert Genotype.from_dict(written["genotype"]) == want
  per_seed = [derive(a, SearchSpace.uniform(), "constrained", LIMITS) for a in seeds]
  assert written["seed_genotypes"] == [g.to_dict() for g in per_seed]
  assert written["consensus"] is True and written["num_seeds"] == 4
  assert written["seed_epochs"] == [3, 2, 3, 1]
  for s in range(5):
    name = f"stage{s + 1}"
    for layer in range(3):
      same = [a.stages[s][layer] == b.stages[s][layer]
              for a, b in itertools.combinations(per_seed, 2)]
      assert written["agreement"][name][layer] == pytest.approx(np.mean(same))
    np.testing.assert_allclose(written["chance_agreement"][name], 9920 / 65536)
  assert written["mean_agreement"] == pytest.approx(
      np.mean([v for values in written["agreement"].values() for v in values]))
  assert written["mean_chance_agreement"] == pytest.approx(9920 / 65536)
  assert written["chance_draws"] == 0
  # The alphas it records derive the consensus again.
  again = derive({k: np.asarray(v) for k, v in written["alphas"].items()},
                 SearchSpace.uniform(), "constrained", LIMITS)
  assert again == want
  out = capsys.readouterr().out
  assert out.count("[derive] seed ") == 4 and "[derive] stage1 agreement " in out
  assert "chance 0.151" in out and "consensus of 4 seeds" in out
  lines = "\n".join(summary(config, str(tmp_path), "derive", record))
  assert "consensus of 4 seeds" in lines and "`train` uses the consensus" in lines
  assert f"mean {written['mean_agreement']:.3f}, against 0.151 by chance" in lines


def test_derive_stage_of_one_seed_is_unchanged(tmp_path):
  """No seed_alphas: the record and genotype.json bytes of a single derive."""
  config = default.get_config()
  alphas = _seed_alphas(np.random.default_rng(6), 7)
  _write_search(tmp_path, {"alphas": alphas, "epoch": 2})
  record = derive_stage(config, str(tmp_path), "search_phase2")
  genotype = derive({k: np.asarray(v) for k, v in alphas.items()}, SearchSpace.uniform(),
                    "constrained", LIMITS)
  spec = get_dataset(config.dataset)
  cost = network_cost(genotype.layer_ops(), config.train.width, config.image_size,
                      in_channels=spec.channels, stem=config.model.stem,
                      num_classes=spec.num_classes)
  want = {"genotype": genotype.to_dict(), "from_stage": "search_phase2", "epoch": 2,
          "select": config.derive.select, "rule": "constrained",
          "limits": {"max_window7": 1, "max_global": 1, "max_params": None,
                     "max_macs": None},
          "cost": cost.totals(), "alphas": alphas}
  with open(tmp_path / "genotype.json", "rb") as f:
    assert f.read() == json.dumps(want, indent=2).encode()
  assert record == want
  lines = summary(config, str(tmp_path), "derive", record)
  assert lines[0] == "## derived architecture (constrained rule, from search_phase2)"
  assert "consensus" not in "\n".join(lines)


def test_derive_stage_of_several_seeds_within_a_budget(tmp_path):
  config = default.get_config()
  config.derive.max_macs = 470_000_000  # the cheapest legal network needs 449,158,272
  rng = np.random.default_rng(7)
  seed_alphas = [_seed_alphas(rng, 7) for _ in range(3)]
  _write_search(tmp_path, {"alphas": seed_alphas[0], "epoch": 1, "num_seeds": 3,
                           "seed_alphas": seed_alphas, "seed_epochs": [1, 1, 1],
                           "seed_genotypes": [BASE.to_dict()] * 3})
  record = derive_stage(config, str(tmp_path), "search_phase2")
  spec = get_dataset(config.dataset)
  for g in [record["genotype"]] + record["seed_genotypes"]:
    macs = network_cost(Genotype.from_dict(g).layer_ops(), config.train.width,
                        config.image_size, in_channels=spec.channels,
                        stem=config.model.stem, num_classes=spec.num_classes).macs
    assert macs <= 470_000_000
  assert record["chance_draws"] == 10_000 and record["chance"].startswith("estimated")
  assert 0 < record["mean_chance_agreement"] < 1
  lines = "\n".join(summary(config, str(tmp_path), "derive", record))
  assert "estimated from 10,000 random legal genotypes within the budget" in lines
