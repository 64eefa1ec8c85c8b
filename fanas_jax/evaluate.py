"""Evaluation arithmetic: sharded prediction, top-1 accuracy, zero-shot Recall@K.

Evaluation batches are padded and masked (pipeline.eval_batches), so every example
counts exactly once whatever the batch size or the number of devices.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fanas_jax import parallel


def predict(apply_fn: Callable, variables: Any, batches: Iterable[dict[str, np.ndarray]],
            mesh: Any) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
  """Yields (outputs, batch) per global batch as host numpy arrays, on all processes.

  `batches` are this process's padded evaluation batches (pipeline.eval_batches);
  `apply_fn(variables, images)` runs on the mesh, and outputs and the batch (with
  its 'label' and 'mask') are gathered from every process.
  """
  for batch in batches:
    sharded = parallel.shard_batch(batch, mesh)
    out = apply_fn(variables, sharded["image"])
    out, sharded = multihost_utils.process_allgather((out, sharded), tiled=True)
    yield jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, sharded)


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
