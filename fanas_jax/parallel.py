"""One data-parallel code path for 1 device, N devices and many hosts.

A 1-D 'data' mesh over all devices: batches are sharded on it, weights and alphas
replicated, and steps are plain jax.jit functions. XLA's SPMD partitioner then
averages weight and architecture gradients over the global batch and computes
batch-norm statistics over the global batch, so a run on N devices is the run on
one device with the same global batch. The mesh is built with
jax.sharding.Mesh directly, so its axis is of the default (Auto) kind.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def check_batch_size(batch_size: int, key: str) -> None:
  """A global batch must split evenly over devices and over processes."""
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(
        f"{key}={batch_size} is not divisible by the device count {n}; use a multiple "
        f"of {n}.")


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> a global array sharded on 'data'."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def process_batch_size(global_batch_size: int) -> int:
  return global_batch_size // jax.process_count()
