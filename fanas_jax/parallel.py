"""One data-parallel code path for 1 device, N devices and many hosts.

A 1-D 'data' mesh over the devices: batches are sharded on it, weights and alphas
replicated, and steps are plain jax.jit functions. XLA's SPMD partitioner then
averages weight and architecture gradients over the global batch and computes
batch-norm statistics over the global batch, so a run on N devices is the run on
one device with the same global batch. The mesh is built with
jax.sharding.Mesh directly, so its axis is of the default (Auto) kind: shardings
are propagated by XLA, not checked by JAX's type system.

Several hosts join through `jax.distributed.initialize` (opt-in, see
`initialize_distributed`); each process then feeds only its own slice of every
global batch, and `shard_batch` assembles the global array.
"""
from __future__ import annotations

import itertools
import os
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")


def _tpu_host() -> bool:
  """A Cloud TPU VM: the TPU runtime's environment or its device files."""
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or
              os.environ.get("TPU_ACCELERATOR_TYPE") or
              os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process JAX job; must run before anything touches a device.

  'on' always calls jax.distributed.initialize, which takes what it is not given
  from the environment (JAX_COORDINATOR_ADDRESS, or the cluster it detects: Cloud
  TPU, SLURM, Open MPI, Kubernetes). 'auto' does so on a Cloud TPU VM, when
  JAX_COORDINATOR_ADDRESS is set or when an address is given; elsewhere it runs a
  single process. 'off' never initialises. Returns whether it initialised.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"distributed={mode!r} is not one of: {', '.join(DISTRIBUTED_MODES)}.")
  wanted = mode == "on" or (mode == "auto" and (
      coordinator_address is not None or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
      or _tpu_host()))
  if not wanted:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


_BARRIERS = itertools.count()


def wait_for_processes(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process of the job gets here; a no-op in a one-process run.

  Every process must call it at the same points in the same order. It waits in the
  coordination service, not in a collective: on CPUs Gloo gives up on a peer that is
  30 s late to a collective (not configurable), while one process may compile a step
  minutes after another, or write files the others wait for. So processes meet here
  before their first collective after anything that can take them unequal time.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # The client of jax.distributed.initialize.
  distributed.global_state.client.wait_at_barrier(
      f"fanas_jax {next(_BARRIERS)}: {name}", timeout_s * 1000)


def mesh_size(num_devices: int = 0) -> int:
  """The data mesh's size: `num_devices`, or every device of every process when 0."""
  return num_devices or jax.device_count()


def check_mesh(num_devices: int, key: str = "num_devices") -> None:
  """A mesh needs that many devices, spread evenly over the processes."""
  present = jax.device_count()
  if num_devices < 0 or num_devices > present:
    raise ValueError(
        f"{key}={num_devices} asks for a mesh of {num_devices} devices, but "
        f"{present} {jax.devices()[0].platform} device(s) are present; use 0 (all) "
        f"or at most {present}.")
  if num_devices and jax.process_count() > 1 and num_devices != present:
    raise ValueError(
        f"{key}={num_devices}: a multi-process run uses every device ({present}); "
        f"set {key}=0.")


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D 'data' mesh over the first `num_devices` devices (0: all of them)."""
  check_mesh(num_devices)
  return Mesh(np.asarray(jax.devices()[:mesh_size(num_devices)]), (DATA_AXIS,))


def check_batch_size(batch_size: int, key: str, num_devices: int = 0) -> None:
  """A global batch must split evenly over the mesh's devices and over processes."""
  n = mesh_size(num_devices)
  if batch_size % n:
    raise ValueError(
        f"{key}={batch_size} is not divisible by the device count {n}; use a multiple "
        f"of {n}.")
  if batch_size % jax.process_count():
    raise ValueError(f"{key}={batch_size} is not divisible by the process count "
                     f"{jax.process_count()}.")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` (host values or single-device arrays) as arrays replicated on `mesh`.

  Over several processes every process must pass the same values. The processes
  first meet (building the tree, e.g. a supernet's init, can take them unequal
  time), then check that once, on a fingerprint of the whole tree, and each places
  its own copy on its devices. (jax 0.12's `jax.device_put` checks every leaf with
  its own collective, each of which Gloo gives up on when a peer is 30 s late.)
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  host = jax.tree.map(np.asarray, tree)
  wait_for_processes("replicate")
  multihost_utils.assert_equal(
      fingerprint(host), "the tree to replicate differs between processes")
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
      host)


def fingerprint(tree: Any) -> np.uint32:
  """A CRC-32 of a tree's leaves: each one's path, dtype, shape and bytes."""
  crc = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    crc = zlib.crc32(f"{jax.tree_util.keystr(path)} {x.dtype}{x.shape}".encode(), crc)
    crc = zlib.crc32(x.tobytes(), crc)
  return np.uint32(crc)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                seed_axis: bool = False) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> a global array sharded on 'data'.

  seed_axis: the batch is [seeds, batch, ...] (one batch per search seed), sharded
  on its second axis.
  """
  sharding = NamedSharding(mesh, P(None, DATA_AXIS) if seed_axis else P(DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def process_batch_size(global_batch_size: int) -> int:
  return global_batch_size // jax.process_count()


def lr_scale(global_batch_size: int, reference_batch_size: int) -> float:
  """The linear scaling rule: learning rates are set for `reference_batch_size`
  (0: for whatever batch is used, so no scaling)."""
  return global_batch_size / reference_batch_size if reference_batch_size else 1.0


def describe(global_batch_size: int, num_devices: int = 0) -> str:
  """'global batch 64 = 8/device x 8 devices (32/process x 2 processes)', for logs."""
  n = mesh_size(num_devices)
  text = f"global batch {global_batch_size} = {global_batch_size // n}/device x {n} devices"
  if jax.process_count() > 1:
    text += (f" ({process_batch_size(global_batch_size)}/process x "
             f"{jax.process_count()} processes)")
  return text
