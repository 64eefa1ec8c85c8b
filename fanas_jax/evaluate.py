"""Evaluation arithmetic: sharded prediction and top-1 accuracy (retrieval metrics
live in fanas_jax.retrieval).

Evaluation batches are padded and masked (pipeline.eval_batches), so every example
counts exactly once whatever the batch size or the number of devices.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

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
  for i, batch in enumerate(batches):
    sharded = parallel.shard_batch(batch, mesh)
    out = apply_fn(variables, sharded["image"])
    if i == 0:  # apply_fn compiled (on each process in its own time) before the gather.
      parallel.wait_for_processes("evaluation compiled")
    out, sharded = multihost_utils.process_allgather((out, sharded), tiled=True)
    yield jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, sharded)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  """-> (number correct among real examples, number of real examples)."""
  correct = (np.argmax(logits, axis=-1) == labels) * mask
  return float(correct.sum()), float(mask.sum())
