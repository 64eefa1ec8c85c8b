"""What every pipeline stage shares: its directory, its result file, its step loop.

A stage is a function of (config, workdir) that writes workdir/<stage>/. It is
finished when workdir/<stage>/result.json exists; a finished stage is not redone,
its result is read back. A training stage runs its steps through `StageLoop`, which
makes it survive faults:

- checkpoints every `checkpoint.every_steps` steps and at every epoch end, holding
  everything the next step depends on (state, RNG keys, position in the epoch, data
  iterators, the epoch's partial metric sums, the stage's own running values such
  as the alpha history), so a rerun resumes bitwise where the last one stopped;
- preemption: on SIGTERM (single process) or JAX's preemption sync point (several
  processes) it saves at the next step boundary and raises `Preempted`, a
  SystemExit with status 0, so later stages do not run;
- a non-finite loss or gradient raises `NonFiniteError` naming the stage, step and
  last good checkpoint, or under checkpoint.nan_policy='rollback' restores that
  checkpoint and skips the batch (the step makes no update; logged);
- metrics.jsonl is rewound to the checkpoint being resumed.

Checkpoint N is the state after N steps of the stage (skipped batches count as
steps), so epoch e ends at checkpoint e * steps_per_epoch.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from fanas_jax.checkpoint import StageCheckpointer
from fanas_jax.logging_utils import MetricWriter, write_bytes

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
  write_bytes(path, json.dumps(obj, indent=2).encode())


def write_result(workdir: str, stage: str, result: dict[str, Any]) -> None:
  write_json(os.path.join(stage_dir(workdir, stage), "result.json"), result)


class _Sigterm:
  """SIGTERM sets a flag that the step loop polls, instead of killing the process."""

  def __init__(self) -> None:
    self.requested = False

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  @contextlib.contextmanager
  def caught(self) -> Iterator[None]:
    """Catches SIGTERM for the duration, then restores the previous handler.

    Only in the main thread (Python delivers signals there) and only in a single
    process run: with several processes, JAX's preemption service owns SIGTERM and
    the loop asks its sync point instead, so all processes stop at the same step.
    """
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


_SIGTERM = _Sigterm()


def _say(message: str) -> None:
  """Prints from process 0 on a line of its own, above any progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)
    sys.stdout.flush()


def run_once(workdir: str, stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs `fn` unless the stage is finished; returns the stage's result either way."""
  done = read_result(workdir, stage)
  if done is not None:
    print(f"[{stage}] finished earlier; reusing {stage_dir(workdir, stage)}/result.json")
    return done
  with _SIGTERM.caught():
    result = fn()
    write_result(workdir, stage, result)
    if jax.process_count() > 1:  # Later stages read the files process 0 just wrote.
      multihost_utils.sync_global_devices(f"fanas_jax: {stage} finished")
    if _SIGTERM.requested:  # Came after the last step (evaluation, derive).
      message = (f"[{stage}] preempted after finishing the stage; rerun the same "
                 "command to run the remaining stages")
      _say(message)
      raise Preempted(message)
  return result


def _all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))


