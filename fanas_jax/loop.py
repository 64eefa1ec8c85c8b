"""The parts of a stage's step loop, each small and tested on its own.

- `LoopState`: where the stage is (epoch, step within it), JSON for checkpoints.
- `EpochMeter`: the epoch's metric sums, exact through a checkpoint.
- `FaultGuard`: the non-finite check and the batches skipped under rollback.
- `Preemption`: SIGTERM (one process) or JAX's preemption sync point (several).
- `StageRun`: owns a stage's writer, progress bar and checkpointer, saves and
  restores everything the next step depends on, and closes them.

A stage's loop is then a plain loop over these (see `search.py` and `train.py`).
Checkpoint N is the state after N steps of the stage (skipped batches count as
steps), so epoch e ends at checkpoint e * steps_per_epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax import compile_cache, parallel
from fanas_jax.checkpoint import StageCheckpointer
from fanas_jax.logging_utils import MetricWriter, note, progress
from fanas_jax.registry import ConfigError

NAN_POLICIES = ("stop", "rollback")


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient norm stopped a stage; the message is one line
  naming the stage, the step and the last good checkpoint."""


class Preempted(SystemExit):
  """The stage saved a checkpoint and stops because the job is being preempted.

  A SystemExit with status 0: uncaught, the process exits cleanly, and rerunning
  the same command resumes from the checkpoint it names.
  """

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message

  def __str__(self) -> str:
    return self.message


class Rollback(Exception):
  """Step `step`'s metrics were not finite and the stage rolls back past it."""

  def __init__(self, step: int, nonfinite: list[str]):
    super().__init__(step)
    self.step, self.nonfinite = step, nonfinite


