"""Metrics to JSON lines and TensorBoard, and a progress bar with throughput and ETA.

Only process 0 writes, so a multi-host run logs once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends {'stage', 'step', ...} records to workdir/metrics.jsonl + TensorBoard."""

  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress(total_steps: int, initial: int, batch_size: int, desc: str) -> tqdm.tqdm:
  """A bar counting images, so its rate is img/s and its ETA covers the stage."""
  return tqdm.tqdm(total=total_steps * batch_size, initial=initial * batch_size,
                   unit="img", unit_scale=True, desc=desc, dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)
