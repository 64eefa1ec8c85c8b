"""Training a derived (discrete) network from scratch, and evaluating it: the stages
train and retrieval.

`train` trains the derived network with a classifier head and reports test top-1.
`retrieval` trains it with an L2-normalised embedding head and the proxy-anchor
(or multi-similarity) loss on the training classes only, then reports Recall@K,
MAP@R and the NMI of k-means on the held-out classes (zero-shot retrieval). Both
leave the trained variables in workdir/<stage>/final_variables.msgpack (and the
last checkpoint in checkpoints/), and run the evaluations their `evals` config
names after the epochs it asks for.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Callable

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax import checks, evaluators, parallel, retrieval
from fanas_jax.genotype import (NAMED_GENOTYPES, Genotype, genotype_from_file, named_genotype,
                               search_space_from_config)
from fanas_jax.logging_utils import note, write_bytes
from fanas_jax.loop import Rollback, compile_step, peek
from fanas_jax.model import Model, make_model, model_options
from fanas_jax.objectives import Objective, make_objective
from fanas_jax.ops.layers import OPS
from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need, StageContext, register_stage, stage_dir
from fanas_jax.steps import TrainState, init_variables, make_train_step

FINAL_VARIABLES = "final_variables.msgpack"
HEADS = {"train": "classifier", "retrieval": "embedding"}
RETRIEVAL_LOSSES = ("proxy_anchor", "multi_similarity")


def count_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _net(model: Model, objective: Objective, mesh: Any) -> Callable[[TrainState], Any]:
  """state -> the trained network at inference, for the evaluators."""
  infer = jax.jit(lambda state, x: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, x, train=False))
  return lambda state: evaluators.Net(infer, state, mesh, objective.head, objective)


def input_shape(ctx: StageContext) -> tuple[int, int, int, int]:
  return (1, ctx.config.image_size, ctx.config.image_size,
          ctx.build.spec(ctx.stage).channels)


def _init_state(ctx: StageContext, model: Model, tx: Any, key: jax.Array,
                start: Callable[[dict[str, Any]], dict[str, Any]]) -> TrainState:
  variables = start(init_variables(model, key, input_shape(ctx)))
  return ctx.build.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])))


def _fresh(variables: dict[str, Any]) -> dict[str, Any]:
  return variables


def fit(ctx: StageContext, model: Model, objective: Objective, data: Any,
        final: Callable[[evaluators.Net], dict[str, float]],
        start: Callable[[dict[str, Any]], dict[str, Any]] = _fresh,
        optimizer: Callable[[int], Any] | None = None
        ) -> tuple[TrainState, dict[str, float]]:
  """Trains `model` on `data` with the stage's recipe (resuming from checkpoints),
  then logs and returns `final(net)`, the stage's closing evaluation.

  start(variables) maps the freshly initialised variables to those training starts
  from (pretrained weights); optimizer(steps_per_epoch) replaces the stage's
  `build.train_optimizer`.
  """
  build, cfg, stage = ctx.build, ctx.cfg, ctx.stage
  steps_per_epoch = build.steps_per_epoch(len(data), cfg.batch_size)
  tx = (optimizer or (lambda steps: build.train_optimizer(cfg, steps)))(steps_per_epoch)
  it = build.train_iterator(stage, data, ctx.config.seed + zlib.crc32(stage.encode()) % 1000)
  k_init, k_steps = jax.random.split(build.stage_key(stage))
  state = _init_state(ctx, model, tx, k_init, start)
  step_fn = jax.jit(make_train_step(model, objective, tx), donate_argnums=0)
  net = _net(model, objective, build.mesh)
  evals = evaluators.Evals(cfg.get("evals"), build, stage)

  with build.stage_run(stage, [it], steps_per_epoch, cfg.epochs, cfg.batch_size) as run:
    state = run.start(state)
    _describe(ctx, state, steps_per_epoch)
    if not run.finished:
      step_fn = compile_step(step_fn, stage, state, build.shard(peek(it)), k_steps)
    while not run.finished:
      try:
        state = run.step(step_fn, state, (build.shard(next(it)), k_steps))
        if run.loop.epoch_ended:
          end = run.end_epoch()
          run.bar.set_postfix(loss=f"{end.means['loss']:.3f}")
          run.writer.write(int(state.step), dict(end.means, epoch=end.epoch,
                                                 epoch_seconds=end.seconds))
          evaluators.log(run, int(state.step), evals.run_due(net(state), end.epoch,
                                                             cfg.epochs))
        run.checkpoint(state)
      except Rollback as bad:
        state = run.roll_back(bad)
    save_final_variables(ctx.workdir, stage, state)
    scores = final(net(state))
    run.writer.write(int(state.step), scores)
  return state, scores


def _describe(ctx: StageContext, state: TrainState, steps_per_epoch: int) -> None:
  cfg, lr_scale = ctx.cfg, ctx.build.lr_scale(ctx.cfg)
  note(f"[{ctx.stage}] {count_params(state.params):,} params, epochs={cfg.epochs} "
       f"steps/epoch={steps_per_epoch}; "
       f"{parallel.describe(cfg.batch_size, ctx.config.num_devices)}; "
       f"peak lr {lr_scale * cfg.lr:g} (lr={cfg.lr:g} x {lr_scale:g})")


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


# The genotype both stages train.

DERIVED_GENOTYPE = Need("a derived genotype", ("derive",), "train.genotype='searched'",
                        ", or name a genotype (train.genotype: "
                        f"{', '.join(sorted(NAMED_GENOTYPES))} or a genotype.json)")


def _genotype_needs(config: Any, stage: str) -> list[Need]:
  del stage
  return [DERIVED_GENOTYPE] if config.train.genotype == "searched" else []


def configured_genotype(value: str, key: str) -> Genotype | None:
  """train.genotype as a Genotype: a named one, the file a path names, or None for
  'searched' (the derived one, read when the stage runs)."""
  if value == "searched":
    return None
  if value in NAMED_GENOTYPES:
    return named_genotype(value)
  return genotype_from_file(value, key)


def _genotype(ctx: StageContext) -> Genotype:
  genotype = configured_genotype(ctx.config.train.genotype, "train.genotype")
  if genotype is not None:
    return genotype
  _, derived = ctx.source(DERIVED_GENOTYPE)
  return Genotype.from_dict(derived["genotype"])


def _named_ops() -> set[str]:
  return {op for g in NAMED_GENOTYPES.values() for ops in g.stages for op in ops}


def check_config(config: Any, stage: str) -> None:
  """The data, the genotype to train, the batch, the width (for every op it may
  hold), evals; retrieval's classes."""
  try:
    configured_genotype(config.train.genotype, "train.genotype")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  cfg = config[stage]
  spec = checks.check_stage_data(config, stage, [cfg.split, cfg.get("eval_split", cfg.split)],
                                 evaluates=True)
  checks.check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
  space = search_space_from_config(config.search.candidates)
  search_ops = {op for ops in space.candidates for op in ops}
  checks.check_width(cfg.width, set(OPS.names()) & (search_ops | _named_ops()),
                     f"{stage}.width")
  evaluators.check_config(cfg.get("evals"), f"{stage}.evals", HEADS[stage], spec.splits)
  if stage == "retrieval":
    _check_classes(cfg, spec.name, spec.num_classes)


