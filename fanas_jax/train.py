"""Training a derived (discrete) network and evaluating it: the stage train.

`train` trains the derived network with a classifier head and reports test top-1,
from scratch (the authors' protocol) or, with `train.init='supernet'`, from the
chosen ops' weights of the search supernet (fanas_jax/inherit.py). It leaves the
trained variables in workdir/train/final_variables.msgpack (and the last
checkpoint in checkpoints/), and runs the evaluations its `evals` config names
after the epochs it asks for. `fit` is the training loop that the stages
retrieval (fanas_jax/zero_shot.py) and finetune (fanas_jax/finetune.py) share.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Callable

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax import checks, evaluators, inherit, parallel
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


def fresh(variables: dict[str, Any]) -> dict[str, Any]:
  """`fit`'s default start: the freshly initialised variables themselves."""
  return variables


def fit(ctx: StageContext, model: Model, objective: Objective, data: Any,
        final: Callable[[evaluators.Net], dict[str, float]],
        start: Callable[[dict[str, Any]], dict[str, Any]] = fresh,
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


def genotype_needs(config: Any, stage: str) -> list[Need]:
  """The derive stage, when train.genotype is 'searched'."""
  del stage
  return [DERIVED_GENOTYPE] if config.train.genotype == "searched" else []


def _train_needs(config: Any, stage: str) -> list[Need]:
  supernet = [inherit.SUPERNET] if config.train.init == "supernet" else []
  return genotype_needs(config, stage) + supernet


def configured_genotype(value: str, key: str) -> Genotype | None:
  """train.genotype as a Genotype: a named one, the file a path names, or None for
  'searched' (the derived one, read when the stage runs)."""
  if value == "searched":
    return None
  if value in NAMED_GENOTYPES:
    return named_genotype(value)
  return genotype_from_file(value, key)


def stage_genotype(ctx: StageContext) -> Genotype:
  """The genotype train.genotype names (the derived one for 'searched')."""
  genotype = configured_genotype(ctx.config.train.genotype, "train.genotype")
  if genotype is not None:
    return genotype
  _, derived = ctx.source(DERIVED_GENOTYPE)
  return Genotype.from_dict(derived["genotype"])


def _named_ops() -> set[str]:
  return {op for g in NAMED_GENOTYPES.values() for ops in g.stages for op in ops}


def check_genotype_config(config: Any) -> None:
  """train.genotype names a genotype ('searched', a named one or a genotype.json)."""
  try:
    configured_genotype(config.train.genotype, "train.genotype")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_network_width(config: Any, width: int, key: str) -> None:
  """`width` holds every op the trained genotype may hold (searched or named)."""
  space = search_space_from_config(config.search)
  search_ops = {op for ops in space.candidates for op in ops}
  checks.check_width(width, set(OPS.names()) & (search_ops | _named_ops()), key)


def check_config(config: Any, stage: str) -> None:
  """The genotype to train and how it starts, the data, the batch, the width (for
  every op it may hold), the evals."""
  check_genotype_config(config)
  inherit.check_config(config)
  cfg = config[stage]
  spec = checks.check_stage_data(config, stage, [cfg.split, cfg.eval_split], evaluates=True)
  checks.check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
  check_network_width(config, cfg.width, f"{stage}.width")
  evaluators.check_config(cfg.get("evals"), f"{stage}.evals", "classifier", spec.splits)


# The stages.


def _classification_summary(config: Any, workdir: str, stage: str,
                            result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result
  start = ("from scratch" if r["init"] == "scratch"
           else f"from the supernet weights of {r['init_from']}")
  return ["## classification", "",
          f"- test top-1: **{r['test_top1']:.4f}** on {r['test_examples']} examples",
          f"- network: width {r['width']}, {r['params']:,} parameters, trained {start} "
          f"for {r['epochs']} epochs (train.init={r['init']!r})", ""]


def _start(ctx: StageContext) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], str]:
  """(variables -> the starting variables, where they come from) for train.init."""
  if ctx.cfg.init == "scratch":
    note(f"[{ctx.stage}] init: from scratch (train.init='scratch')")
    return fresh, ""
  source, _ = ctx.source(inherit.SUPERNET)
  where = inherit.latest_checkpoint(stage_dir(ctx.workdir, source))
  note(f"[{ctx.stage}] init: the chosen ops' supernet weights of {source} "
       f"({where}; train.init='supernet'); head and preprocess BN scale/bias fresh")
  return inherit.start_from_supernet(inherit.read_supernet(where), where), where


@register_stage("train", needs=_train_needs, check_config=check_config,
                summary=_classification_summary)
def run_classification(ctx: StageContext) -> dict[str, Any]:
  """Trains the genotype with a classifier head; test top-1 on cfg.eval_split."""
  build, cfg, spec = ctx.build, ctx.cfg, ctx.build.spec(ctx.stage)
  genotype = stage_genotype(ctx)
  model = make_model(genotype.layer_ops(), cfg.width, "classifier",
                     **model_options(ctx.config.model), num_classes=spec.num_classes,
                     dropout=cfg.dropout)
  start, init_from = _start(ctx)
  test_data = build.load_split(ctx.stage, cfg.eval_split)

  def final(net: evaluators.Net) -> dict[str, float]:
    scores = evaluators.run("top1", net, build.eval_batches(ctx.stage, test_data))
    return {"test_top1": scores["top1"], "test_examples": scores["examples"]}

  state, scores = fit(ctx, model, make_objective("supervised", cfg),
                      build.load_split(ctx.stage, cfg.split), final, start=start)
  note(f"[{ctx.stage}] test top-1 {scores['test_top1']:.4f} on "
       f"{int(scores['test_examples'])} {cfg.eval_split} examples")
  return {"test_top1": scores["test_top1"], "test_examples": int(scores["test_examples"]),
          "params": count_params(state.params), "genotype": genotype.to_dict(),
          "width": cfg.width, "epochs": cfg.epochs, "init": cfg.init,
          "init_from": init_from}
