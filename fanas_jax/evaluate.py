"""Evaluation: top-1 accuracy and zero-shot retrieval Recall@K.

Evaluation batches are padded and masked (pipeline.eval_batches), so every example
counts exactly once whatever the batch size or the number of devices.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fanas_jax import parallel
from fanas_jax.data import pipeline


def predict(apply_fn: Callable, variables: Any, ds: Any, *, batch_size: int,
            preprocess: pipeline.Preprocess, mesh: Any) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """Yields (outputs, labels, mask) per batch as host numpy arrays, all processes."""
  local = parallel.process_batch_size(batch_size)
  batches = pipeline.eval_batches(
      ds, batch_size=local, preprocess=preprocess, shard_index=jax.process_index(), shard_count=jax.process_count())
  for batch in batches:
    sharded = parallel.shard_batch(batch, mesh)
    out = apply_fn(variables, sharded["image"])
    out, labels, mask = multihost_utils.process_allgather(
        (out, sharded["label"], sharded["mask"]), tiled=True)
    yield jax.tree.map(np.asarray, out), np.asarray(labels), np.asarray(mask)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  """-> (number correct among real examples, number of real examples)."""
  correct = (np.argmax(logits, axis=-1) == labels) * mask
  return float(correct.sum()), float(mask.sum())


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray,
                ks: Sequence[int]) -> dict[int, float]:
  """Recall@K of deep metric learning: every example queries all the others.

  A query scores 1 at K when one of its K nearest neighbours by cosine similarity
  (itself excluded) has its label. Embeddings are L2-normalised here.
  """
  if len(embeddings) < 2:
    raise ValueError("Recall@K needs at least two examples.")
  e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  sims = e @ e.T
  np.fill_diagonal(sims, -np.inf)
  kmax = min(max(ks), len(e) - 1)
  nearest = np.argsort(-sims, axis=1, kind="stable")[:, :kmax]
  hits = labels[nearest] == labels[:, None]
  return {int(k): float(np.mean(hits[:, :k].any(axis=1))) for k in ks}
