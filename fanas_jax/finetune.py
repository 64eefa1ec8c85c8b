"""Fine-tuning: the stage finetune starts a derived network from pretrained weights.

The backbone (stem and five stages, batch-norm statistics included) is copied from
`finetune.pretrained` exactly; the classifier head is new, sized for the stage's
dataset. The pretrained weights name their own architecture: a derived network's
parameter paths are `backbone/stage{s}_layer{l}_{op}/...`, so the genotype and the
width are read from them, and an explicit `finetune.genotype` must agree. Options:
the head's learning-rate multiplier, frozen batch-norm statistics, frozen stages.

Sources (`finetune.pretrained`): a stage of this workdir that leaves trained weights
(train, retrieval); a `final_variables.msgpack` file, or a stage directory holding
one (another run's RUN/train); an orbax checkpoint step directory
(RUN/train/checkpoints/STEP). The retrieval stage starts from pretrained weights
through the same functions (fanas_jax/zero_shot.py), its errors naming its own keys.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fanas_jax import checks, evaluators, optim
from fanas_jax.genotype import (NAMED_GENOTYPES, NUM_STAGES, Genotype,
                                genotype_from_file, named_genotype, stage_name)
from fanas_jax.logging_utils import note
from fanas_jax.model import make_model, model_options
from fanas_jax.objectives import make_objective
from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need, StageContext, register_stage, stage_dir
from fanas_jax.train import FINAL_VARIABLES, count_params, fit, input_shape

# Stages of this workdir whose trained weights a fine-tune can start from.
SOURCE_STAGES = ("train", "retrieval")
# What `finetune.freeze` may name: the stem and the five stages.
FREEZABLE = ("stem",) + tuple(stage_name(s) for s in range(NUM_STAGES))
_LAYER = re.compile(r"^(stage\d+)_layer(\d+)_(.+)$")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Weights to start from: {'params', 'batch_stats'} (numpy), where they came from,
  and the architecture they name."""
  variables: dict[str, Any]
  where: str
  genotype: Genotype
  width: int


def source_path(source: str, workdir: str) -> str:
  """What a `pretrained` key names on disk: a stage of this run is workdir/STAGE."""
  return stage_dir(workdir, source) if source in SOURCE_STAGES else source


def read_variables(path: str, key: str = "finetune.pretrained") -> dict[str, Any]:
  """{'params', 'batch_stats'} from a msgpack file, a directory holding
  final_variables.msgpack, or an orbax checkpoint step directory; errors name `key`."""
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, FINAL_VARIABLES)):
    path = os.path.join(path, FINAL_VARIABLES)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      try:
        tree = serialization.msgpack_restore(f.read())
      except Exception as e:  # msgpack raises its own types for each kind of damage.
        raise ConfigError(f"{key}={path!r} is not a msgpack of variables "
                          f"({type(e).__name__}).") from None
  elif os.path.isdir(os.path.join(path, "state")):
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  else:
    raise ConfigError(
        f"{key}={path!r}: no such file or checkpoint; give a stage of this "
        f"workdir ({', '.join(SOURCE_STAGES)}), a {FINAL_VARIABLES} file, a stage "
        "directory holding one, or an orbax checkpoint step directory.")
  if not isinstance(tree, dict) or not {"params", "batch_stats"} <= tree.keys():
    raise ConfigError(f"{key}={path!r} holds no 'params' and "
                      "'batch_stats'.")
  return {k: jax.tree.map(np.asarray, tree[k]) for k in ("params", "batch_stats")}


def architecture(variables: dict[str, Any], where: str,
                 key: str = "finetune.pretrained") -> tuple[Genotype, int]:
  """The (genotype, width) that a derived network's parameter paths name."""
  backbone = variables["params"].get("backbone", {})
  ops: dict[tuple[str, int], list[str]] = {}
  for name in backbone:
    match = _LAYER.match(name)
    if match:
      ops.setdefault((match[1], int(match[2])), []).append(match[3])
  if any(len(v) > 1 for v in ops.values()):
    raise ConfigError(f"{key}={where!r} holds a supernet (several ops per "
                      "layer); fine-tune a derived network's weights.")
  layers = max((l for _, l in ops), default=0)  # per stage; a missing layer fails below
  try:
    genotype = Genotype(tuple(tuple(ops[(stage_name(s), l + 1)][0]
                                    for l in range(layers))
                              for s in range(NUM_STAGES)))
    width = int(backbone["stage1_pre_conv"]["kernel"].shape[-1])
  except (KeyError, ValueError) as e:
    raise ConfigError(f"{key}={where!r} is not a derived network's "
                      f"weights ({type(e).__name__}: {e}).") from None
  return genotype, width


