"""How decided the alphas are, against a direct numpy computation."""
import numpy as np
import pytest

from fanas_jax import decision


def _reference(alpha):
  """Top probability, margin and entropy of each row of softmax(alpha), one by one."""
  out = []
  for row in np.asarray(alpha, np.float64):
    p = np.exp(row) / np.exp(row).sum()
    first, second = sorted(p)[-1], sorted(p)[-2]
    out.append((first, first - second, -sum(q * np.log(q) for q in p)))
  return np.asarray(out)


def test_layer_decisions_match_numpy():
  rng = np.random.default_rng(0)
  alphas = {"stage1": rng.normal(size=(3, 7)), "stage2": 5 * rng.normal(size=(3, 7)),
            "stage3": rng.normal(size=(3, 4))}
  d = decision.layer_decisions(alphas)
  for name, a in alphas.items():
    ref = _reference(a)
    np.testing.assert_allclose(d.top_prob[name], ref[:, 0], rtol=1e-10)
    np.testing.assert_allclose(d.margin[name], ref[:, 1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.entropy[name], ref[:, 2], rtol=1e-10)
    assert d.uniform[name] == pytest.approx(np.log(a.shape[1]))
  stats = decision.decision_stats(d)
  refs = np.concatenate([_reference(alphas[k]) for k in sorted(alphas)])
  uniform = np.mean([np.log(7)] * 6 + [np.log(4)] * 3)
  assert stats["mean_alpha_entropy"] == pytest.approx(refs[:, 2].mean())
  assert stats["uniform_entropy"] == pytest.approx(uniform)
  assert stats["entropy_below_uniform"] == pytest.approx(1 - refs[:, 2].mean() / uniform)
  assert stats["mean_top_prob"] == pytest.approx(refs[:, 0].mean())
  assert stats["mean_margin"] == pytest.approx(refs[:, 1].mean())
  assert stats["decided_layers"] == int((refs[:, 1] > 0.1).sum())
  assert stats["layers"] == 9


def test_undecided_and_decided_layers():
  alphas = {"stage1": np.array([[0.0] * 7, [10.0] + [0.0] * 6, [1.0, 1.0] + [0.0] * 5])}
  d = decision.layer_decisions(alphas)
  np.testing.assert_allclose(d.entropy["stage1"][0], np.log(7))
  np.testing.assert_allclose(d.top_prob["stage1"][0], 1 / 7)
  assert d.margin["stage1"][0] == pytest.approx(0.0, abs=1e-12)   # a tie: undecided
  assert d.margin["stage1"][1] > 0.99                                 # one op has it
  assert d.margin["stage1"][2] == pytest.approx(0.0, abs=1e-12)   # two ops tie at the top
  stats = decision.decision_stats(d)
  assert stats["decided_layers"] == 1
  text = decision.describe(stats)
  assert "1/3 layers with top-op margin > 0.1" in text and "uniform 1.9459" in text


def test_per_layer_scalars_name_every_layer():
  d = decision.layer_decisions({"stage1": np.zeros((3, 7)), "stage2": np.ones((3, 7))})
  scalars = decision.per_layer_scalars(d)
  assert len(scalars) == 3 * 2 * 3
  assert scalars["top_prob/stage2/layer3"] == pytest.approx(1 / 7)
  assert scalars["margin/stage1/layer1"] == pytest.approx(0.0, abs=1e-12)
  assert scalars["entropy/stage1/layer2"] == pytest.approx(np.log(7))