def check_config(ckpt: Any) -> None:
  """The `checkpoint` config block."""
  for key, least in (("every_steps", 0), ("keep", 1), ("keep_every_epochs", 0),
                     ("max_rollbacks", 0)):
    value = ckpt[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ConfigError(f"checkpoint.{key}={value!r} must be an integer >= {least}.")
  if ckpt.nan_policy not in NAN_POLICIES:
    raise ConfigError(f"checkpoint.nan_policy={ckpt.nan_policy!r} is not one of: "
                      f"{', '.join(sorted(NAN_POLICIES))}.")


@dataclasses.dataclass
class LoopState:
  """Epochs finished and steps done in the current one."""
  steps_per_epoch: int
  epochs: int
  epoch: int = 0
  batch: int = 0

  @property
  def position(self) -> int:
    """Steps done in this stage, skipped ones included: the next checkpoint's number."""
    return self.epoch * self.steps_per_epoch + self.batch

  @property
  def finished(self) -> bool:
    return self.epoch >= self.epochs

  @property
  def epoch_ended(self) -> bool:
    return self.batch == self.steps_per_epoch

  def epoch_of(self, step: int) -> int:
    """The 1-based epoch that step `step` (1-based) belongs to."""
    return (step - 1) // self.steps_per_epoch + 1

  def to_json(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.batch, "step": self.position}

  def load(self, saved: dict[str, Any]) -> None:
    self.epoch, self.batch = int(saved["epoch"]), int(saved["batch"])


@jax.jit
def _accumulate(sums: dict[str, jax.Array] | None,
                metrics: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
  """(epoch sums + this step's metrics, whether this step's metrics are finite)."""
  new = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
  return new, finite


class EpochMeter:
  """Sums of the epoch's step metrics on device, and how many steps they hold.

  Saved as JSON lists plus dtypes: a float32 goes through a Python float and back
  unchanged, so a resumed epoch's mean equals the uninterrupted one bitwise.
  """

  def __init__(self) -> None:
    self.sums: dict[str, Any] | None = None
    self.count = 0  # Steps summed (skipped ones are not).

  def add(self, metrics: dict[str, jax.Array]) -> jax.Array:
    """Adds one step's metrics; returns (on device) whether they are all finite."""
    self.sums, finite = _accumulate(self.sums, metrics)
    self.count += 1
    return finite

  def means(self) -> dict[str, float]:
    return {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}

  def reset(self) -> None:
    self.sums, self.count = None, 0

  def to_json(self) -> dict[str, Any]:
    sums = None if self.sums is None else {
        k: np.asarray(v) for k, v in jax.device_get(self.sums).items()}
    return {"sums": None if sums is None else {k: v.tolist() for k, v in sums.items()},
            "sum_dtypes": None if sums is None else {k: str(v.dtype)
                                                     for k, v in sums.items()},
            "count": self.count}

  def load(self, saved: dict[str, Any]) -> None:
    self.sums = None if saved["sums"] is None else {
        k: np.asarray(v, dtype=saved["sum_dtypes"][k]) for k, v in saved["sums"].items()}
    self.count = int(saved["count"])


class FaultGuard:
  """Decides what a non-finite step does: stop with one line, or roll back and skip
  its batch (checkpoint.nan_policy), and remembers the batches skipped."""

  def __init__(self, stage: str, nan_policy: str, max_rollbacks: int):
    self.stage, self.nan_policy, self.max_rollbacks = stage, nan_policy, max_rollbacks
    self.skipped: dict[int, list[str]] = {}  # step -> the non-finite metrics' names

  def skips(self, step: int) -> bool:
    return step in self.skipped

  def check(self, finite: jax.Array, metrics: dict[str, jax.Array], step: int,
            epoch: int, last_checkpoint: str) -> None:
    """Raises Rollback or NonFiniteError if step `step`'s metrics are not finite."""
    if bool(finite):
      return
    values = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(v)))
    if self.nan_policy == "rollback" and len(self.skipped) < self.max_rollbacks:
      raise Rollback(step, bad)
    shown = ", ".join(f"{k}={values[k].item() if values[k].size == 1 else 'array'}"
                      for k in bad)
    if self.nan_policy == "rollback":
      why = (f"gave up after skipping {len(self.skipped)} batches "
             f"(checkpoint.max_rollbacks={self.max_rollbacks})")
    else:
      why = "checkpoint.nan_policy='rollback' would skip such batches"
    raise NonFiniteError(
        f"[{self.stage}] non-finite {shown} at step {step} (epoch {epoch}); last good "
        f"checkpoint: {last_checkpoint}; {why}.")

  def to_json(self) -> list[dict[str, Any]]:
    return [{"step": s, "nonfinite": n} for s, n in sorted(self.skipped.items())]

  def load(self, saved: list[dict[str, Any]]) -> None:
    self.skipped = {int(s["step"]): list(s["nonfinite"]) for s in saved}


class Preemption:
  """Whether the job is being stopped: SIGTERM sets a flag that the loop polls
  (single process); with several processes JAX's preemption service owns SIGTERM
  and the checkpointer's sync point says so, at the same step everywhere."""

  def __init__(self) -> None:
    self.requested = False

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  @contextlib.contextmanager
  def catching(self) -> Iterator[None]:
    """Catches SIGTERM for the duration (main thread, single process), then
    restores the previous handler."""
    self.requested = False
    if (threading.current_thread() is not threading.main_thread()
        or jax.process_count() > 1):
      yield
      return
    previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

  def reached(self, ckpt: StageCheckpointer, step: int) -> bool:
    if self.requested:
      return True
    return jax.process_count() > 1 and ckpt.reached_preemption(step)


# What a checkpoint's JSON item holds besides the state pytree.
PAYLOAD_KEYS = ("epoch", "batch", "step", "iterators", "sums", "sum_dtypes", "count",
                "skipped", "metrics_records", "carry")


@dataclasses.dataclass(frozen=True)
class EpochEnd:
  epoch: int                 # 1-based, the epoch just finished
  means: dict[str, float]    # its mean step metrics
  seconds: float             # its wall time


