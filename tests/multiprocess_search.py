"""A few real search steps on the digits, as one process of a multi-process job.

  python -m tests.multiprocess_search OUT_DIR PROCESS_ID NUM_PROCESSES [ADDRESS]

With NUM_PROCESSES > 1 the process joins the others through
jax.distributed.initialize at ADDRESS (host:port of process 0). Each process reads
only its own slice of every global batch through the real input pipeline, the
steps run on a 'data' mesh over every device of every process, and the process
saves what it read and the alphas after each step to OUT_DIR/process<ID>.npz.
With LATE_S set, process 1 starts compiling LATE_S seconds after the others: the
processes must still meet (Gloo, the CPU collectives, waits only 30 s for a peer).
"""
from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
import numpy as np

from fanas_jax.configs import quickstart
from fanas_jax import host, optim, parallel
from fanas_jax.loop import compile_step, peek
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset
from fanas_jax.genotype import SearchSpace
from fanas_jax.model import make_model
from fanas_jax.objectives import make_objective
from fanas_jax.steps import init_alphas, init_search_state, make_search_step

GLOBAL_BATCH = 16
STEPS = 3
IMAGE = 8


def main(out_dir: str, process_id: str, num_processes: str, address: str = "") -> None:
  if int(num_processes) > 1:
    parallel.initialize_distributed("on", address, int(num_processes), int(process_id))
  config = quickstart.get_config("tiny")
  cfg = config.search_phase2
  spec = get_dataset("sklearn_digits")
  data = pipeline.load_split("sklearn_digits", "train")
  halves = pipeline.split_halves(data, seed=0)
  w_iter, a_iter = (pipeline.train_iterator(
      half, batch_size=parallel.process_batch_size(GLOBAL_BATCH), seed=seed,
      preprocess=pipeline.Preprocess(IMAGE, spec.mean, spec.std, crop_padding=1),
      shard_index=jax.process_index(), shard_count=jax.process_count())
      for half, seed in zip(halves, (0, 1)))

  space = SearchSpace.uniform(("local3_h4", "nonlocal"), layers=1)  # as the tiny configs
  model = make_model(space.layer_ops(), 16, "classifier", num_classes=10, dropout=0.0,
                     zero_init_residual=True)   # as the quickstart (tests/multidevice_steps.py)
  objective = make_objective("supervised", ml_collections.ConfigDict(dict(
      image_size=IMAGE, num_classes=10)))
  w_tx = optim.search_weight_optimizer(cfg, steps_per_epoch=10)
  a_tx = optim.alpha_optimizer(cfg)
  key = jax.random.key(0)
  mesh = parallel.make_mesh()
  state = parallel.replicate(init_search_state(
      model, init_alphas(space, jax.random.key(1), 0.1), w_tx, a_tx, key,
      (1, IMAGE, IMAGE, 1)), mesh)
  step = jax.jit(make_search_step(model, objective, w_tx, a_tx, "first_order"))
  if jax.process_index() == 1:
    time.sleep(float(os.environ.get("LATE_S", "0")))
  example = [parallel.shard_batch(b, mesh) for b in (peek(w_iter), peek(a_iter))]
  step = compile_step(step, "multiprocess", state, *example, key)

  out = {"process_count": jax.process_count(), "device_count": jax.device_count()}
  try:
    parallel.replicate({"x": np.float32(jax.process_index())}, mesh)
  except AssertionError as error:   # differs between processes (one process: never)
    out["replicate_error"] = str(error)
  for i in range(STEPS):
    w_batch, a_batch = next(w_iter), next(a_iter)
    out[f"w_index{i}"], out[f"a_index{i}"] = w_batch["index"], a_batch["index"]
    state, metrics = step(state, parallel.shard_batch(w_batch, mesh),
                          parallel.shard_batch(a_batch, mesh), key)
    for name, alpha in state.alphas.items():
      out[f"alphas{i}/{name}"] = np.asarray(alpha)
    out[f"w_loss{i}"] = np.asarray(metrics["w_loss"])
  np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"), **out)


if __name__ == "__main__":
  host.collect_garbage_less_often()
  main(*sys.argv[1:])