@jax.jit
def _accumulate(sums: dict[str, jax.Array] | None,
                metrics: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
  """(epoch sums + this step's metrics, whether this step's metrics are finite)."""
  new = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
  return new, _all_finite(metrics)


# What StageLoop stores in a checkpoint's JSON item besides the state pytree.
_PAYLOAD_KEYS = ("epoch", "batch", "step", "iterators", "sums", "sum_dtypes", "count",
                 "skipped", "metrics_records", "rng", "carry")


class _Rollback(Exception):
  def __init__(self, step: int, nonfinite: list[str]):
    super().__init__(step)
    self.step, self.nonfinite = step, nonfinite


class StageLoop:
  """A stage's steps, epoch by epoch, with checkpoints, resume, preemption and the
  non-finite guard (see the module docstring).

  Use: `state = loop.restore_or(state)`; read `loop.keys`, `loop.carry`,
  `loop.position`; then `loop.run(...)`; `loop.close()` when done.
  """

  def __init__(self, config: Any, workdir: str, stage: str, iterators: Sequence[Any],
               writer: MetricWriter, steps_per_epoch: int, epochs: int,
               keys: dict[str, jax.Array]):
    ck = config.checkpoint
    self.stage = stage
    self.iterators = list(iterators)
    self.writer = writer
    self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
    self.every_steps, self.nan_policy = ck.every_steps, ck.nan_policy
    self.max_rollbacks = ck.max_rollbacks
    periodic = ([e * steps_per_epoch for e in range(ck.keep_every_epochs, epochs + 1,
                                                    ck.keep_every_epochs)]
                if ck.keep_every_epochs else [])
    self.ckpt = StageCheckpointer(os.path.join(stage_dir(workdir, stage), "checkpoints"),
                                  keep=ck.keep, keep_steps=periodic)
    self.keys = dict(keys)
    self.carry: dict[str, Any] = {}  # The stage's own running values (alpha history).
    self.epoch = 0                   # Epochs finished.
    self.batch = 0                   # Steps done in the current epoch.
    self._sums: dict[str, Any] | None = None
    self._count = 0                  # Steps summed into _sums (skipped ones are not).
    self._skipped: dict[int, list[str]] = {}  # step -> the non-finite metrics' names
    self._target: Any = None

  @property
  def position(self) -> int:
    """Steps done in this stage, skipped ones included: the next checkpoint's number."""
    return self.epoch * self.steps_per_epoch + self.batch

  @property
  def finished(self) -> bool:
    return self.epoch >= self.epochs

  # Checkpoints.

  def restore_or(self, state: Any) -> Any:
    """The newest checkpoint's state, or `state` when there is none."""
    self._target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=x.sharding), state)
    found = self.ckpt.restore_latest(self._target, self.stage, _PAYLOAD_KEYS)
    if found is None:
      self.writer.rewind(0)
      return state
    step, state, extra = found
    self._load(extra)
    _say(f"[{self.stage}] resuming from checkpoint {step} in {self.ckpt.directory} "
         f"(epoch {self.epoch + 1}, {self.batch} of {self.steps_per_epoch} steps done)")
    return state

  def _payload(self) -> dict[str, Any]:
    sums = None if self._sums is None else {
        k: np.asarray(v) for k, v in jax.device_get(self._sums).items()}
    return {
        "epoch": self.epoch, "batch": self.batch, "step": self.position,
        "iterators": [it.get_state() for it in self.iterators],
        # Exact: a float32 goes through a Python float and back unchanged.
        "sums": None if sums is None else {k: v.tolist() for k, v in sums.items()},
        "sum_dtypes": None if sums is None else {k: str(v.dtype) for k, v in sums.items()},
        "count": self._count,
        "skipped": [{"step": s, "nonfinite": n} for s, n in sorted(self._skipped.items())],
        "metrics_records": self.writer.records,
        "rng": {name: {"impl": str(jax.random.key_impl(k)),
                       "data": np.asarray(jax.random.key_data(k)).tolist()}
                for name, k in self.keys.items()},
        "carry": self.carry,
    }

  def _load(self, extra: dict[str, Any], rollback: bool = False) -> None:
    for it, it_state in zip(self.iterators, extra["iterators"]):
      it.set_state(it_state)
    self.epoch, self.batch = int(extra["epoch"]), int(extra["batch"])
    self._sums = None if extra["sums"] is None else {
        k: np.asarray(v, dtype=extra["sum_dtypes"][k]) for k, v in extra["sums"].items()}
    self._count = int(extra["count"])
    if not rollback:  # A rollback keeps the batches it has found bad since.
      self._skipped = {int(s["step"]): list(s["nonfinite"]) for s in extra["skipped"]}
    self.keys = {name: jax.random.wrap_key_data(np.asarray(k["data"], np.uint32),
                                                impl=k["impl"])
                 for name, k in extra["rng"].items()}
    self.carry = extra["carry"]
    self.writer.rewind(int(extra["metrics_records"]))

  def _save(self, state: Any) -> None:
    if self.ckpt.latest_step() != self.position:
      self.ckpt.save(self.position, state, self._payload())

  def _checkpoint_text(self) -> str:
    last = self.ckpt.latest_step()
    if last is None:
      return "none (a rerun starts the stage afresh)"
    return f"{self.ckpt.step_dir(last)} (step {last})"

  def close(self) -> None:
    self.ckpt.close()

  # Faults.

  def _preempted(self) -> bool:
    if _SIGTERM.requested:
      return True
    return jax.process_count() > 1 and self.ckpt.reached_preemption(self.position)

  def _stop_for_preemption(self, state: Any) -> None:
    self._save(state)
    self.ckpt.wait()
    message = (f"[{self.stage}] preempted at step {self.position}: saved checkpoint "
               f"{self.position} in {self.ckpt.directory}; rerun the same command to "
               "resume")
    _say(message)
    raise Preempted(message)

  def _check(self, finite: jax.Array, metrics: dict[str, jax.Array], step: int) -> None:
    """Raises _Rollback or NonFiniteError if step `step`'s metrics are not finite."""
    if bool(finite):
      return
    values = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(v)))
    self.ckpt.wait()
    if self.nan_policy == "rollback" and len(self._skipped) < self.max_rollbacks:
      raise _Rollback(step, bad)
    shown = ", ".join(f"{k}={values[k].item() if values[k].size == 1 else 'array'}"
                      for k in bad)
    if self.nan_policy == "rollback":
      why = (f"gave up after skipping {len(self._skipped)} batches "
             f"(checkpoint.max_rollbacks={self.max_rollbacks})")
    else:
      why = "checkpoint.nan_policy='rollback' would skip such batches"
    epoch = (step - 1) // self.steps_per_epoch + 1
    raise NonFiniteError(
        f"[{self.stage}] non-finite {shown} at step {step} (epoch {epoch}); last good "
        f"checkpoint: {self._checkpoint_text()}; {why}.")

  def _rollback(self, bad: _Rollback, bar: Any, batch_size: int) -> Any:
    self._skipped[bad.step] = bad.nonfinite
    last = self.ckpt.latest_step()
    found = self.ckpt.restore_latest(self._target, self.stage, _PAYLOAD_KEYS)
    if found is None:
      raise NonFiniteError(
          f"[{self.stage}] non-finite {', '.join(bad.nonfinite)} at step {bad.step}, "
          "and no checkpoint restores to roll back to.")
    step, state, extra = found
    self._load(extra, rollback=True)
    _say(f"[{self.stage}] non-finite {', '.join(bad.nonfinite)} at step {bad.step}: "
         f"rolled back to checkpoint {step}{'' if step == last else ' (newest usable)'}"
         f" and skipping that batch ({len(self._skipped)} of at most "
         f"{self.max_rollbacks} skips)")
    bar.n = self.position * batch_size
    bar.refresh()
    return state

  def _skip(self, state: Any, next_inputs: Callable[[], tuple]) -> Any:
    """Consumes the bad step's batch; the step makes no update but counts."""
    step = self.position + 1
    next_inputs()
    self.writer.write(step, {"skipped_batch": "non-finite",
                             "epoch": (step - 1) // self.steps_per_epoch + 1,
                             "nonfinite": self._skipped[step]})
    return state.replace(step=jax.device_put(state.step + 1, state.step.sharding))

  # The loop.

  def run(self, step_fn: Callable, state: Any, next_inputs: Callable[[], tuple],
          end_epoch: Callable[[int, Any, dict[str, float], float], None], bar: Any,
          batch_size: int) -> Any:
    """Runs the remaining steps of the stage; returns the final state.

    `step_fn(state, *next_inputs())` -> (state, metrics) is one step.
    `end_epoch(epoch, state, means, seconds)` runs after each epoch (1-based
    `epoch`, the epoch's mean metrics, its wall time): it writes the epoch's
    records and may update `self.carry`, which the epoch-end checkpoint stores.

    Finiteness of step k is read after step k+1 is dispatched, so the host does
    not stall the device; before every checkpoint the newest step is checked too,
    so a checkpoint never holds a non-finite state.
    """
    try:
      if self.nan_policy == "rollback" and self.ckpt.latest_step() is None:
        self._save(state)  # Something to roll back to before the first checkpoint.
      if self._preempted():
        self._stop_for_preemption(state)
      pending = None
      t0 = time.time()
      while not self.finished:
        try:
          if self.position + 1 in self._skipped:
            state = self._skip(state, next_inputs)
          else:
            state, metrics = step_fn(state, *next_inputs())
            self._sums, finite = _accumulate(self._sums, metrics)
            self._count += 1
            if pending is not None:
              self._check(*pending)
            pending = (finite, metrics, self.position + 1)
          self.batch += 1
          bar.update(batch_size)
          epoch_end = self.batch == self.steps_per_epoch
          preempted = self._preempted()
          if not (epoch_end or preempted or
                  (self.every_steps and self.position % self.every_steps == 0)):
            continue
          if pending is not None:
            self._check(*pending)
            pending = None
          if epoch_end:
            self._end_epoch(state, end_epoch, time.time() - t0)
            t0 = time.time()
          self._save(state)
          if preempted:
            self._stop_for_preemption(state)
        except _Rollback as bad:
          pending = None
          state = self._rollback(bad, bar, batch_size)
          t0 = time.time()
      return state
    finally:
      self.ckpt.wait()

  def _end_epoch(self, state: Any, end_epoch: Callable, seconds: float) -> None:
    if self._count == 0:
      raise NonFiniteError(
          f"[{self.stage}] every step of epoch {self.epoch + 1} was skipped as "
          f"non-finite; last good checkpoint: {self._checkpoint_text()}.")
    means = {k: float(v) / self._count for k, v in jax.device_get(self._sums).items()}
    self.epoch, self.batch = self.epoch + 1, 0
    self._sums, self._count = None, 0
    end_epoch(self.epoch, state, means, seconds)


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
