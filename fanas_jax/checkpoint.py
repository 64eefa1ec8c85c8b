"""Checkpoints of a pipeline stage through one orbax CheckpointManager.

A checkpoint holds the whole train state pytree (weights, alphas, batch-norm
statistics, both optimizer states, step) and a JSON item with what is not an array:
the position in the stage, the data iterators' states, the partial epoch sums, the
stage's own running values (the alpha history). Saves are asynchronous; `close()`
waits for pending ones.

Which checkpoints stay: the newest `keep`, plus every step in `keep_steps` (the
periodic keeps), through orbax's preservation policies. A checkpoint that does not
restore (truncated or missing files) is moved aside to `<step>.corrupt-<time>`,
never deleted, and the next older one is tried.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from fanas_jax import parallel
from fanas_jax.logging_utils import note


def _first_line(error: BaseException, limit: int = 240) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


def _silence_closed_loop_reports() -> None:
  """After a failed restore, tensorstore finishes the remaining reads into orbax's
  closed asyncio loop, and each reports 'Event loop is closed' as an unraisable
  exception: hundreds of tracebacks of noise. Drops those reports, only those."""
  previous = sys.unraisablehook
  if getattr(previous, "fanas_jax_filter", False):
    return

  def hook(report: Any) -> None:
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  hook.fanas_jax_filter = True
  sys.unraisablehook = hook


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  parallel.wait_for_processes("checkpoint check")
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class StageCheckpointer:
  def __init__(self, directory: str, keep: int = 2, keep_steps: Iterable[int] = ()):
    self.directory = os.path.abspath(directory)
    preserve = [policies.LatestN(n=keep)]
    keep_steps = sorted(set(keep_steps))
    if keep_steps:
      preserve.append(policies.CustomSteps(keep_steps))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=True,
            # Only orbax's own unfinished temporary directories (a save that was
            # killed); finished checkpoints are never touched by this.
            cleanup_tmp_directories=True,
            preservation_policy=policies.AnyPreservationPolicy(preserve)),
        item_names=("state", "extra"))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Starts an asynchronous save; every process calls it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto `target`'s structure, shapes, dtypes and shardings (arrays or
    jax.ShapeDtypeStruct)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]

  def restore_latest(self, target: Any, stage: str, required: Sequence[str] = ()
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, as (step, state, extra); None if none.

    Process 0 names the step to try and every process tries it; it is used only if
    it restored everywhere, so all processes resume from the same checkpoint. One
    that fails, or whose extra lacks a `required` key (an older format), is moved
    aside with a warning naming it, so neither this run nor orbax trips over it
    again, and the next older one is tried.
    """
    self.wait()
    while (step := self._agreed_latest()) is not None:
      error = None
      try:
        state, extra = self.restore(step, target)
        missing = [k for k in required if k not in extra]
        if missing:
          raise ValueError(f"its extra item lacks {', '.join(missing)}: an older format")
      except Exception as e:  # Any failure to read it means: not usable.
        error = e
      if _everywhere(error is None):
        return step, state, extra
      _silence_closed_loop_reports()
      moved = self._move_aside(step)
      why = _first_line(error) if error else "another process could not restore it"
      note(f"[{stage}] warning: checkpoint {self.step_dir(step)} cannot be restored "
           f"({why}); moved it to {moved} and trying the previous checkpoint")
    return None

  def _agreed_latest(self) -> int | None:
    """Process 0's newest step, told to every process."""
    step = self.latest_step()
    if jax.process_count() > 1:
      parallel.wait_for_processes("latest checkpoint")
      step = int(multihost_utils.broadcast_one_to_all(
          np.int64(-1 if step is None else step)))
      step = None if step < 0 else step
    return step

  def _move_aside(self, step: int) -> str:
    source = self.step_dir(step)
    target = f"{source}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      os.replace(source, target)
    if jax.process_count() > 1:
      parallel.wait_for_processes(f"checkpoint moved aside: {source}")
    self._manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs): every process gets True at
    the same step once any of them was told to stop."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