def load_pretrained(source: str, workdir: str, stage: str = "finetune") -> Pretrained:
  """The weights `{stage}.pretrained` names, and the architecture they hold."""
  where, key = source_path(source, workdir), f"{stage}.pretrained"
  variables = read_variables(where, key)
  return Pretrained(variables, where, *architecture(variables, where, key))


def wanted_genotype(value: str, stage: str = "finetune") -> Genotype | None:
  """`{stage}.genotype`: None for 'pretrained' (the weights'), else a named genotype
  or a genotype.json."""
  if value == "pretrained":
    return None
  try:
    return (named_genotype(value) if value in NAMED_GENOTYPES
            else genotype_from_file(value, f"{stage}.genotype"))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_genotype(value: str, pretrained: Pretrained, stage: str = "finetune") -> None:
  """`{stage}.genotype` names the architecture of the weights (or is 'pretrained')."""
  wanted = wanted_genotype(value, stage)
  if wanted is None:
    return
  for s, (want, have) in enumerate(zip(wanted.stages, pretrained.genotype.stages)):
    for l, (a, b) in enumerate(zip(want, have)):
      if a != b:
        raise ConfigError(
            f"{stage}.genotype={value!r} is not the architecture of the weights in "
            f"{pretrained.where}: {stage_name(s)} layer {l + 1} is {a} in the genotype, "
            f"{b} in the weights.")


def check_shapes(model: Any, pretrained: Pretrained, shape: tuple[int, ...],
                 stage: str = "finetune") -> None:
  """The backbone built from the config (stem, options) has the weights' shapes."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
  for collection in ("params", "batch_stats"):
    want = jax.tree_util.tree_flatten_with_path(abstract[collection].get("backbone", {}))[0]
    have = dict(jax.tree_util.tree_flatten_with_path(
        pretrained.variables[collection].get("backbone", {}))[0])
    for path, leaf in want:
      got = have.get(path)
      if got is None or tuple(got.shape) != tuple(leaf.shape):
        raise ConfigError(
            f"{stage}.pretrained={pretrained.where!r} does not fit the configured "
            f"network: {collection}/backbone{jax.tree_util.keystr(path)} is "
            f"{None if got is None else tuple(got.shape)} there, {tuple(leaf.shape)} "
            "here (model.stem and image channels must match).")


def start_from(pretrained: Pretrained):
  """variables -> the pretrained backbone with the fresh head of `variables`."""
  def start(fresh: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for collection, tree in fresh.items():
      out[collection] = dict(tree)
      if "backbone" in tree:
        out[collection]["backbone"] = jax.tree.map(
            lambda new, old: jnp.asarray(old, new.dtype), tree["backbone"],
            pretrained.variables[collection]["backbone"])
    return out
  return start


def param_labels(params: dict[str, Any], freeze: tuple[str, ...]) -> dict[str, Any]:
  """optim.finetune_optimizer's groups: the head, frozen backbone parts, the rest."""
  def group(name: str) -> str:
    frozen = any(name == part or name.startswith(part + "_") for part in freeze)
    return optim.FROZEN if frozen else optim.BACKBONE

  labels = {"task_head": jax.tree.map(lambda _: optim.HEAD, params["task_head"])}
  labels["backbone"] = {name: jax.tree.map(lambda _, g=group(name): g, sub)
                        for name, sub in params["backbone"].items()}
  return labels


def grouped_optimizer(ctx: StageContext, model: Any) -> Callable[[int], Any]:
  """steps_per_epoch -> optim.finetune_optimizer over `model`'s head, frozen parts
  (`freeze`) and the rest of the backbone, with the stage's recipe."""
  cfg = ctx.cfg

  def optimizer(steps_per_epoch: int) -> Any:
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros(input_shape(ctx), jnp.float32))["params"]
    return optim.finetune_optimizer(cfg, steps_per_epoch,
                                    param_labels(shapes, tuple(cfg.freeze)),
                                    ctx.build.lr_scale(cfg))
  return optimizer


def pretrained_needs(config: Any, stage: str) -> list[Need]:
  """The earlier stage whose weights `{stage}.pretrained` names, if it names one."""
  source = config[stage].pretrained
  if source not in SOURCE_STAGES:
    return []
  return [Need("trained weights", (source,), f"{stage}.pretrained={source!r}",
               f", or name a file: {stage}.pretrained=RUN/train/{FINAL_VARIABLES}")]


