"""Metrics to JSON lines and TensorBoard, messages, and a progress bar with ETA.

Only process 0 writes, so a multi-host run logs once. A stage that resumes from a
checkpoint first rewinds its JSON lines to the records it had written when that
checkpoint was saved (`MetricWriter.rewind`) and opens TensorBoard with that step as
`purge_step`, so an interrupted and resumed run logs what the uninterrupted run logs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


def note(message: str) -> None:
  """The one way the trainer speaks: process 0, a line of its own above any bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)
    sys.stdout.flush()


class MetricWriter:
  """Appends {'stage', 'step', ...} records to workdir/metrics.jsonl + TensorBoard.

  `records` counts this stage's records in the file (every process counts, so a
  checkpoint can store it). `purge_step`: the step a resumed stage restarts from;
  TensorBoard drops the events it holds from that step on, so redone steps do not
  appear twice.
  """

  def __init__(self, workdir: str, stage: str, purge_step: int | None = None):
    self.stage = stage
    self.records = 0
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage),
                               purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.records += 1
    if not self._enabled:
      return
    record = {"stage": self.stage, "step": int(step), "time": time.time()}
    for k, v in metrics.items():
      if isinstance(v, (str, list, dict)):
        record[k] = v
      else:
        record[k] = _scalar(v)
        self._tb.add_scalar(f"{self.stage}/{k}", record[k], int(step))
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def rewind(self, records: int) -> None:
    """Keeps this stage's first `records` records in metrics.jsonl and drops the
    rest (written after the checkpoint being resumed); other stages' records stay.

    Rewrites atomically (temp file + rename). A torn last line (a kill mid-write)
    is dropped too.
    """
    self.records = records
    if not self._enabled or not os.path.exists(self._path):
      return
    with open(self._path) as f:
      lines = f.readlines()
    kept, seen, changed = [], 0, False
    for i, line in enumerate(lines):
      try:
        stage = json.loads(line).get("stage")
      except json.JSONDecodeError:
        stage = None
        if i == len(lines) - 1 and not line.endswith("\n"):
          changed = True
          continue
      if stage == self.stage:
        seen += 1
        if seen > records:
          changed = True
          continue
      kept.append(line)
    if changed:
      write_bytes(self._path, "".join(kept).encode())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def write_bytes(path: str, data: bytes) -> None:
  """Writes atomically (temp file + rename) from process 0 only, so a kill never
  leaves half a file and hosts never race."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def progress(total_steps: int, initial: int, batch_size: int, desc: str) -> tqdm.tqdm:
  """A bar counting images, so its rate is img/s and its ETA covers the stage."""
  return tqdm.tqdm(total=total_steps * batch_size, initial=initial * batch_size,
                   unit="img", unit_scale=True, desc=desc, dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)
