"""The bilevel DARTS-style search of SPEC.md 3 (one phase).

Each step first updates the architecture (alphas) on a batch from the architecture
half of the data, then the weights on a batch from the weight half, with separate
optax optimizers. Both halves have their own persistent iterator, so the alpha step
walks through the whole architecture half. Phase 1 uses the `car` objective
(labels unused), phase 2 `supervised` with alphas initialised from phase 1. The
alpha gradient is first order, second order or Gumbel single-path (`mode`), and
the first `warmup_epochs` epochs train the weights only.
"""
from __future__ import annotations

import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fanas_jax import optim, parallel
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset, stage_dataset
from fanas_jax.derive import budget_from_config, derive, layer_entropy, log_softmax
from fanas_jax.genotype import DeriveLimits, search_space_from_config
from fanas_jax.logging_utils import MetricWriter, progress
from fanas_jax.model import make_model, model_options
from fanas_jax.objectives import make_objective
from fanas_jax.stage import StageLoop, compile_step, peek, stage_dir, write_json
from fanas_jax.steps import init_alphas, init_search_state, make_search_step


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_search_phase(config: Any, workdir: str, stage: str,
                     init_alpha: dict[str, np.ndarray] | None) -> dict[str, Any]:
  """Runs one search phase into workdir/<stage>/ and returns its result record."""
  cfg = config[stage]
  dataset = stage_dataset(config, stage)
  spec = get_dataset(dataset)
  space = search_space_from_config(config.search.candidates)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  budget = budget_from_config(config)
  objective = make_objective(cfg.objective, _objective_config(config, cfg, spec))
  head_cfg = {"car_decoder": dict(out_channels=spec.channels),
              "cpc": objective.head_config,
              "classifier": dict(num_classes=spec.num_classes, dropout=0.0)}[objective.head]
  model = make_model(space.layer_ops(), config.model.width, objective.head,
                     **model_options(config.model), **head_cfg)

  data = pipeline.load_split(dataset, cfg.split, config.data_dir or None,
                             bad_examples=config.bad_examples)
  w_half, a_half = pipeline.split_halves(data, config.seed)
  steps_per_epoch = pipeline.steps_per_epoch(min(len(w_half), len(a_half)), cfg.batch_size)
  total_steps = cfg.epochs * steps_per_epoch
  local_batch = parallel.process_batch_size(cfg.batch_size)
  iterator = lambda half, seed: pipeline.train_iterator(
      half, batch_size=local_batch, seed=seed,
      preprocess=pipeline.train_preprocess(cfg, config.image_size, spec),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(), num_workers=config.data_workers)
  w_iter = iterator(w_half, config.seed)
  a_iter = iterator(a_half, config.seed + 1)

  lr_scale = parallel.lr_scale(cfg.batch_size, config.lr_reference_batch)
  w_tx = optim.search_weight_optimizer(cfg, steps_per_epoch, lr_scale)
  a_tx = optim.alpha_optimizer(cfg)
  key = jax.random.key(config.seed)
  k_init, k_alpha, k_steps = jax.random.split(
      jax.random.fold_in(key, zlib.crc32(stage.encode())), 3)
  alphas = (init_alphas(space, k_alpha, cfg.alpha_init_std) if init_alpha is None
            else jax.tree.map(jnp.asarray, init_alpha))
  input_shape = objective.input_shape(
      (1, config.image_size, config.image_size, spec.channels))
  mesh = parallel.make_mesh(config.num_devices)
  state = parallel.replicate(init_search_state(model, alphas, w_tx, a_tx, k_init,
                                               input_shape), mesh)

  writer = MetricWriter(workdir, stage)
  loop = StageLoop(config, workdir, stage, [w_iter, a_iter], writer, steps_per_epoch,
                   cfg.epochs, keys={"steps": k_steps})
  state = loop.restore_or(state)
  k_steps = loop.keys["steps"]
  warmup_steps = cfg.warmup_epochs * steps_per_epoch
  tau_schedule = (optim.gumbel_temperature(cfg, total_steps) if cfg.mode == "gumbel"
                  else None)
  step_fn = jax.jit(make_search_step(model, objective, w_tx, a_tx, cfg.mode,
                                     warmup_steps=warmup_steps,
                                     tau_schedule=tau_schedule), donate_argnums=0)
  print(f"[{stage}] objective={cfg.objective} epochs={cfg.epochs} "
        f"steps/epoch={steps_per_epoch} weight half={len(w_half)} "
        f"architecture half={len(a_half)}")
  print(f"[{stage}] {parallel.describe(cfg.batch_size, config.num_devices)} per half; "
        f"weight lr {lr_scale * cfg.w_lr:g} (w_lr={cfg.w_lr:g} x {lr_scale:g}), "
        f"alpha lr {cfg.a_lr:g}")
  print(f"[{stage}] mode={cfg.mode} alpha warm-up={cfg.warmup_epochs} epochs "
        f"({warmup_steps} weight-only steps)" +
        (f" gumbel tau {cfg.gumbel_tau_max} -> {cfg.gumbel_tau_min}"
         if cfg.mode == "gumbel" else ""))
  next_inputs = lambda: (parallel.shard_batch(next(w_iter), mesh),
                         parallel.shard_batch(next(a_iter), mesh), k_steps)
  if not loop.finished:
    step_fn = compile_step(step_fn, stage, state,
                           parallel.shard_batch(peek(w_iter), mesh),
                           parallel.shard_batch(peek(a_iter), mesh), k_steps)
  bar = progress(total_steps, loop.position, cfg.batch_size, stage)

  def end_epoch(epoch: int, state: Any, means: dict[str, float], seconds: float) -> None:
    # Warm-up spans whole epochs; there the alpha pass did not run, so its metrics
    # are placeholders and are dropped.
    alpha_updated = means["alpha_updated"] > 0
    if not alpha_updated:
      means = {k: v for k, v in means.items() if not k.startswith("a_")}
    a_loss = means["a_loss"] if alpha_updated else None
    alphas_np = _to_numpy(state.alphas)
    genotype = derive(alphas_np, space, config.derive.rule, limits, budget)
    entropy = layer_entropy(alphas_np)
    record = dict(means, epoch=epoch, mode=cfg.mode, epoch_seconds=seconds,
                  mean_alpha_entropy=float(np.mean(list(entropy.values()))),
                  **_per_layer_scalars(alphas_np, entropy, space))
    _collapse_alarm(stage, epoch, entropy, alphas_np, space)
    bar.set_postfix(w_loss=f"{means['w_loss']:.3f}",
                    a_loss="warm-up" if a_loss is None else f"{a_loss:.3f}")
    history = loop.carry.get("history", []) + [{
        "epoch": epoch, "w_loss": means["w_loss"], "a_loss": a_loss,
        "alpha_updated": alpha_updated,
        "alphas": {k: v.tolist() for k, v in alphas_np.items()},
        "entropy": {k: v.tolist() for k, v in entropy.items()},
        "genotype": genotype.to_dict()}]
    # The best genotype so far travels in the checkpoint with the history.
    alpha_epochs = any(h["a_loss"] is not None for h in history)
    best = select_epoch(history, config.derive.select) if alpha_epochs else history[-1]
    loop.carry = {"history": history, "best_epoch": best["epoch"],
                  "best_genotype": best["genotype"]}
    writer.write(int(state.step), dict(record, genotype=genotype.to_dict()))

  try:
    state = loop.run(step_fn, state, next_inputs, end_epoch, bar, cfg.batch_size)
  finally:
    bar.close()
    loop.close()
    writer.close()
  history = loop.carry["history"]

  out_dir = stage_dir(workdir, stage)
  write_json(os.path.join(out_dir, "alpha_history.json"), history)
  chosen = select_epoch(history, config.derive.select)
  first_alpha_epoch = next(h for h in history if h.get("alpha_updated", True))
  genotype = derive(chosen["alphas"], space, config.derive.rule, limits, budget)
  write_json(os.path.join(out_dir, "genotype.json"),
             {"genotype": genotype.to_dict(), "epoch": chosen["epoch"],
              "select": config.derive.select, "rule": config.derive.rule,
              "alphas": chosen["alphas"]})
  return {"genotype": genotype.to_dict(), "alphas": chosen["alphas"],
          "epoch": chosen["epoch"], "final_alphas": history[-1]["alphas"],
          "final_w_loss": history[-1]["w_loss"], "final_a_loss": history[-1]["a_loss"],
          "first_a_loss": first_alpha_epoch["a_loss"],
          "first_a_epoch": first_alpha_epoch["epoch"],
          "entropy_first": float(np.mean([np.mean(v) for v in history[0]["entropy"].values()])),
          "entropy_last": float(np.mean([np.mean(v) for v in history[-1]["entropy"].values()]))}


