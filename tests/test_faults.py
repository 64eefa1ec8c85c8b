"""Faults a long run meets, through the command line: each ends where the uninterrupted
run ends, bitwise.

SIGKILL mid-search and mid-training, SIGTERM (preemption), a truncated newest
checkpoint, a NaN loss (stop or roll back), and which checkpoints stay. Runs are
tiny (the digits' test split, 5 search and 6 training steps per epoch) and share a
persistent XLA compilation cache (tests/conftest.py), so only the uninterrupted
reference run compiles, and only when the cache does not hold its programs yet.
"""
import fcntl
import glob
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from fanas_jax.configs import quickstart
from fanas_jax import config_checks, logging_utils
from fanas_jax.train import load_final_variables
from tests import cli

SEARCH_STEPS_PER_EPOCH = 5   # 179 images per half of the test split, batch 32
TRAIN_STEPS_PER_EPOCH = 6    # 359 images, batch 56
EPOCHS = 3
CONFIG = ("--config=configs/quickstart.py:tiny",
          "--config.search_phase1.split=test", f"--config.search_phase1.epochs={EPOCHS}",
          "--config.train.split=test", f"--config.train.epochs={EPOCHS}",
          "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2",
          "--config.checkpoint.keep_every_epochs=2")
PIPELINE = "--config.stages=search_phase1,derive,train"


class Run(cli.Run):
  """A run of CONFIG with these overrides."""

  def __init__(self, cache_dir, workdir, *overrides, **kwargs):
    super().__init__(cache_dir, workdir, *CONFIG, *overrides, **kwargs)


def _assert_same_training(workdir, reference):
  assert cli.read_json(workdir, "train/result.json") == \
      cli.read_json(reference, "train/result.json")
  got, want = (load_final_variables(w, "train") for w in (workdir, reference))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert cli.metrics(workdir, {"train"}) == cli.metrics(reference, {"train"})


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """(the tests' compilation cache, uninterrupted reference workdir), made once per
  test session even when xdist spreads this module's tests over several workers."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # Shared by the session's workers.
  root = root / "faults_shared"
  root.mkdir(exist_ok=True)
  cache, reference = os.environ["JAX_COMPILATION_CACHE_DIR"], str(root / "reference")
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(reference, "train", "result.json")):
      shutil.rmtree(reference, ignore_errors=True)
      Run(cache, reference, PIPELINE).finish()
    fcntl.flock(lock, fcntl.LOCK_UN)
  return cache, reference


def _with_derived_genotype(workdir, reference):
  """A fresh workdir holding the reference's derive result, for train-only runs."""
  shutil.copytree(os.path.join(reference, "derive"), os.path.join(workdir, "derive"))
  return workdir


@pytest.mark.slow
def test_checkpoints_kept_are_the_newest_and_the_periodic_ones(shared):
  _, reference = shared
  # Saved every 2 steps and at each epoch end; keep=2 newest, plus every 2nd epoch end.
  assert cli.steps(os.path.join(reference, "search_phase1", "checkpoints")) == \
      [2 * SEARCH_STEPS_PER_EPOCH, 14, 15]
  assert cli.steps(os.path.join(reference, "train", "checkpoints")) == \
      [2 * TRAIN_STEPS_PER_EPOCH, 16, 18]


