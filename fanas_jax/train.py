"""Training a derived (discrete) network from scratch, and evaluating it.

`run_classification` trains the derived network with a classifier head and reports
test top-1. `run_retrieval` trains it with an L2-normalised embedding head and the
proxy-anchor loss on the training classes only, then reports Recall@K on the
held-out classes (zero-shot retrieval). Both leave the trained variables in
workdir/<stage>/final_variables.msgpack (and the last checkpoint in checkpoints/).
"""
from __future__ import annotations

import os
import zlib
from typing import Any

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax import evaluate, optim, parallel
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset, stage_dataset
from fanas_jax.genotype import Genotype
from fanas_jax.logging_utils import MetricWriter, progress, write_bytes
from fanas_jax.model import Model, make_model, model_options
from fanas_jax.objectives import Objective, make_objective
from fanas_jax.stage import StageLoop, compile_step, peek, stage_dir
from fanas_jax.steps import TrainState, init_variables, make_train_step


FINAL_VARIABLES = "final_variables.msgpack"


def count_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def fit(config: Any, workdir: str, stage: str, model: Model, objective: Objective,
        data: Any, cfg: Any) -> tuple[TrainState, Any]:
  """Trains `model` on `data` with the cfg recipe; resumes from checkpoints."""
  spec = get_dataset(stage_dataset(config, stage))
  mesh = parallel.make_mesh(config.num_devices)
  steps_per_epoch = pipeline.steps_per_epoch(len(data), cfg.batch_size)
  total_steps = cfg.epochs * steps_per_epoch
  lr_scale = parallel.lr_scale(cfg.batch_size, config.lr_reference_batch)
  tx = optim.train_optimizer(cfg, steps_per_epoch, lr_scale)
  it = pipeline.train_iterator(
      data, batch_size=parallel.process_batch_size(cfg.batch_size),
      preprocess=pipeline.train_preprocess(cfg, config.image_size, spec),
      seed=config.seed + zlib.crc32(stage.encode()) % 1000,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(), num_workers=config.data_workers)
  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(stage.encode()))
  k_init, k_steps = jax.random.split(key)
  shape = (1, config.image_size, config.image_size, spec.channels)
  variables = init_variables(model, k_init, shape)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)

  writer = MetricWriter(workdir, stage)
  loop = StageLoop(config, workdir, stage, [it], writer, steps_per_epoch, cfg.epochs,
                   keys={"steps": k_steps})
  state = loop.restore_or(state)
  k_steps = loop.keys["steps"]
  step_fn = jax.jit(make_train_step(model, objective, tx), donate_argnums=0)
  print(f"[{stage}] {count_params(state.params):,} params, epochs={cfg.epochs} "
        f"steps/epoch={steps_per_epoch}; {parallel.describe(cfg.batch_size, config.num_devices)}; "
        f"peak lr {lr_scale * cfg.lr:g} (lr={cfg.lr:g} x {lr_scale:g})")
  if not loop.finished:
    step_fn = compile_step(step_fn, stage, state, parallel.shard_batch(peek(it), mesh),
                           k_steps)
  bar = progress(total_steps, loop.position, cfg.batch_size, stage)

  def end_epoch(epoch: int, state: TrainState, means: dict[str, float],
                seconds: float) -> None:
    bar.set_postfix(loss=f"{means['loss']:.3f}")
    writer.write(int(state.step), dict(means, epoch=epoch, epoch_seconds=seconds))

  try:
    state = loop.run(step_fn, state, lambda: (parallel.shard_batch(next(it), mesh), k_steps),
                     end_epoch, bar, cfg.batch_size)
  except BaseException:
    writer.close()
    raise
  finally:
    bar.close()
    loop.close()
  return state, writer


def save_final_variables(workdir: str, stage: str, state: TrainState) -> str:
  """workdir/<stage>/final_variables.msgpack: {'params', 'batch_stats'} of the trained
  network, for `flax.serialization.msgpack_restore` (or `load_final_variables`)."""
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                      {"params": state.params, "batch_stats": state.batch_stats})
  path = os.path.join(stage_dir(workdir, stage), FINAL_VARIABLES)
  write_bytes(path, serialization.to_bytes(host))
  return path