def _per_layer_scalars(alphas: dict[str, np.ndarray], entropy: dict[str, np.ndarray],
                       space: Any) -> dict[str, float]:
  """'alpha/stageS/layerL/OP' (softmax weight) and 'entropy/stageS/layerL' scalars, so
  JSON lines and TensorBoard show every layer's mixture over the epochs."""
  out = {}
  for s, ops in enumerate(space.candidates):
    name = f"stage{s + 1}"
    probs = np.exp(log_softmax(alphas[name]))
    for l in range(probs.shape[0]):
      out[f"entropy/{name}/layer{l + 1}"] = float(entropy[name][l])
      out.update({f"alpha/{name}/layer{l + 1}/{op}": float(probs[l, o])
                  for o, op in enumerate(ops)})
  return out


# A layer whose mixture entropy falls under this fraction of uniform has all but
# chosen one op: early in a search that is the DARTS collapse to watch for.
COLLAPSE_FRACTION = 0.25


def _collapse_alarm(stage: str, epoch: int, entropy: dict[str, np.ndarray],
                    alphas: dict[str, np.ndarray], space: Any) -> None:
  for s, ops in enumerate(space.candidates):
    name = f"stage{s + 1}"
    uniform = np.log(len(ops))
    for l, h in enumerate(entropy[name]):
      if len(ops) > 1 and h < COLLAPSE_FRACTION * uniform:
        top = ops[int(np.argmax(alphas[name][l]))]
        print(f"[{stage}] epoch {epoch}: {name} layer {l + 1} has collapsed onto {top} "
              f"(entropy {h:.3f} nats, uniform {uniform:.3f})", flush=True)


def select_epoch(history: list[dict[str, Any]], select: str) -> dict[str, Any]:
  """'last': the final epoch; 'best': the epoch with the lowest architecture-half loss
  (alpha warm-up epochs have none and are skipped)."""
  if select == "last":
    return history[-1]
  if select == "best":
    return min((h for h in history if h["a_loss"] is not None), key=lambda h: h["a_loss"])
  raise ValueError(f"Unknown derive.select {select!r}; valid choices: best, last.")


def _objective_config(config: Any, cfg: Any, spec: Any) -> Any:
  return ml_collections.ConfigDict(dict(
      image_size=config.image_size, num_boxes=cfg.get("num_boxes", 4),
      box_size=cfg.get("box_size", 8), num_classes=spec.num_classes,
      cpc=cfg.get("cpc")))
