"""How decided a search's architecture is, layer by layer (SPEC.md 7).

A layer has decided when softmax(alpha) puts clearly more weight on one op than on
any other: its top op's probability, that op's margin over the runner-up and the
mixture's entropy (ln(n_ops) when undecided, 0 when one op has all the weight) say
how far it is from that. The search logs them every epoch and its summary states them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from fanas_jax.derive import layer_entropy, log_softmax

# A layer whose top op leads the runner-up by more than this probability counts as
# decided in the summary's count.
DECIDED_MARGIN = 0.1


@dataclasses.dataclass(frozen=True)
class LayerDecisions:
  """Per stage name, one value per layer: [layers] arrays."""
  top_prob: dict[str, np.ndarray]
  margin: dict[str, np.ndarray]
  entropy: dict[str, np.ndarray]
  uniform: dict[str, float]   # ln(n_ops): the entropy of an undecided layer

  def flat(self, field: str) -> np.ndarray:
    """One field's values over all layers, stages in name order."""
    return np.concatenate([getattr(self, field)[k] for k in sorted(self.entropy)])

  def mean_uniform(self) -> float:
    return float(np.mean(np.concatenate(
        [np.full(len(self.entropy[k]), self.uniform[k]) for k in sorted(self.entropy)])))


def layer_decisions(alphas: Mapping[str, np.ndarray]) -> LayerDecisions:
  """Top-op probability, margin over the second op and entropy of every layer."""
  top, margin, uniform = {}, {}, {}
  for name, a in alphas.items():
    probs = np.sort(np.exp(log_softmax(np.asarray(a))), axis=-1)
    top[name] = probs[:, -1]
    margin[name] = probs[:, -1] - probs[:, -2] if probs.shape[-1] > 1 else probs[:, -1]
    uniform[name] = float(np.log(probs.shape[-1]))
  return LayerDecisions(top, margin, layer_entropy(alphas), uniform)


def decision_stats(d: LayerDecisions) -> dict[str, float]:
  """The means over all layers and the count of decided layers, for logs and results."""
  entropy, uniform = float(np.mean(d.flat("entropy"))), d.mean_uniform()
  margin = d.flat("margin")
  return {"mean_alpha_entropy": entropy, "uniform_entropy": uniform,
          "entropy_below_uniform": 1.0 - entropy / uniform if uniform else 0.0,
          "mean_top_prob": float(np.mean(d.flat("top_prob"))),
          "mean_margin": float(np.mean(margin)),
          "decided_layers": int(np.sum(margin > DECIDED_MARGIN)),
          "layers": int(margin.size)}


def per_layer_scalars(d: LayerDecisions) -> dict[str, float]:
  """'entropy/stageS/layerL', 'top_prob/...' and 'margin/...' scalars for the metrics."""
  out = {}
  for field in ("entropy", "top_prob", "margin"):
    for name, values in getattr(d, field).items():
      out.update({f"{field}/{name}/layer{l + 1}": float(v) for l, v in enumerate(values)})
  return out


def describe(stats: Mapping[str, Any]) -> str:
  """'mean entropy 1.62 nats (uniform 1.95, 17% below), 9/15 layers with top-op
  margin > 0.1, mean top-op probability 0.31, mean margin 0.12'."""
  return (f"mean entropy {stats['mean_alpha_entropy']:.4f} nats (uniform "
          f"{stats['uniform_entropy']:.4f}, {100 * stats['entropy_below_uniform']:.1f}% "
          f"below), {stats['decided_layers']}/{stats['layers']} layers with top-op "
          f"margin > {DECIDED_MARGIN:g}, mean top-op probability "
          f"{stats['mean_top_prob']:.3f}, mean margin {stats['mean_margin']:.3f}")
