"""Recall@K, top-1 and the proxy-anchor loss against plain numpy references."""
import jax.numpy as jnp
import numpy as np
import pytest

from fanas_jax.evaluate import top1_accuracy
from fanas_jax.objectives import box_mask, proxy_anchor_loss
from fanas_jax.retrieval import recall_at_k


def _recall_loop(emb, labels, k):
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  hits = 0
  for i in range(len(emb)):
    sims = [(float(emb[i] @ emb[j]), j) for j in range(len(emb)) if j != i]
    sims.sort(key=lambda t: -t[0])
    hits += any(labels[j] == labels[i] for _, j in sims[:k])
  return hits / len(emb)


def test_recall_at_k_matches_loop():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(40, 5))
  labels = rng.integers(0, 4, size=40)
  got = recall_at_k(emb, labels, [1, 2, 4, 8])
  for k in (1, 2, 4, 8):
    assert got[k] == pytest.approx(_recall_loop(emb, labels, k))
  assert got[1] <= got[2] <= got[4] <= got[8]


def test_recall_excludes_the_query_itself():
  emb = np.eye(4)  # every other point is orthogonal: no neighbour shares a label
  assert recall_at_k(emb, np.arange(4), [1])[1] == 0.0
  assert recall_at_k(np.ones((2, 3)), np.zeros(2), [1])[1] == 1.0


def test_top1_counts_only_real_examples():
  logits = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
  labels = np.array([0, 0, 0, 1])
  mask = np.array([1, 1, 0, 0], np.float32)
  assert top1_accuracy(logits, labels, mask) == (1.0, 2.0)


def _proxy_anchor_numpy(emb, proxies, labels, alpha, margin):
  sim = emb @ proxies.T
  pos_terms, neg_terms = [], []
  for p in range(len(proxies)):
    pos = [sim[i, p] for i in range(len(emb)) if labels[i] == p]
    neg = [sim[i, p] for i in range(len(emb)) if labels[i] != p]
    if pos:
      pos_terms.append(np.log(1 + sum(np.exp(-alpha * (s - margin)) for s in pos)))
    neg_terms.append(np.log(1 + sum(np.exp(alpha * (s + margin)) for s in neg)))
  return np.mean(pos_terms) + np.sum(neg_terms) / len(proxies)


def test_proxy_anchor_matches_numpy():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(12, 6))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  proxies = rng.normal(size=(5, 6))
  proxies /= np.linalg.norm(proxies, axis=1, keepdims=True)
  labels = rng.integers(0, 3, size=12)  # proxies 3 and 4 have no positives
  got = proxy_anchor_loss(jnp.asarray(emb), jnp.asarray(proxies), jnp.asarray(labels),
                          32.0, 0.1)
  want = _proxy_anchor_numpy(emb, proxies, labels, 32.0, 0.1)
  assert float(got) == pytest.approx(want, rel=1e-4)


def test_box_mask_covers_boxes_inside_the_image():
  import jax
  for seed in range(20):
    m = np.asarray(box_mask(jax.random.key(seed), 16, 4, 4))
    assert m.shape == (16, 16) and set(np.unique(m)) <= {0.0, 1.0}
    zeros = 16 * 16 - m.sum()
    assert 16 <= zeros <= 4 * 16  # at least one full box, at most four disjoint ones
    # Every zero pixel lies in a fully-zero 4x4 box inside the image.
    for r, c in zip(*np.nonzero(m == 0)):
      assert any(np.all(m[r0:r0 + 4, c0:c0 + 4] == 0)
                 for r0 in range(max(0, r - 3), min(r, 12) + 1)
                 for c0 in range(max(0, c - 3), min(c, 12) + 1))
  with pytest.raises(ValueError, match="exceeds"):
    box_mask(jax.random.key(0), 4, 1, 5)