def load_final_variables(workdir: str, stage: str) -> dict[str, Any]:
  """The {'params', 'batch_stats'} that `save_final_variables` wrote, as numpy arrays."""
  with open(os.path.join(stage_dir(workdir, stage), FINAL_VARIABLES), "rb") as f:
    return serialization.msgpack_restore(f.read())


def _eval_apply(model: Model):
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def run_classification(config: Any, workdir: str, genotype: Genotype,
                       stage: str = "train") -> dict[str, Any]:
  cfg = config.train
  dataset = stage_dataset(config, stage)
  spec = get_dataset(dataset)
  model = make_model(genotype.layer_ops(), cfg.width, "classifier", **model_options(config.model),
                     num_classes=spec.num_classes, dropout=cfg.dropout)
  train_data = pipeline.load_split(dataset, cfg.split, config.data_dir or None,
                                  bad_examples=config.bad_examples)
  test_data = pipeline.load_split(dataset, cfg.eval_split, config.data_dir or None,
                                  bad_examples=config.bad_examples)
  state, writer = fit(config, workdir, stage, model, make_objective("supervised", cfg),
                      train_data, cfg)
  save_final_variables(workdir, stage, state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  correct = total = 0.0
  for logits, labels, mask in evaluate.predict(
      _eval_apply(model), variables, test_data, batch_size=config.eval_batch_size,
      preprocess=pipeline.eval_preprocess(cfg, config.image_size, spec),
      mesh=parallel.make_mesh(config.num_devices)):
    c, n = evaluate.top1_accuracy(logits, labels, mask)
    correct, total = correct + c, total + n
  top1 = correct / total
  writer.write(int(state.step), {"test_top1": top1, "test_examples": total})
  writer.close()
  print(f"[{stage}] test top-1 {top1:.4f} on {int(total)} {cfg.eval_split} examples")
  return {"test_top1": top1, "test_examples": int(total),
          "params": count_params(state.params), "genotype": genotype.to_dict(),
          "width": cfg.width, "epochs": cfg.epochs, "init": "scratch"}


def run_retrieval(config: Any, workdir: str, genotype: Genotype,
                  stage: str = "retrieval") -> dict[str, Any]:
  cfg = config.retrieval
  dataset = stage_dataset(config, stage)
  spec = get_dataset(dataset)
  train_classes, test_classes = list(cfg.train_classes), list(cfg.test_classes)
  model = make_model(genotype.layer_ops(), cfg.width, "embedding", **model_options(config.model),
                     embed_dim=cfg.embed_dim, num_proxies=len(train_classes))
  train_data = pipeline.load_split(dataset, cfg.split, config.data_dir or None,
                                   classes=train_classes, relabel=True,
                                   bad_examples=config.bad_examples)
  test_data = pipeline.load_split(dataset, cfg.split, config.data_dir or None,
                                  classes=test_classes, bad_examples=config.bad_examples)
  state, writer = fit(config, workdir, stage, model, make_objective("proxy_anchor", cfg),
                      train_data, cfg)
  save_final_variables(workdir, stage, state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  embeddings, labels = [], []
  for out, lab, mask in evaluate.predict(
      _eval_apply(model), variables, test_data, batch_size=config.eval_batch_size,
      preprocess=pipeline.eval_preprocess(cfg, config.image_size, spec),
      mesh=parallel.make_mesh(config.num_devices)):
    keep = mask > 0
    embeddings.append(out["embedding"][keep])
    labels.append(lab[keep])
  recall = evaluate.recall_at_k(np.concatenate(embeddings), np.concatenate(labels),
                                cfg.recall_ks)
  writer.write(int(state.step), {f"recall_at_{k}": v for k, v in recall.items()})
  writer.close()
  print(f"[{stage}] zero-shot retrieval on classes {test_classes}: " +
        ", ".join(f"R@{k} {v:.4f}" for k, v in recall.items()))
  return {"recall": {str(k): v for k, v in recall.items()},
          "train_classes": train_classes, "test_classes": test_classes,
          "test_examples": int(sum(len(l) for l in labels)),
          "params": count_params(state.params), "genotype": genotype.to_dict()}
