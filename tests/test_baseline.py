"""The random-architecture baseline: legal uniform draws, rank statistics against
numpy/scipy, and a tiny stage run that ranks the trained genotype."""
import collections
import json
import math
import os
import re

import numpy as np
import pytest
from scipy import stats

from fanas_jax.configs import quickstart
from fanas_jax import experiment
from fanas_jax.baseline import legal_stage_choices, random_genotypes, rank_stats
from fanas_jax.cost import network_cost
from fanas_jax.derive import Budget
from fanas_jax.genotype import DeriveLimits, SearchSpace
from fanas_jax.ops.layers import ORIGINAL_OPS


def test_legal_choices_count_matches_the_combinatorics():
  # 4 unlimited ops, two 7x7 (at most one), one global (at most one), 3 layers:
  # sum over a 7x7 and g global layers of C(3,a) C(3-a,g) 2^a 4^(3-a-g).
  want = sum(math.comb(3, a) * math.comb(3 - a, g) * 2 ** a * 4 ** (3 - a - g)
             for a in (0, 1) for g in (0, 1))
  assert len(legal_stage_choices(ORIGINAL_OPS, DeriveLimits(1, 1), 3)) == want == 256
  assert len(legal_stage_choices(ORIGINAL_OPS, DeriveLimits(None, None), 3)) == 7 ** 3
  two = sum(math.comb(2, a) * math.comb(2 - a, g) * 2 ** a * 4 ** (2 - a - g)
            for a in (0, 1) for g in (0, 1))
  assert len(legal_stage_choices(ORIGINAL_OPS, DeriveLimits(1, 1), 2)) == two == 44
  assert len(legal_stage_choices(ORIGINAL_OPS, DeriveLimits(1, 1), 1)) == 7


def test_random_genotypes_are_legal_uniform_and_seeded():
  space, limits = SearchSpace.uniform(), DeriveLimits(1, 1)
  draws = random_genotypes(space, limits, None, 4000, np.random.default_rng(0))
  for g in draws:
    g.check_limits(limits)
  counts = collections.Counter(g.stages[0] for g in draws)
  assert len(counts) > 240  # nearly all 256 legal assignments of stage 1 appear
  # Uniform over the 256: a chi-square test at the 0.1% level.
  observed = np.asarray([counts.get(tuple(ORIGINAL_OPS[i] for i in c), 0)
                         for c in legal_stage_choices(ORIGINAL_OPS, limits, 3)])
  assert stats.chisquare(observed).pvalue > 1e-3
  again = random_genotypes(space, limits, None, 5, np.random.default_rng(0))
  assert again == draws[:5]


def _macs(genotype):
  return network_cost(genotype.layer_ops(), 16, 8, in_channels=1, num_classes=10,
                      preprocess_affine=True).macs


def test_random_genotypes_fit_the_budget():
  space = SearchSpace.uniform()
  budget = Budget(max_params=None, max_macs=None, width=16, image_size=8, in_channels=1,
                  num_classes=10)
  macs = [_macs(g) for g in random_genotypes(space, DeriveLimits(1, 1), budget, 40,
                                    np.random.default_rng(1))]
  cap = int(np.median(macs))
  capped = Budget(max_macs=cap, width=16, image_size=8, in_channels=1, num_classes=10)
  for g in random_genotypes(space, DeriveLimits(1, 1), capped, 20, np.random.default_rng(2)):
    assert _macs(g) <= cap


@pytest.mark.parametrize("searched, random", [
    (0.9, [0.5, 0.95, 0.7, 0.9, 0.8]), (0.1, [0.2, 0.3]), (1.0, [0.4]), (0.5, [0.5, 0.5])])
def test_rank_stats_match_scipy_and_numpy(searched, random):
  r = rank_stats(searched, random)
  scores = np.asarray([searched] + random)
  assert r["rank"] == stats.rankdata(-scores, method="average")[0]
  assert r["of"] == len(random) + 1
  assert r["beats"] == pytest.approx(stats.percentileofscore(random, searched, "mean") / 100)
  assert r["mean"] == pytest.approx(np.mean(random))
  assert r["std"] == pytest.approx(np.std(random, ddof=1) if len(random) > 1 else 0.0)
  assert (r["min"], r["max"]) == (min(random), max(random))


@pytest.mark.slow
def test_baseline_stage_ranks_the_trained_genotype(tmp_path):
  ops = ("local3_h4", "local5_h4", "nonlocal")
  genotype = tmp_path / "g.json"
  # One layer per stage, as the random genotypes of the tiny search space.
  genotype.write_text(json.dumps({f"stage{s}": ["local3_h4"] for s in range(1, 6)}))
  c = quickstart.get_config("tiny")
  c.stages = "train,baseline"
  c.search.candidates = ops
  c.train.update(dict(genotype=str(genotype), width=16, epochs=1))
  c.baseline.num_genotypes = 2
  workdir = str(tmp_path / "run")
  results = experiment.run(c, workdir)
  base = results["baseline"]
  scores = [r["test_top1"] for r in base["random"]]
  assert base["rank"] == rank_stats(results["train"]["test_top1"], scores)
  for k, r in enumerate(base["random"], 1):
    sub = json.load(open(os.path.join(workdir, "baseline", f"random{k}", "train",
                                      "result.json")))
    assert sub["genotype"] == r["genotype"] and sub["test_top1"] == r["test_top1"]
    assert sub["width"] == 16 and sub["epochs"] == 1
    assert all(op in ops for stage in r["genotype"].values() for op in stage)
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "random-architecture baseline" in summary and "of 3" in summary
  # A rerun reuses every finished training.
  assert experiment.run(c, workdir)["baseline"] == base


@pytest.mark.parametrize("change, message", [
    (dict(num_genotypes=0), "baseline.num_genotypes=0 must be at least 1"),
    (dict(candidates=("nonlocal",), layers_per_stage=2),
     "No assignment of ['nonlocal'] to stage1 satisfies"),
])
def test_bad_baseline_config_fails_before_compute(change, message):
  from fanas_jax.config_checks import ConfigError, validate
  c = quickstart.get_config("tiny")
  c.stages = "train,baseline"
  c.train.genotype = "original"
  validate(c)
  if "candidates" in change:
    c.search.update(change)
  else:
    c.baseline.update(change)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)
