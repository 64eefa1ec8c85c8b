"""Checkpoints of a pipeline stage through one orbax CheckpointManager.

A checkpoint holds the whole train state pytree (weights, alphas, batch-norm
statistics, both optimizer states, step) and a JSON item with what is not an array:
the epoch, the data iterators' states, the alpha history. Saving is asynchronous;
`close()` waits for pending saves.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class StageCheckpointer:
  def __init__(self, directory: str, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)))

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto `target`'s structure, shapes, dtypes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
