"""What every pipeline stage shares: its directory, its result file, resuming.

A stage is a function of (config, workdir) that writes workdir/<stage>/. It is
finished when workdir/<stage>/result.json exists; a finished stage is not redone,
its result is read back. An unfinished stage resumes from its newest checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fanas_jax.checkpoint import StageCheckpointer


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def read_result(workdir: str, stage: str) -> dict[str, Any] | None:
  path = os.path.join(stage_dir(workdir, stage), "result.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Writes atomically (temp file + rename), so a kill never leaves half a file."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def write_result(workdir: str, stage: str, result: dict[str, Any]) -> None:
  write_json(os.path.join(stage_dir(workdir, stage), "result.json"), result)


def run_once(workdir: str, stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs `fn` unless the stage is finished; returns the stage's result either way."""
  done = read_result(workdir, stage)
  if done is not None:
    print(f"[{stage}] finished earlier; reusing {stage_dir(workdir, stage)}/result.json")
    return done
  result = fn()
  write_result(workdir, stage, result)
  return result


class EpochCheckpoints:
  """Saves (state, iterators, extra) after each epoch and resumes from the newest."""

  def __init__(self, workdir: str, stage: str, iterators: Sequence[Any]):
    self._ckpt = StageCheckpointer(os.path.join(stage_dir(workdir, stage), "checkpoints"))
    self._iterators = iterators
    self.stage = stage

  def restore_or(self, state: Any) -> tuple[Any, int, dict[str, Any]]:
    """-> (state, first epoch to run, extra); the given state when nothing is saved."""
    step = self._ckpt.latest_step()
    if step is None:
      return state, 0, {}
    state, extra = self._ckpt.restore(step, state)
    for it, it_state in zip(self._iterators, extra["iterators"]):
      it.set_state(it_state)
    print(f"[{self.stage}] resuming after epoch {extra['epoch']} from checkpoint {step}")
    return state, int(extra["epoch"]), extra

  def save(self, step: int, epoch: int, state: Any, extra: dict[str, Any]) -> None:
    payload = dict(extra, epoch=epoch,
                   iterators=[it.get_state() for it in self._iterators])
    self._ckpt.save(step, state, payload)

  def close(self) -> None:
    self._ckpt.close()


def run_epoch(step: Callable, state: Any, next_inputs: Callable[[], tuple], steps: int,
              bar: Any, batch_size: int) -> tuple[Any, dict[str, float]]:
  """Runs `steps` steps of `step(state, *next_inputs())`; returns the mean metrics.

  Metrics are summed on device and fetched once, so the host never waits mid-epoch.
  """
  sums = None
  for _ in range(steps):
    state, metrics = step(state, *next_inputs())
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    bar.update(batch_size)
  return state, {k: float(v) / steps for k, v in jax.device_get(sums).items()}


def compile_step(step: Callable, stage: str, *example_args: Any) -> Callable:
  """Compiles a jitted step ahead of time and says how long XLA took.

  The first call of a supernet step can spend minutes in XLA; saying so up front
  beats a progress bar that sits at 0%.
  """
  print(f"[{stage}] compiling the step ...", flush=True)
  t0 = time.time()
  compiled = step.lower(*example_args).compile()
  print(f"[{stage}] compiled in {time.time() - t0:.1f} s", flush=True)
  return compiled


def peek(iterator: Any) -> Any:
  """The next element of a checkpointable iterator, leaving the iterator where it was."""
  state = iterator.get_state()
  element = next(iterator)
  iterator.set_state(state)
  return element
