"""The bilevel, first-order DARTS-style search of SPEC.md 3 (one phase).

Each step first updates the architecture (alphas) on a batch from the architecture
half of the data, then the weights on a batch from the weight half, with separate
optax optimizers. Both halves have their own persistent iterator, so the alpha step
walks through the whole architecture half. Phase 1 uses the `car` objective
(labels unused), phase 2 `supervised` with alphas initialised from phase 1.
"""
from __future__ import annotations

import os
import time
import zlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fanas_jax import optim, parallel
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset
from fanas_jax.derive import derive, layer_entropy
from fanas_jax.genotype import DeriveLimits, SearchSpace, search_space_from_config
from fanas_jax.logging_utils import MetricWriter, progress
from fanas_jax.model import Model, make_model
from fanas_jax.objectives import Objective, make_objective
from fanas_jax.stage import (EpochCheckpoints, compile_step, peek, run_epoch, stage_dir,
                             write_json)


@flax.struct.dataclass
class SearchState:
  step: jax.Array
  params: Any
  batch_stats: Any
  alphas: Any
  w_opt_state: Any
  a_opt_state: Any


def init_alphas(space: SearchSpace, rng: jax.Array, std: float) -> dict[str, jax.Array]:
  """1e-3 * N(0, 1) per stage, shape [layers, n_ops] (SPEC.md 2)."""
  return {name: std * jax.random.normal(jax.random.fold_in(rng, i), shape)
          for i, (name, shape) in enumerate(sorted(space.alpha_shapes().items()))}


def init_search_state(model: Model, alphas: Any, w_tx: optax.GradientTransformation,
                      a_tx: optax.GradientTransformation, rng: jax.Array,
                      input_shape: tuple[int, ...]) -> SearchState:
  variables = init_variables(model, rng, input_shape, alphas)
  params = variables["params"]
  return SearchState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"], alphas=alphas,
                     w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(alphas))


def init_variables(model: Model, rng: jax.Array, input_shape: tuple[int, ...],
                   alphas: Any = None) -> Any:
  """Initial variables without running the network.

  `lazy_init` traces the network on abstract inputs and only computes the
  initializers, op by op. For a supernet this takes seconds, where a jitted init
  spends minutes of XLA compile on its hundreds of random initializers.
  """
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  if alphas is None:
    return model.lazy_init(rng, x)
  alphas = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), alphas)
  return model.lazy_init(rng, x, alphas)


def make_loss_fn(model: Model, objective: Objective) -> Callable:
  """(params, alphas, batch_stats, batch, key) -> (loss, (metrics, new batch_stats))."""

  def loss_fn(params, alphas, batch_stats, batch, key):
    k_inputs, k_dropout = jax.random.split(key)
    inputs, targets = objective.make_inputs(batch, k_inputs)
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                               alphas, train=True, mutable=["batch_stats"],
                               rngs={"dropout": k_dropout})
    loss, metrics = objective.loss(out, targets)
    return loss, (metrics, mutated["batch_stats"])

  return loss_fn