class StageRun:
  """One run of a stage's steps: its checkpointer, writer and progress bar, the loop
  parts above, and the stage's own running values (`carry`, e.g. the alpha
  history), which every checkpoint stores. Use as a context manager: it closes
  what it owns.

  Finiteness of step k is read after step k+1 is dispatched, so the host does not
  stall the device; before every checkpoint the newest step is checked too, so a
  checkpoint never holds a non-finite state.
  """

  def __init__(self, config: Any, stage: str, stage_dir: str, iterators: Sequence[Any],
               steps_per_epoch: int, epochs: int, batch_size: int,
               open_writer: Callable[[int | None], MetricWriter], preemption: Preemption):
    ck = config.checkpoint
    self.stage, self.iterators, self.batch_size = stage, list(iterators), batch_size
    self.every_steps = ck.every_steps
    self.loop = LoopState(steps_per_epoch, epochs)
    self.meter = EpochMeter()
    self.guard = FaultGuard(stage, ck.nan_policy, ck.max_rollbacks)
    self.preemption = preemption
    self.carry: dict[str, Any] = {}
    periodic = ([e * steps_per_epoch for e in range(ck.keep_every_epochs, epochs + 1,
                                                    ck.keep_every_epochs)]
                if ck.keep_every_epochs else [])
    self.ckpt = StageCheckpointer(os.path.join(stage_dir, "checkpoints"), keep=ck.keep,
                                  keep_steps=periodic)
    self._open_writer = open_writer
    self.writer: MetricWriter | None = None
    self.bar: Any = None
    self._target: Any = None
    self._pending: tuple | None = None  # (finite, metrics, step) not yet checked
    self._epoch_start = 0.0

  def __enter__(self) -> "StageRun":
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.bar is not None:
      self.bar.close()
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()

  @property
  def finished(self) -> bool:
    return self.loop.finished

  # Start and resume.

  def start(self, state: Any) -> Any:
    """The newest checkpoint's state, or `state`; opens the writer and the bar."""
    self._target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), state)
    found = self.ckpt.restore_latest(self._target, self.stage, PAYLOAD_KEYS)
    if found is None:
      self.writer = self._open_writer(None)
      self.writer.rewind(0)
    else:
      step, state, extra = found
      self.writer = self._open_writer(step)  # TensorBoard drops what came after it.
      self._load(extra)
      note(f"[{self.stage}] resuming from checkpoint {step} in {self.ckpt.directory} "
           f"(epoch {self.loop.epoch + 1}, {self.loop.batch} of "
           f"{self.loop.steps_per_epoch} steps done)")
    self.bar = progress(self.loop.epochs * self.loop.steps_per_epoch, self.loop.position,
                        self.batch_size, self.stage)
    if self.guard.nan_policy == "rollback" and self.ckpt.latest_step() is None:
      self._save(state)  # Something to roll back to before the first checkpoint.
    if not self.finished and self.preemption.reached(self.ckpt, self.loop.position):
      self._stop_for_preemption(state)
    self._epoch_start = time.time()
    return state

  def _payload(self) -> dict[str, Any]:
    return {**self.loop.to_json(), **self.meter.to_json(),
            "iterators": [it.get_state() for it in self.iterators],
            "skipped": self.guard.to_json(),
            "metrics_records": self.writer.records, "carry": self.carry}

  def _load(self, extra: dict[str, Any], rollback: bool = False) -> None:
    for it, it_state in zip(self.iterators, extra["iterators"]):
      it.set_state(it_state)
    self.loop.load(extra)
    self.meter.load(extra)
    if not rollback:  # A rollback keeps the batches it has found bad since.
      self.guard.load(extra["skipped"])
    self.carry = extra["carry"]
    self.writer.rewind(int(extra["metrics_records"]))

  # Steps.

  def step(self, step_fn: Callable, state: Any, inputs: tuple) -> Any:
    """One step on `inputs`, or the skip of a batch found bad before."""
    step = self.loop.position + 1
    if self.guard.skips(step):
      self.writer.write(step, {"skipped_batch": "non-finite",
                               "epoch": self.loop.epoch_of(step),
                               "nonfinite": self.guard.skipped[step]})
      state = state.replace(step=jax.device_put(state.step + 1, state.step.sharding))
    else:
      state, metrics = step_fn(state, *inputs)
      finite = self.meter.add(metrics)
      self.check()
      self._pending = (finite, metrics, step)
    self.loop.batch += 1
    self.bar.update(self.batch_size)
    return state

  def check(self) -> None:
    """Raises Rollback or NonFiniteError if the newest unchecked step was not finite."""
    if self._pending is None:
      return
    finite, metrics, step = self._pending
    self._pending = None
    if not bool(finite):
      self.ckpt.wait()
    self.guard.check(finite, metrics, step, self.loop.epoch_of(step),
                     self._checkpoint_text())

  def end_epoch(self) -> EpochEnd:
    """Checks the newest step, then closes the epoch: its number, means, seconds."""
    self.check()
    if self.meter.count == 0:
      raise NonFiniteError(
          f"[{self.stage}] every step of epoch {self.loop.epoch + 1} was skipped as "
          f"non-finite; last good checkpoint: {self._checkpoint_text()}.")
    end = EpochEnd(self.loop.epoch + 1, self.meter.means(), time.time() - self._epoch_start)
    self.loop.epoch, self.loop.batch = self.loop.epoch + 1, 0
    self.meter.reset()
    return end

  def checkpoint(self, state: Any) -> None:
    """Saves when due (every_steps, epoch end, preemption); stops when preempted."""
    position = self.loop.position
    preempted = self.preemption.reached(self.ckpt, position)
    due = self.loop.batch == 0 or (self.every_steps and position % self.every_steps == 0)
    if not (due or preempted):
      return
    self.check()
    self._save(state)
    if preempted:
      self._stop_for_preemption(state)
    if self.loop.batch == 0:
      self._epoch_start = time.time()

  def roll_back(self, bad: Rollback) -> Any:
    """Restores the newest checkpoint that restores and marks the bad batch skipped."""
    self._pending = None
    self.guard.skipped[bad.step] = bad.nonfinite
    last = self.ckpt.latest_step()
    found = self.ckpt.restore_latest(self._target, self.stage, PAYLOAD_KEYS)
    if found is None:
      raise NonFiniteError(
          f"[{self.stage}] non-finite {', '.join(bad.nonfinite)} at step {bad.step}, "
          "and no checkpoint restores to roll back to.")
    step, state, extra = found
    self._load(extra, rollback=True)
    note(f"[{self.stage}] non-finite {', '.join(bad.nonfinite)} at step {bad.step}: "
         f"rolled back to checkpoint {step}{'' if step == last else ' (newest usable)'}"
         f" and skipping that batch ({len(self.guard.skipped)} of at most "
         f"{self.guard.max_rollbacks} skips)")
    self.bar.n = self.loop.position * self.batch_size
    self.bar.refresh()
    self._epoch_start = time.time()
    return state

  # Checkpoints.

  def _save(self, state: Any) -> None:
    if self.ckpt.latest_step() != self.loop.position:
      self.ckpt.save(self.loop.position, state, self._payload())

  def _checkpoint_text(self) -> str:
    last = self.ckpt.latest_step()
    if last is None:
      return "none (a rerun starts the stage afresh)"
    return f"{self.ckpt.step_dir(last)} (step {last})"

  def _stop_for_preemption(self, state: Any) -> None:
    self._save(state)
    self.ckpt.wait()
    message = (f"[{self.stage}] preempted at step {self.loop.position}: saved checkpoint "
               f"{self.loop.position} in {self.ckpt.directory}; rerun the same command "
               "to resume")
    note(message)
    raise Preempted(message)


def compile_step(step: Callable, stage: str, *example_args: Any) -> Callable:
  """Compiles a jitted step ahead of time and says how long XLA took.

  The first call of a supernet step can spend minutes in XLA; saying so up front
  beats a progress bar that sits at 0%.
  """
  note(f"[{stage}] compiling the step ...")
  t0 = time.time()
  with compile_cache.counting_hits() as hits:
    compiled = step.lower(*example_args).compile()
  parallel.wait_for_processes(f"{stage} step compiled")
  source = " (read from the XLA compilation cache)" if hits else ""
  note(f"[{stage}] compiled in {time.time() - t0:.1f} s{source}")
  return compiled


def peek(iterator: Any) -> Any:
  """The next element of a checkpointable iterator, leaving the iterator where it was."""
  state = iterator.get_state()
  element = next(iterator)
  iterator.set_state(state)
  return element