def _check_classes(cfg: Any, dataset: str, num_classes: int) -> None:
  train_c, test_c = list(cfg.train_classes), list(cfg.test_classes)
  bad = [c for c in train_c + test_c if not 0 <= c < num_classes]
  if bad:
    raise ConfigError(f"retrieval classes {bad} are outside 0..{num_classes - 1} "
                      f"of dataset {dataset}.")
  retrieval.check_disjoint(train_c, test_c,
                           "retrieval.train_classes and retrieval.test_classes")
  loss = cfg.get("loss", "proxy_anchor")
  if loss not in RETRIEVAL_LOSSES:
    raise ConfigError(f"retrieval.loss={loss!r} is not a metric-learning loss; valid "
                      f"choices: {', '.join(RETRIEVAL_LOSSES)}.")


# The stages.


def _classification_summary(config: Any, workdir: str, stage: str,
                            result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result
  return ["## classification", "",
          f"- test top-1: **{r['test_top1']:.4f}** on {r['test_examples']} examples",
          f"- network: width {r['width']}, {r['params']:,} parameters, trained from "
          f"scratch for {r['epochs']} epochs", ""]


@register_stage("train", needs=_genotype_needs, check_config=check_config,
                summary=_classification_summary)
def run_classification(ctx: StageContext) -> dict[str, Any]:
  """Trains the genotype with a classifier head; test top-1 on cfg.eval_split."""
  build, cfg, spec = ctx.build, ctx.cfg, ctx.build.spec(ctx.stage)
  genotype = _genotype(ctx)
  model = make_model(genotype.layer_ops(), cfg.width, "classifier",
                     **model_options(ctx.config.model), num_classes=spec.num_classes,
                     dropout=cfg.dropout)
  test_data = build.load_split(ctx.stage, cfg.eval_split)

  def final(net: evaluators.Net) -> dict[str, float]:
    scores = evaluators.run("top1", net, build.eval_batches(ctx.stage, test_data))
    return {"test_top1": scores["top1"], "test_examples": scores["examples"]}

  state, scores = fit(ctx, model, make_objective("supervised", cfg),
                      build.load_split(ctx.stage, cfg.split), final)
  note(f"[{ctx.stage}] test top-1 {scores['test_top1']:.4f} on "
       f"{int(scores['test_examples'])} {cfg.eval_split} examples")
  return {"test_top1": scores["test_top1"], "test_examples": int(scores["test_examples"]),
          "params": count_params(state.params), "genotype": genotype.to_dict(),
          "width": cfg.width, "epochs": cfg.epochs, "init": "scratch"}


def _retrieval_summary(config: Any, workdir: str, stage: str,
                       result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result
  return ["## zero-shot retrieval", "",
          f"- train classes {r['train_classes']}, test classes {r['test_classes']} "
          f"({r['test_examples']} test images)",
          "- " + ", ".join(f"Recall@{k}: **{v:.4f}**" for k, v in r["recall"].items()),
          *([f"- MAP@R: **{r['map_at_r']:.4f}**, NMI: **{r['nmi']:.4f}** ({r['loss']} "
             "loss)"] if "map_at_r" in r else []), ""]


@register_stage("retrieval", needs=_genotype_needs, check_config=check_config,
                summary=_retrieval_summary)
def run_retrieval(ctx: StageContext) -> dict[str, Any]:
  """Trains the genotype with an embedding head on the train classes; Recall@K on
  the held-out classes."""
  build, cfg = ctx.build, ctx.cfg
  genotype = _genotype(ctx)
  train_classes, test_classes = list(cfg.train_classes), list(cfg.test_classes)
  loss = cfg.get("loss", "proxy_anchor")
  model = make_model(genotype.layer_ops(), cfg.width, "embedding",
                     **model_options(ctx.config.model), embed_dim=cfg.embed_dim,
                     num_proxies=len(train_classes) if loss == "proxy_anchor" else 0)
  test_data = build.load_split(ctx.stage, cfg.split, classes=test_classes)

  def final(net: evaluators.Net) -> dict[str, float]:
    scores = evaluators.run("retrieval", net, build.eval_batches(ctx.stage, test_data),
                            ks=tuple(cfg.recall_ks))
    return {k: v for k, v in scores.items() if k != "examples"} | {
        "test_examples": scores["examples"]}

  state, scores = fit(ctx, model, make_objective(loss, cfg),
                      build.load_split(ctx.stage, cfg.split, classes=train_classes, relabel=True),
                      final)
  recall = {str(k): scores[f"recall_at_{k}"] for k in cfg.recall_ks}
  note(f"[{ctx.stage}] zero-shot retrieval on classes {test_classes}: " +
       ", ".join(f"R@{k} {v:.4f}" for k, v in recall.items()) +
       f", MAP@R {scores['map_at_r']:.4f}, NMI {scores['nmi']:.4f}")
  return {"recall": recall, "map_at_r": scores["map_at_r"], "nmi": scores["nmi"],
          "loss": loss, "train_classes": train_classes, "test_classes": test_classes,
          "test_examples": int(scores["test_examples"]),
          "params": count_params(state.params), "genotype": genotype.to_dict()}