def make_search_step(model: Model, objective: Objective, w_tx: optax.GradientTransformation,
                     a_tx: optax.GradientTransformation) -> Callable:
  """One first-order bilevel step: alpha on the architecture batch, then weights.

  The alpha pass runs the network in training mode (batch statistics) but leaves the
  running batch-norm statistics untouched; only the weight pass updates them. Each
  optimizer only ever sees its own gradients.
  """
  loss_fn = make_loss_fn(model, objective)
  arch_grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
  weight_grad = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)

  def step(state: SearchState, w_batch, a_batch, key):
    k_arch, k_weight = jax.random.split(jax.random.fold_in(key, state.step))
    (a_loss, (a_metrics, _)), a_grads = arch_grad(
        state.params, state.alphas, state.batch_stats, a_batch, k_arch)
    a_updates, a_opt_state = a_tx.update(a_grads, state.a_opt_state, state.alphas)
    alphas = optax.apply_updates(state.alphas, a_updates)
    (w_loss, (w_metrics, batch_stats)), w_grads = weight_grad(
        state.params, alphas, state.batch_stats, w_batch, k_weight)
    w_updates, w_opt_state = w_tx.update(w_grads, state.w_opt_state, state.params)
    params = optax.apply_updates(state.params, w_updates)
    metrics = {"w_loss": w_loss, "a_loss": a_loss,
               "w_grad_norm": optax.tree.norm(w_grads),
               "a_grad_norm": optax.tree.norm(a_grads)}
    metrics.update({f"w_{k}": v for k, v in w_metrics.items()})
    metrics.update({f"a_{k}": v for k, v in a_metrics.items()})
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              alphas=alphas, w_opt_state=w_opt_state,
                              a_opt_state=a_opt_state)
    return new_state, metrics

  return step


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_search_phase(config: Any, workdir: str, stage: str,
                     init_alpha: dict[str, np.ndarray] | None) -> dict[str, Any]:
  """Runs one search phase into workdir/<stage>/ and returns its result record."""
  cfg = config[stage]
  spec = get_dataset(config.dataset)
  space = search_space_from_config(config.search.candidates)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  objective = make_objective(cfg.objective, _objective_config(config, cfg, spec))
  head_cfg = {"car_decoder": dict(out_channels=spec.channels),
              "classifier": dict(num_classes=spec.num_classes, dropout=0.0)}[objective.head]
  model = make_model(space.layer_ops(), config.model.width, objective.head,
                     stem=config.model.stem, **head_cfg)

  data = pipeline.load_split(config.dataset, cfg.split, config.data_dir or None)
  w_half, a_half = pipeline.split_halves(data, config.seed)
  steps_per_epoch = pipeline.steps_per_epoch(min(len(w_half), len(a_half)), cfg.batch_size)
  total_steps = cfg.epochs * steps_per_epoch
  local_batch = parallel.process_batch_size(cfg.batch_size)
  iterator = lambda half, seed: pipeline.train_iterator(
      half, batch_size=local_batch, image_size=config.image_size, mean=spec.mean,
      std=spec.std, seed=seed, flip=cfg.flip, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  w_iter = iterator(w_half, config.seed)
  a_iter = iterator(a_half, config.seed + 1)

  w_tx = optim.search_weight_optimizer(cfg, total_steps)
  a_tx = optim.alpha_optimizer(cfg)
  key = jax.random.key(config.seed)
  k_init, k_alpha, k_steps = jax.random.split(
      jax.random.fold_in(key, zlib.crc32(stage.encode())), 3)
  alphas = (init_alphas(space, k_alpha, cfg.alpha_init_std) if init_alpha is None
            else jax.tree.map(jnp.asarray, init_alpha))
  input_shape = (1, config.image_size, config.image_size, spec.channels)
  mesh = parallel.make_mesh()
  state = parallel.replicate(init_search_state(model, alphas, w_tx, a_tx, k_init,
                                               input_shape), mesh)

  ckpts = EpochCheckpoints(workdir, stage, [w_iter, a_iter])
  state, start_epoch, extra = ckpts.restore_or(state)
  history = extra.get("history", [])
  step_fn = jax.jit(make_search_step(model, objective, w_tx, a_tx), donate_argnums=0)
  writer = MetricWriter(workdir, stage)
  print(f"[{stage}] objective={cfg.objective} epochs={cfg.epochs} "
        f"steps/epoch={steps_per_epoch} global batch={cfg.batch_size} "
        f"({local_batch}/process, {jax.device_count()} devices) "
        f"weight half={len(w_half)} architecture half={len(a_half)}")
  next_inputs = lambda: (parallel.shard_batch(next(w_iter), mesh),
                         parallel.shard_batch(next(a_iter), mesh), k_steps)
  if start_epoch < cfg.epochs:
    step_fn = compile_step(step_fn, stage, state,
                           parallel.shard_batch(peek(w_iter), mesh),
                           parallel.shard_batch(peek(a_iter), mesh), k_steps)
  bar = progress(total_steps, start_epoch * steps_per_epoch, cfg.batch_size, stage)
  for epoch in range(start_epoch, cfg.epochs):
    t0 = time.time()
    state, means = run_epoch(step_fn, state, next_inputs, steps_per_epoch, bar,
                             cfg.batch_size)
    alphas_np = _to_numpy(state.alphas)
    genotype = derive(alphas_np, space, config.derive.rule, limits)
    entropy = layer_entropy(alphas_np)
    record = dict(means, epoch=epoch + 1,
                  epoch_seconds=time.time() - t0,
                  mean_alpha_entropy=float(np.mean(list(entropy.values()))))
    bar.set_postfix(w_loss=f"{means['w_loss']:.3f}", a_loss=f"{means['a_loss']:.3f}")
    history.append({"epoch": epoch + 1, "w_loss": means["w_loss"],
                    "a_loss": means["a_loss"],
                    "alphas": {k: v.tolist() for k, v in alphas_np.items()},
                    "entropy": {k: v.tolist() for k, v in entropy.items()},
                    "genotype": genotype.to_dict()})
    writer.write(int(state.step), dict(record, genotype=genotype.to_dict()))
    ckpts.save(int(state.step), epoch + 1, state, {"history": history})
  bar.close()
  ckpts.close()
  writer.close()

  out_dir = stage_dir(workdir, stage)
  write_json(os.path.join(out_dir, "alpha_history.json"), history)
  chosen = select_epoch(history, config.derive.select)
  genotype = derive(chosen["alphas"], space, config.derive.rule, limits)
  write_json(os.path.join(out_dir, "genotype.json"),
             {"genotype": genotype.to_dict(), "epoch": chosen["epoch"],
              "select": config.derive.select, "rule": config.derive.rule,
              "alphas": chosen["alphas"]})
  return {"genotype": genotype.to_dict(), "alphas": chosen["alphas"],
          "epoch": chosen["epoch"], "final_alphas": history[-1]["alphas"],
          "final_w_loss": history[-1]["w_loss"], "final_a_loss": history[-1]["a_loss"],
          "first_a_loss": history[0]["a_loss"],
          "entropy_first": float(np.mean([np.mean(v) for v in history[0]["entropy"].values()])),
          "entropy_last": float(np.mean([np.mean(v) for v in history[-1]["entropy"].values()]))}


def select_epoch(history: list[dict[str, Any]], select: str) -> dict[str, Any]:
  """'last': the final epoch; 'best': the epoch with the lowest architecture-half loss."""
  if select == "last":
    return history[-1]
  if select == "best":
    return min(history, key=lambda h: h["a_loss"])
  raise ValueError(f"Unknown derive.select {select!r}; valid choices: best, last.")


def _objective_config(config: Any, cfg: Any, spec: Any) -> Any:
  return ml_collections.ConfigDict(dict(
      image_size=config.image_size, num_boxes=cfg.get("num_boxes", 4),
      box_size=cfg.get("box_size", 8), num_classes=spec.num_classes))
