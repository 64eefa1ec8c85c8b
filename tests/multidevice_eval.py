"""Evaluation through the real padded, sharded path, and the same metrics from a
plain numpy loop over every example.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.multidevice_eval EVAL_BATCH OUT.npz

The model is a fixed random linear map of the pixels (to 10 logits, and to a
16-d embedding), so its predictions vary from example to example and numpy
computes it independently. The digits test split (359 examples) is not a multiple
of the global batch, so the last batch is padded; tests/test_parallel.py checks
that top-1 and Recall@K equal the loop's exactly.
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from fanas_jax import evaluate, host, parallel, retrieval
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset

IMAGE = 8
KS = (1, 2, 4, 8)


def _numpy_recall(embeddings: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Each example queries all others by cosine similarity, one query at a time."""
  e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  hits = 0
  for q in range(len(e)):
    sims = [(-float(e[q] @ e[j]), j) for j in range(len(e)) if j != q]
    nearest = [j for _, j in sorted(sims)[:k]]
    hits += any(labels[j] == labels[q] for j in nearest)
  return hits / len(e)


def main(eval_batch: str, path: str) -> None:
  spec = get_dataset("sklearn_digits")
  data = pipeline.load_split("sklearn_digits", "test")
  rng = np.random.default_rng(0)
  variables = {"logits": rng.normal(size=(IMAGE * IMAGE, 10)).astype(np.float32),
               "embedding": rng.normal(size=(IMAGE * IMAGE, 16)).astype(np.float32)}
  apply = jax.jit(lambda v, x: {k: x.reshape(x.shape[0], -1) @ w for k, w in v.items()})

  correct = total = 0.0
  embeddings, labels = [], []
  batches = pipeline.eval_batches(
      data, batch_size=parallel.process_batch_size(int(eval_batch)),
      preprocess=pipeline.Preprocess(IMAGE, spec.mean, spec.std))
  for out, batch in evaluate.predict(apply, variables, batches, parallel.make_mesh()):
    batch_labels, mask = batch["label"], batch["mask"]
    c, n = evaluate.top1_accuracy(out["logits"], batch_labels, mask)
    correct, total = correct + c, total + n
    embeddings.append(out["embedding"][mask > 0])
    labels.append(batch_labels[mask > 0])
  recall = retrieval.recall_at_k(np.concatenate(embeddings), np.concatenate(labels), KS,
                                 block=16, mesh=parallel.make_mesh())

  loop_predictions, loop_embeddings, loop_labels = [], [], []
  for i in range(len(data)):
    record = data[i]
    x = pipeline.Preprocess(IMAGE, spec.mean, spec.std)(record["image"]).reshape(-1)
    loop_predictions.append(int(np.argmax(x @ variables["logits"])))
    loop_embeddings.append(x @ variables["embedding"])
    loop_labels.append(record["label"])
  loop_embeddings, loop_labels = np.stack(loop_embeddings), np.asarray(loop_labels)
  np.savez(path, devices=jax.device_count(), correct=correct, total=total,
           recall=np.asarray([recall[k] for k in KS]),
           loop_correct=int(np.sum(np.asarray(loop_predictions) == loop_labels)),
           loop_total=len(data), loop_predictions=np.asarray(loop_predictions),
           loop_recall=np.asarray([_numpy_recall(loop_embeddings, loop_labels, k)
                                   for k in KS]))


if __name__ == "__main__":
  host.collect_garbage_less_often()
  main(*sys.argv[1:])