def check_options(cfg: Any, stage: str) -> None:
  """The frozen parts, frozen batch-norm statistics and the head's lr multiplier."""
  for part in cfg.freeze:
    checks.check_choice(part, FREEZABLE, f"{stage}.freeze")
  if not isinstance(cfg.freeze_bn, bool):
    raise ConfigError(f"{stage}.freeze_bn={cfg.freeze_bn!r} must be True or False.")
  if not cfg.head_lr_mult > 0:
    raise ConfigError(f"{stage}.head_lr_mult={cfg.head_lr_mult!r} must be positive.")


def check_source(cfg: Any, stage: str) -> None:
  """`{stage}.pretrained` is set; read now if already on disk (it must then hold
  the configured genotype), else checked once the stage it names has run."""
  if not cfg.pretrained:
    raise ConfigError(f"{stage}.pretrained is empty: name the weights to start from (a "
                      f"stage of this workdir: {', '.join(SOURCE_STAGES)}; RUN/train; a "
                      f"{FINAL_VARIABLES}; or an orbax checkpoint step directory).")
  if cfg.pretrained == stage:
    raise ConfigError(f"{stage}.pretrained={stage!r} names this stage itself; name an "
                      f"earlier stage ({', '.join(s for s in SOURCE_STAGES if s != stage)})"
                      " or a file.")
  if cfg.pretrained in SOURCE_STAGES:
    wanted_genotype(cfg.genotype, stage)  # Matched against the weights once that stage ran.
  else:
    check_genotype(cfg.genotype, load_pretrained(cfg.pretrained, "", stage), stage)


def check_config(config: Any, stage: str) -> None:
  """The options, the data, the evals; a source already on disk is read and must
  name the configured genotype."""
  cfg = config[stage]
  check_options(cfg, stage)
  spec = checks.check_stage_data(config, stage, [cfg.split, cfg.eval_split],
                                 evaluates=True)
  checks.check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
  evaluators.check_config(cfg.get("evals"), f"{stage}.evals", "classifier", spec.splits)
  check_source(cfg, stage)


def _summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result
  frozen = ", ".join(r["frozen"]) or "nothing"
  return ["## fine-tuning", "",
          f"- test top-1: **{r['test_top1']:.4f}** on {r['test_examples']} examples",
          f"- from {r['pretrained']} (width {r['width']}), {r['epochs']} epochs, head lr "
          f"x{r['head_lr_mult']:g}, frozen: {frozen}"
          f"{', BN statistics frozen' if r['freeze_bn'] else ''}", ""]


@register_stage("finetune", needs=pretrained_needs, check_config=check_config,
                summary=_summary)
def run_finetune(ctx: StageContext) -> dict[str, Any]:
  """Fine-tunes the pretrained network with a new classifier head; test top-1."""
  build, cfg, spec = ctx.build, ctx.cfg, ctx.build.spec(ctx.stage)
  pretrained = load_pretrained(cfg.pretrained, ctx.workdir)
  check_genotype(cfg.genotype, pretrained)
  model = make_model(pretrained.genotype.layer_ops(), pretrained.width, "classifier",
                     **model_options(ctx.config.model), num_classes=spec.num_classes,
                     dropout=cfg.dropout, frozen_bn=cfg.freeze_bn)
  check_shapes(model, pretrained, input_shape(ctx))
  note(f"[{ctx.stage}] from {pretrained.where}: width {pretrained.width}, a new "
       f"{spec.num_classes}-class head")
  test_data = build.load_split(ctx.stage, cfg.eval_split)

  def final(net: evaluators.Net) -> dict[str, float]:
    scores = evaluators.run("top1", net, build.eval_batches(ctx.stage, test_data))
    return {"test_top1": scores["top1"], "test_examples": scores["examples"]}

  state, scores = fit(ctx, model, make_objective("supervised", cfg),
                      build.load_split(ctx.stage, cfg.split), final,
                      start=start_from(pretrained), optimizer=grouped_optimizer(ctx, model))
  note(f"[{ctx.stage}] test top-1 {scores['test_top1']:.4f} on "
       f"{int(scores['test_examples'])} {cfg.eval_split} examples")
  return {"test_top1": scores["test_top1"], "test_examples": int(scores["test_examples"]),
          "params": count_params(state.params), "genotype": pretrained.genotype.to_dict(),
          "width": pretrained.width, "epochs": cfg.epochs, "init": "pretrained",
          "pretrained": pretrained.where, "frozen": list(cfg.freeze),
          "freeze_bn": cfg.freeze_bn, "head_lr_mult": cfg.head_lr_mult}
