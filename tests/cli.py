"""Runs of `python -m fanas_jax.main` as subprocesses, for the tests that kill them,
and the comparisons of their workdirs (bitwise, wall-clock keys aside)."""
import glob
import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT

WALL_CLOCK = ("time", "epoch_seconds")


def env(cache_dir, **extra):
  """This process's environment with the XLA compilation cache at cache_dir."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


class Run:
  """One `python -m fanas_jax.main` process, its output in workdir/../NAME.log."""

  def __init__(self, cache_dir, workdir, *flags, module="fanas_jax.main", **extra_env):
    self.log = f"{workdir}.{len(glob.glob(workdir + '.*.log'))}.log"
    with open(self.log, "w") as f:   # the process holds its own copy of the file
      self.proc = subprocess.Popen(
          [sys.executable, "-m", module, *flags, f"--workdir={workdir}"],
          cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
          env=env(cache_dir, **extra_env))

  def wait(self, timeout=600):
    return self.proc.wait(timeout)

  @property
  def output(self):
    with open(self.log) as f:
      return f.read()

  def finish(self):
    assert self.wait() == 0, self.output[-4000:]
    return self.output


def steps(directory):
  """The steps of the finished checkpoints in directory, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def wait_for_checkpoint(run, directory, least):
  """Polls until a finished checkpoint >= least exists; fails if the run ends first."""
  deadline = time.time() + 600
  while time.time() < deadline:
    done = [s for s in steps(directory) if s >= least]
    if done:
      return done[0]
    assert run.proc.poll() is None, f"run ended before checkpoint {least}:\n" + \
        run.output[-4000:]
    time.sleep(0.02)
  raise AssertionError(f"no checkpoint >= {least} in {directory}")


def metrics(workdir, stages):
  """The metrics.jsonl rows of these stages, less their wall-clock keys."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
          for r in rows if r["stage"] in stages]


def read_json(workdir, path):
  with open(os.path.join(workdir, path)) as f:
    return json.load(f)


def assert_same_search(workdir, reference):
  """search_phase1's history, genotype, result and metrics equal the reference's."""
  for path in ("search_phase1/alpha_history.json", "search_phase1/genotype.json",
               "search_phase1/result.json"):
    assert read_json(workdir, path) == read_json(reference, path), path
  assert metrics(workdir, {"search_phase1"}) == metrics(reference, {"search_phase1"})