@pytest.mark.slow
def test_sigkill_mid_search_and_mid_training_resumes_bitwise(shared, tmp_path):
  cache, reference = shared
  workdir = str(tmp_path / "killed")
  run = Run(cache, workdir, PIPELINE)
  cli.wait_for_checkpoint(run, os.path.join(workdir, "search_phase1", "checkpoints"), 2)
  run.proc.kill()
  assert run.wait() == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "search_phase1", "result.json"))

  run = Run(cache, workdir, PIPELINE)
  step = cli.wait_for_checkpoint(run, os.path.join(workdir, "train", "checkpoints"), 4)
  run.proc.kill()
  assert run.wait() == -signal.SIGKILL
  assert "[search_phase1] resuming from checkpoint" in run.output
  assert step < EPOCHS * TRAIN_STEPS_PER_EPOCH
  assert not os.path.exists(os.path.join(workdir, "train", "result.json"))

  output = Run(cache, workdir, PIPELINE).finish()
  assert "[train] resuming from checkpoint" in output
  cli.assert_same_search(workdir, reference)
  assert cli.read_json(workdir, "genotype.json") == cli.read_json(reference, "genotype.json")
  _assert_same_training(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_the_rerun_finishes_bitwise(shared, tmp_path):
  cache, reference = shared
  workdir = str(tmp_path / "preempted")
  stages = "--config.stages=search_phase1,derive"
  ckpt_dir = os.path.join(workdir, "search_phase1", "checkpoints")
  run = Run(cache, workdir, stages)
  cli.wait_for_checkpoint(run, ckpt_dir, 2)
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 0, run.output[-4000:]
  found = re.search(r"\[search_phase1\] preempted at step (\d+): saved checkpoint (\d+) in "
                    r"(\S+); rerun the same command to resume", run.output)
  assert found, run.output[-4000:]
  step = int(found.group(1))
  assert found.group(2) == found.group(1) and found.group(3) == ckpt_dir
  assert step in cli.steps(ckpt_dir) and step < EPOCHS * SEARCH_STEPS_PER_EPOCH
  assert not os.path.exists(os.path.join(workdir, "search_phase1", "result.json"))
  assert not os.path.exists(os.path.join(workdir, "derive"))  # Later stages did not run.

  output = Run(cache, workdir, stages).finish()
  assert f"[search_phase1] resuming from checkpoint {step} " in output
  cli.assert_same_search(workdir, reference)
  assert cli.read_json(workdir, "derive/result.json") == \
      cli.read_json(reference, "derive/result.json")


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    shared, tmp_path):
  cache, reference = shared
  workdir = _with_derived_genotype(str(tmp_path / "truncated"), reference)
  ckpt_dir = os.path.join(workdir, "train", "checkpoints")
  run = Run(cache, workdir, "--config.stages=train")
  cli.wait_for_checkpoint(run, ckpt_dir, 4)
  run.proc.kill()
  run.wait()
  *_, previous, newest = cli.steps(ckpt_dir)
  arrays = glob.glob(os.path.join(ckpt_dir, str(newest), "state", "**", "d", "*"),
                     recursive=True)
  assert arrays
  for path in arrays:
    os.truncate(path, os.path.getsize(path) // 2)

  output = Run(cache, workdir, "--config.stages=train").finish()
  newest_dir = os.path.join(ckpt_dir, str(newest))
  assert f"[train] warning: checkpoint {newest_dir} cannot be restored" in output
  assert f"[train] resuming from checkpoint {previous} " in output
  assert glob.glob(newest_dir + ".corrupt-*")  # Set aside, not deleted.
  _assert_same_training(workdir, reference)


def _nan_run(cache, workdir, policy):
  run = Run(cache, workdir, "--config.stages=train", f"--config.checkpoint.nan_policy={policy}",
            module="tests.nan_driver", FANAS_TEST_NAN_BATCH="5")
  return run.wait(), run.output


@pytest.mark.slow
def test_nan_loss_stops_naming_stage_step_and_last_good_checkpoint(shared, tmp_path):
  cache, reference = shared
  workdir = _with_derived_genotype(str(tmp_path / "nan_stop"), reference)
  status, output = _nan_run(cache, workdir, "stop")
  assert status == 1
  assert "fanas_jax: error: [train] non-finite" in output and "Traceback" not in output
  ckpt_dir = os.path.join(workdir, "train", "checkpoints")
  message = re.search(r"\[train\] non-finite (.*) at step 5 \(epoch 1\); last good "
                      r"checkpoint: (\S+) \(step 4\);", output)
  assert message, output[-4000:]
  assert "grad_norm=nan" in message.group(1)
  assert message.group(2) == os.path.join(ckpt_dir, "4")
  assert cli.steps(ckpt_dir) == [2, 4]  # Nothing saved after the bad step.
  assert not os.path.exists(os.path.join(workdir, "train", "result.json"))


@pytest.mark.slow
def test_nan_loss_rolls_back_skips_the_batch_logs_it_and_finishes(shared, tmp_path):
  cache, reference = shared
  workdir = _with_derived_genotype(str(tmp_path / "nan_rollback"), reference)
  status, output = _nan_run(cache, workdir, "rollback")
  assert status == 0, output[-4000:]
  assert re.search(r"\[train\] non-finite .*grad_norm.* at step 5: rolled back to checkpoint 4 "
                   r"and skipping that batch \(1 of at most 3 skips\)", output), output[-4000:]
  records = cli.metrics(workdir, {"train"})
  skipped = [r for r in records if "skipped_batch" in r]
  assert len(skipped) == 1 and skipped[0]["step"] == 5 and skipped[0]["epoch"] == 1
  assert "grad_norm" in skipped[0]["nonfinite"]
  epochs = [r for r in records if "loss" in r]
  assert len(epochs) == EPOCHS and all(np.isfinite(r["loss"]) for r in epochs)
  assert epochs[-1]["step"] == EPOCHS * TRAIN_STEPS_PER_EPOCH  # The skip counts as a step.
  assert np.isfinite(cli.read_json(workdir, "train/result.json")["test_top1"])
  variables = load_final_variables(workdir, "train")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  # The skipped batch changed the run: not the reference's weights.
  reference_vars = load_final_variables(reference, "train")
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables),
                                                      jax.tree.leaves(reference_vars)))


@pytest.mark.parametrize("key, value, message", [
    ("nan_policy", "skip", "checkpoint.nan_policy='skip' is not one of: rollback, stop"),
    ("every_steps", -1, "checkpoint.every_steps=-1 must be an integer >= 0"),
    ("keep", 0, "checkpoint.keep=0 must be an integer >= 1"),
])
def test_bad_checkpoint_settings_are_refused_naming_the_key(key, value, message):
  config = quickstart.get_config("tiny")
  config.checkpoint[key] = value
  with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
    config_checks.validate(config)


def test_metrics_rewind_keeps_other_stages_and_drops_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"stage": s, "step": i} for i, s in enumerate(["a", "b", "b", "a", "b"])]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "b", "st')
  writer = logging_utils.MetricWriter(str(tmp_path), "b")
  writer.rewind(1)
  writer.close()
  kept = [json.loads(line) for line in path.read_text().splitlines()]
  assert kept == [rows[0], rows[1], rows[3]] and writer.records == 1


@pytest.mark.slow
def test_a_run_with_another_seed_reads_its_search_step_from_the_cache(shared, tmp_path):
  """Seeds and data are inputs of the compiled step, never constants in it."""
  cache, _ = shared
  output = Run(cache, str(tmp_path / "seed1"), "--config.stages=search_phase1",
               "--config.seed=1").finish()
  assert f"XLA compilation cache {cache}" in output
  assert re.search(r"\[search_phase1\] compiled in [0-9.]+ s \(read from the XLA "
                   r"compilation cache\)", output), output[-4000:]
