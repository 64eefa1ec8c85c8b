"""A stage interrupted after an epoch resumes from its checkpoint to the same result."""
import json
import os

import pytest

from configs import quickstart
from fanas_jax import experiment, logging_utils


def _config():
  c = quickstart.get_config("tiny")
  c.stages = "train"
  c.train.genotype = "original"
  c.train.epochs = 2
  return c


def _epoch_metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  keep = ("loss", "accuracy", "grad_norm", "test_top1")
  return [{k: r[k] for k in keep if k in r} for r in rows]


def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  straight = str(tmp_path / "straight")
  experiment.run(_config(), straight)

  resumed = str(tmp_path / "resumed")
  original_write = logging_utils.MetricWriter.write
  calls = {"n": 0}

  def write_then_die(self, step, metrics):
    calls["n"] += 1
    if calls["n"] == 2:  # epoch 2 finished, its checkpoint not yet written
      raise KeyboardInterrupt("simulated kill")
    original_write(self, step, metrics)

  monkeypatch.setattr(logging_utils.MetricWriter, "write", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    experiment.run(_config(), resumed)
  assert not os.path.exists(os.path.join(resumed, "train", "result.json"))
  monkeypatch.setattr(logging_utils.MetricWriter, "write", original_write)
  experiment.run(_config(), resumed)

  want = _epoch_metrics(straight)
  got = _epoch_metrics(resumed)
  assert got[0] == want[0]          # epoch 1, before the kill
  assert got[1:] == want[1:]        # epoch 2 redone from the epoch-1 checkpoint, and test
  assert json.load(open(os.path.join(resumed, "train", "result.json")))["test_top1"] == \
      json.load(open(os.path.join(straight, "train", "result.json")))["test_top1"]
