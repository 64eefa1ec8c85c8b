"""The whole pipeline through the command line, at tiny sizes, and its outputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fanas_jax.configs import default
from fanas_jax.genotype import Genotype, DeriveLimits
from tests.conftest import ROOT


def _run(workdir, *overrides):
  cmd = [sys.executable, "-m", "fanas_jax.main", "--config=configs/quickstart.py:tiny",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2700)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.mark.slow
def test_pipeline_writes_every_output(finished_run):
  workdir, proc = finished_run
  for path in ["config.json", "genotype.json", "summary.md", "metrics.jsonl",
               "search_phase1/genotype.json", "search_phase1/alpha_history.json",
               "search_phase1/alpha_heatmap.png", "search_phase2/genotype.json",
               "search_phase2/alpha_history.json", "train/result.json",
               "retrieval/result.json", "search_phase1/checkpoints", "train/checkpoints"]:
    assert os.path.exists(os.path.join(workdir, path)), path
  assert os.path.getsize(os.path.join(workdir, "genotype.png")) > 10_000
  assert os.listdir(os.path.join(workdir, "tensorboard", "train"))

  record = json.load(open(os.path.join(workdir, "genotype.json")))
  genotype = Genotype.from_dict(record["genotype"])
  assert all(op in default.TINY_CANDIDATES[s] for s, ops in enumerate(genotype.stages)
             for op in ops)
  assert [len(ops) for ops in genotype.stages] == [default.TINY_LAYERS_PER_STAGE] * 5
  genotype.check_limits(DeriveLimits(1, 1))
  assert record["rule"] == "constrained" and record["from_stage"] == "search_phase2"

  # Phase 2 started from phase 1's alphas.
  phase1 = json.load(open(os.path.join(workdir, "search_phase1", "result.json")))
  history2 = json.load(open(os.path.join(workdir, "search_phase2", "alpha_history.json")))
  assert phase1["final_alphas"].keys() == history2[0]["alphas"].keys()

  train = json.load(open(os.path.join(workdir, "train", "result.json")))
  assert 0.0 <= train["test_top1"] <= 1.0 and train["test_examples"] == 359
  retrieval = json.load(open(os.path.join(workdir, "retrieval", "result.json")))
  assert set(retrieval["recall"]) == {"1", "2", "4", "8"}
  r = [retrieval["recall"][k] for k in ("1", "2", "4", "8")]
  assert r == sorted(r) and retrieval["test_classes"] == [5, 6, 7, 8, 9]

  stages = {json.loads(l)["stage"] for l in open(os.path.join(workdir, "metrics.jsonl"))}
  search = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
            if '"search_phase1"' in l]
  probs = [search[-1][f"alpha/stage1/layer1/{op}"] for op in default.TINY_CANDIDATES[0]]
  assert abs(sum(probs) - 1) < 1e-6 and 0 < search[-1]["entropy/stage1/layer1"] <= np.log(2)
  # A one-op layer is decided from the start: entropy 0, top-op probability 1.
  assert search[-1]["entropy/stage5/layer1"] == 0 and search[-1]["top_prob/stage5/layer1"] == 1
  # How decided: the logged top-op probability and margin are those of the logged mixture.
  top2 = sorted(probs)[-2:]
  assert abs(search[-1]["top_prob/stage1/layer1"] - top2[1]) < 1e-6
  assert abs(search[-1]["margin/stage1/layer1"] - (top2[1] - top2[0])) < 1e-6
  assert 0 <= search[-1]["decided_layers"] <= search[-1]["layers"] == 5
  # The tiny run's 22 alpha steps ask for more than the cap: 1000 x a_lr.
  assert ("alpha lr 0.3 x 22 alpha steps = 6.6 (a_lr=0.0003 x 1000 = alpha_lr_scale_max;"
          in proc.stdout)
  assert "[search_phase2] epoch 1: mean entropy" in proc.stdout
  assert stages == {"search_phase1", "search_phase2", "train", "retrieval"}
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "test top-1" in summary and "Recall@1" in summary
  assert summary.count("layers with top-op margin > 0.1") == 2


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_keeps_results(finished_run):
  workdir, _ = finished_run
  before = open(os.path.join(workdir, "train", "result.json")).read()
  lines = sum(1 for _ in open(os.path.join(workdir, "metrics.jsonl")))
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished earlier") == 5
  assert open(os.path.join(workdir, "train", "result.json")).read() == before
  assert sum(1 for _ in open(os.path.join(workdir, "metrics.jsonl"))) == lines


@pytest.mark.slow
def test_rerun_with_another_config_is_refused(finished_run):
  workdir, _ = finished_run
  proc = _run(workdir, "--config.train.epochs=2")
  assert proc.returncode == 2
  assert "different config" in proc.stderr and "train.epochs: 1 -> 2" in proc.stderr


@pytest.mark.slow
def test_a_run_of_fewer_stages_keeps_every_finished_stage_in_the_summary(finished_run):
  """`stages` is not pinned: a later run may pick some stages (or add new ones), and
  summary.md still has a section for each stage finished in the workdir."""
  workdir, _ = finished_run
  proc = _run(workdir, "--config.stages=derive")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished earlier") == 1
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "test top-1" in summary and "Recall@1" in summary
  assert summary.count("layers with top-op margin > 0.1") == 2
  assert "- derive: " in summary and "- train: " not in summary  # this run's timings


@pytest.mark.parametrize("override, message", [
    ("--config.trian.epochs=2", "unknown config key 'trian'"),
    ("--config.dataset=cifar", "valid choices: caltech_birds2011, cars196, cifar10, cifar100, "
     "fgvc_aircraft, imagenet100_32, imagenet2012, sklearn_digits, stanford_online_products"),
    ("--config.search.candidates=('local3_h4','conv3')", "valid choices: axial_h4"),
    ("--config.image_size=10", "image_size=10 cannot pass through the 5-stage network"),
    ("--config.derive.rule=exact", "valid choices: argmax, constrained, greedy"),
    ("--config.derive.max_params=1000", "No derivable network fits the budget"),
    ("--config.train.genotype=runs/none/genotype.json",
     "train.genotype='runs/none/genotype.json': no such genotype file"),
])
def test_bad_input_fails_before_compute_with_one_line(tmp_path, override, message):
  proc = _run(str(tmp_path / "w"), override)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("fanas_jax: error:"), proc.stderr
  assert message in lines[0]
  assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.slow
def test_batch_not_divisible_by_devices_fails_before_compute(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "fanas_jax.main", "--config=configs/quickstart.py:tiny",
         f"--workdir={tmp_path / 'w'}", "--config.train.batch_size=30"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 2
  assert "train.batch_size=30 is not divisible by the device count 8" in proc.stderr
