"""Evaluator plug-ins against numpy on padded batches, their config checks, their
schedule, and evals run every N epochs in the train stage."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fanas_jax.configs import default, quickstart
from fanas_jax import evaluators, experiment, parallel
from fanas_jax.objectives import box_mask, make_objective
from fanas_jax.registry import ConfigError
from tests import small_genotype

IMAGE = 8


def _batches(rng, n, batch, classes=4):
  """n real examples in padded batches of `batch` (mask 0 on padding)."""
  images = rng.normal(size=(n, IMAGE, IMAGE, 1)).astype(np.float32)
  labels = rng.integers(0, classes, size=n).astype(np.int32)
  out = []
  for start in range(0, n, batch):
    real = min(batch, n - start)
    pad = batch - real
    out.append({"image": np.concatenate([images[start:start + real],
                                         np.zeros((pad, IMAGE, IMAGE, 1), np.float32)]),
                "label": np.concatenate([labels[start:start + real], np.zeros(pad, np.int32)]),
                "mask": np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])})
  return images, labels, out


def _net(infer, variables, head, objective=None):
  return evaluators.Net(jax.jit(infer), variables, parallel.make_mesh(1), head, objective)


def test_top1_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  images, labels, batches = _batches(rng, 37, 8)
  w = rng.normal(size=(IMAGE * IMAGE, 4)).astype(np.float32)
  net = _net(lambda v, x: x.reshape(x.shape[0], -1) @ v, w, "classifier")
  got = evaluators.run("top1", net, batches)
  want = np.mean(np.argmax(images.reshape(37, -1) @ w, axis=1) == labels)
  assert got["examples"] == 37 and got["top1"] == pytest.approx(want, abs=1e-12)


def _numpy_recall(emb, labels, ks):
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  sims = e.astype(np.float64) @ e.T.astype(np.float64)
  np.fill_diagonal(sims, -np.inf)
  hits = labels[np.argsort(-sims, axis=1, kind="stable")] == labels[:, None]
  return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def test_recall_at_k_matches_the_metric_on_the_real_examples():
  rng = np.random.default_rng(1)
  images, labels, batches = _batches(rng, 21, 8)
  w = rng.normal(size=(IMAGE * IMAGE, 5)).astype(np.float32)
  net = _net(lambda v, x: {"embedding": x.reshape(x.shape[0], -1) @ v}, w, "embedding")
  got = evaluators.run("recall_at_k", net, batches, ks=(1, 3))
  want = _numpy_recall(images.reshape(21, -1) @ w, labels, (1, 3))
  assert got == pytest.approx({"recall_at_1": want[1], "recall_at_3": want[3],
                               "examples": 21})


def test_reconstruction_is_the_mean_l1_of_restoring_the_corrupted_image():
  rng = np.random.default_rng(2)
  images, _, batches = _batches(rng, 13, 4)
  objective = make_objective("car", ml_collections.ConfigDict(dict(
      image_size=IMAGE, num_boxes=2, box_size=3)))
  net = _net(lambda v, x: v * x, jnp.float32(0.5), "car_decoder", objective)
  got = evaluators.run("reconstruction", net, batches, seed=5)
  mask = np.asarray(box_mask(jax.random.key(5), IMAGE, 2, 3))[None, :, :, None]
  want = np.mean(np.abs(0.5 * images * mask - images))
  assert got["examples"] == 13 and got["l1"] == pytest.approx(want, rel=1e-6)


def test_schedule_runs_every_n_epochs_and_after_the_last():
  spec = evaluators.EvalSpec("val", "top1", "test", 2, {})
  assert [e for e in range(1, 6) if spec.due(e, 5)] == [2, 4, 5]
  last = evaluators.EvalSpec("val", "top1", "test", 0, {})
  assert [e for e in range(1, 6) if last.due(e, 5)] == [5]


@pytest.mark.parametrize("entry, message", [
    (dict(type="top5", split="test"), "Unknown evaluator 'top5' (config key train.evals.v."
     "type); valid choices: recall_at_k, reconstruction, retrieval, top1"),
    (dict(type="recall_at_k", split="test"), "train.evals.v.type='recall_at_k' reads a "
     "embedding head, but this stage's network has a classifier head; valid choices: top1"),
    (dict(type="top1", split=""), "train.evals.v.split='' must name a split"),
    (dict(type="top1", split="test", every_epochs=-1), "train.evals.v.every_epochs=-1 "
     "must be an integer >= 0"),
    (dict(type="top1", split="test", ks=(1,)), "train.evals.v.ks is not an option of top1; "
     "valid keys: every_epochs, split, type"),
])
def test_bad_evals_are_one_line_naming_the_key(entry, message):
  with pytest.raises(ConfigError) as error:
    evaluators.check_config(default.evals(v=entry), "train.evals", "classifier")
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow
def test_train_runs_its_evals_every_n_epochs_and_at_the_end(tmp_path):
  c = quickstart.get_config("tiny")
  c.stages = "train"
  c.train.genotype = small_genotype.write(tmp_path / "genotype")
  c.train.split = "test"
  c.train.epochs = 3
  c.train.evals = default.evals(val=dict(type="top1", split="test", every_epochs=2))
  result = experiment.run(c, str(tmp_path))["train"]
  with open(tmp_path / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "val/top1" in r]
  assert [r["epoch"] for r in evals] == [2, 3]
  assert all(r["val/examples"] == 359 for r in evals)
  # After the last epoch the same network on the same split: the stage's own result.
  assert evals[-1]["val/top1"] == result["test_top1"]
  assert os.listdir(tmp_path / "tensorboard" / "train")
