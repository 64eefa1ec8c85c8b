"""A few real search or train steps on a 1-device and an N-device 'data' mesh.

Run in a fresh process, with fake CPU devices set before JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.multidevice_steps CASE OUT.npz

It runs the same steps on the same global batches twice, once on a mesh of the
first device and once on a mesh of all devices, and saves both final states, the
per-step metrics, and every device's copy of the alphas, for tests/test_parallel.py
to compare.
"""
from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fanas_jax.configs import quickstart
from fanas_jax import host, optim, parallel
from fanas_jax.genotype import SearchSpace, named_genotype
from fanas_jax.model import make_model
from fanas_jax.objectives import make_objective
from fanas_jax.steps import (TrainState, init_alphas, init_search_state, init_variables,
                             make_search_step, make_train_step)

# (objective, bilevel mode); 'train' is the derived network's train step. The
# second-order case runs on a small mixture network (MixtureNet): through the
# real supernet its double backward compiles for minutes on a CPU.
CASES = {
    "car_first_order": ("car", "first_order"),
    "supervised_first_order": ("supervised", "first_order"),
    "supervised_second_order": ("supervised", "second_order"),
    "train": ("supervised", None),
}
CANDIDATES = ("local3_h4", "nonlocal")
# The networks zero-initialise each residual branch's last BN scale, as the quickstart
# does. With the authors' init (scale 1) this 8x8, width-16 network is so badly
# conditioned (gradient norm ~3e4 at step 0) that float32 rounding of the batch-norm
# and gradient all-reduces alone moves the metrics by ~1e-1 within three steps, on
# either mesh; the tests would measure conditioning, not parallelism.
WIDTH = 16
IMAGE = 8
GLOBAL_BATCH = 16
STEPS = 3


class MixtureNet(nn.Module):
  """Two layers, each a softmax(alpha) mixture of three convolutions, then batch
  norm: the supernet's structure in miniature, for the second-order step."""

  @nn.compact
  def __call__(self, x, alphas, train=False):
    for l, alpha in enumerate(alphas["mix"]):
      ops = [nn.Conv(8, (3, 3), name=f"layer{l}_conv3")(x),
             nn.relu(nn.Conv(8, (1, 1), name=f"layer{l}_conv1")(x)),
             nn.Conv(8, (3, 3), kernel_dilation=2, name=f"layer{l}_dilated")(x)]
      x = sum(w * o for w, o in zip(jax.nn.softmax(alpha), ops))
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                               name=f"layer{l}_bn")(x))
    return nn.Dense(10, name="classifier")(jnp.mean(x, axis=(1, 2)))


def _batches(seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(GLOBAL_BATCH, IMAGE, IMAGE, 1)).astype(np.float32),
           "label": rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)}
          for _ in range(STEPS)]


def _objective(name: str):
  return make_objective(name, ml_collections.ConfigDict(dict(
      image_size=IMAGE, num_boxes=2, box_size=3, num_classes=10, cpc=None)))


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(jax.device_get(leaf))
          for path, leaf in leaves}


def _run(case: str, num_devices: int) -> dict[str, np.ndarray]:
  objective_name, mode = CASES[case]
  config = quickstart.get_config("tiny")
  mesh = parallel.make_mesh(num_devices)
  key = jax.random.key(0)
  objective = _objective(objective_name)
  w_batches, a_batches = _batches(1), _batches(2)
  shard = lambda b: parallel.shard_batch(b, mesh)
  if mode is None:
    cfg = config.train
    model = make_model(named_genotype("original").layer_ops(), WIDTH, "classifier",
                       num_classes=10, dropout=0.5, zero_init_residual=True)
    tx = optim.train_optimizer(cfg, steps_per_epoch=STEPS)
    variables = init_variables(model, key, (1, IMAGE, IMAGE, 1))
    state = TrainState(step=np.zeros((), np.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]))
    step = jax.jit(make_train_step(model, objective, tx))
    inputs = lambda i: (shard(w_batches[i]), key)
  else:
    cfg = config.search_phase1
    # One step per "epoch" over 10: the per-step cosine from 0.025 to 0.001. The
    # authors' alpha decay (the quickstart has none): behind zero-initialised residual
    # branches alpha's gradients are tiny in the first steps (0 at the first: every
    # branch outputs 0), and Adam scales a tiny gradient, its rounding included, up to
    # a step of about a_lr. Without the decay the two meshes' alphas then differ by
    # their all-reduces' rounding scaled up (1.2e-4 and 8.3e-4 relative in stage 5);
    # with it, 1e-3 x alpha outweighs that rounding.
    cfg.update(dict(epochs=10, w_lr_min=0.001, a_weight_decay=1e-3))
    w_tx = optim.search_weight_optimizer(cfg, steps_per_epoch=1)
    a_tx = optim.alpha_optimizer(cfg)
    if mode == "second_order":
      model = MixtureNet()
      alphas = {"mix": 0.1 * jax.random.normal(jax.random.key(1), (2, 3))}
    else:
      space = SearchSpace.uniform(CANDIDATES, layers=1)  # as the tiny configs
      head = {"car": ("car_decoder", dict(out_channels=1)),
              "supervised": ("classifier", dict(num_classes=10, dropout=0.0))}
      model = make_model(space.layer_ops(), WIDTH, head[objective_name][0],
                         zero_init_residual=True, **head[objective_name][1])
      alphas = init_alphas(space, jax.random.key(1), 0.1)
    state = init_search_state(model, alphas, w_tx, a_tx, key,
                              objective.input_shape((1, IMAGE, IMAGE, 1)))
    step = jax.jit(make_search_step(model, objective, w_tx, a_tx, mode))
    inputs = lambda i: (shard(w_batches[i]), shard(a_batches[i]), key)
  state = parallel.replicate(state, mesh)
  out = {}
  for i in range(STEPS):
    state, metrics = step(state, *inputs(i))
    out.update(_flat(f"metrics{i}/", metrics))
  out.update(_flat("state/", state))
  if mode is not None:
    for name, alpha in state.alphas.items():
      copies = [np.asarray(s.data) for s in alpha.addressable_shards]
      assert len(copies) == num_devices
      out[f"alpha_copies/{name}"] = np.stack(copies)
  return out


def main(case: str, path: str) -> None:
  n = jax.device_count()
  one, many = _run(case, 1), _run(case, n)
  np.savez(path, devices=n, **{f"one/{k}": v for k, v in one.items()},
           **{f"many/{k}": v for k, v in many.items()})


if __name__ == "__main__":
  host.collect_garbage_less_often()
  main(*sys.argv[1:])
