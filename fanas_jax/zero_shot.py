"""Zero-shot retrieval: the stage retrieval.

It trains a derived network with an L2-normalised embedding head and the
proxy-anchor (or multi-similarity) loss on the training classes only, then reports
Recall@K, MAP@R and the NMI of k-means on the held-out classes. The network is
train.genotype at retrieval.width from scratch, or, with `retrieval.pretrained`,
the backbone of trained weights (an ImageNet classifier) exactly as finetune
starts it (fanas_jax/finetune.py: its genotype and width read from the weights,
mismatches refused before compute, a head lr multiplier, frozen BN statistics,
frozen stages); the embedding head is new either way. The trained variables go to
workdir/retrieval/final_variables.msgpack.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fanas_jax import checks, evaluators, finetune, retrieval, train
from fanas_jax.logging_utils import note
from fanas_jax.model import Model, make_model, model_options
from fanas_jax.objectives import make_objective
from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need, StageContext, register_stage

LOSSES = ("proxy_anchor", "multi_similarity")


def eval_split(cfg: Any) -> str:
  """The split the test classes are read from ('' = the training split)."""
  return cfg.eval_split or cfg.split


def check_gallery(ks: Sequence[int], num_test: int, where: str) -> None:
  """Each of the `num_test` test images queries the others, so max K < num_test."""
  try:
    retrieval.check_k(max(ks), np.ones(num_test, bool), exclude_self=True)
  except ValueError:
    raise ConfigError(f"retrieval.recall_ks={tuple(ks)}: K={max(ks)} is larger than the "
                      f"test gallery, {where} holding {num_test} images (each queries the "
                      f"other {num_test - 1}); use Ks of at most {num_test - 1}.") from None


def _needs(config: Any, stage: str) -> list[Need]:
  if config[stage].pretrained:
    return finetune.pretrained_needs(config, stage)
  return train.genotype_needs(config, stage)


def _check_classes(cfg: Any, dataset: str, num_classes: int) -> None:
  train_c, test_c = list(cfg.train_classes), list(cfg.test_classes)
  bad = [c for c in train_c + test_c if not 0 <= c < num_classes]
  if bad:
    raise ConfigError(f"retrieval classes {bad[:5]} are outside 0..{num_classes - 1} "
                      f"of dataset {dataset}.")
  retrieval.check_disjoint(train_c, test_c,
                           "retrieval.train_classes and retrieval.test_classes")
  if cfg.loss not in LOSSES:
    raise ConfigError(f"retrieval.loss={cfg.loss!r} is not a metric-learning loss; valid "
                      f"choices: {', '.join(LOSSES)}.")
  if not cfg.recall_ks or min(cfg.recall_ks) < 1:
    raise ConfigError(f"retrieval.recall_ks={tuple(cfg.recall_ks)} must be Ks >= 1.")


def check_config(config: Any, stage: str) -> None:
  """The start (pretrained weights or train.genotype), the data, the batch, the
  evals, the classes, the loss and the Ks."""
  cfg = config[stage]
  finetune.check_options(cfg, stage)
  if cfg.pretrained:
    finetune.check_source(cfg, stage)
  else:
    if cfg.freeze or cfg.freeze_bn:
      raise ConfigError(f"{stage}.freeze and {stage}.freeze_bn keep pretrained weights; "
                        f"set {stage}.pretrained, or leave them () and False.")
    train.check_genotype_config(config)
    train.check_network_width(config, cfg.width, f"{stage}.width")
  spec = checks.check_stage_data(config, stage, [cfg.split, eval_split(cfg)], evaluates=True)
  checks.check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
  evaluators.check_config(cfg.get("evals"), f"{stage}.evals", "embedding", spec.splits)
  _check_classes(cfg, spec.name, spec.num_classes)


def _classes(classes: Sequence[int]) -> str:
  """A class list as 'first..last' when it is a run of consecutive ids."""
  if len(classes) > 2 and list(classes) == list(range(classes[0], classes[-1] + 1)):
    return f"{classes[0]}..{classes[-1]}"
  return str(list(classes))


def _summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  del config, workdir, stage
  r = result
  start = f"from {r['pretrained']}" if r.get("pretrained") else "from scratch"
  return ["## zero-shot retrieval", "",
          f"- train classes {_classes(r['train_classes'])}, test classes "
          f"{_classes(r['test_classes'])} "
          f"({r['test_examples']} test images)",
          "- " + ", ".join(f"Recall@{k}: **{v:.4f}**" for k, v in r["recall"].items()),
          *([f"- MAP@R: **{r['map_at_r']:.4f}**, NMI: **{r['nmi']:.4f}** ({r['loss']} "
             "loss)"] if "map_at_r" in r else []),
          *([f"- network: width {r['width']}, trained {start}"] if "width" in r else []), ""]


def _network(ctx: StageContext, num_proxies: int
             ) -> tuple[Model, Any, int, finetune.Pretrained | None]:
  """(the embedding model, its genotype, width, the pretrained weights or None)."""
  cfg, stage = ctx.cfg, ctx.stage
  pretrained = None
  if cfg.pretrained:
    pretrained = finetune.load_pretrained(cfg.pretrained, ctx.workdir, stage)
    finetune.check_genotype(cfg.genotype, pretrained, stage)
  genotype = pretrained.genotype if pretrained else train.stage_genotype(ctx)
  width = pretrained.width if pretrained else cfg.width
  model = make_model(genotype.layer_ops(), width, "embedding",
                     **model_options(ctx.config.model), embed_dim=cfg.embed_dim,
                     num_proxies=num_proxies, frozen_bn=cfg.freeze_bn)
  if pretrained:
    finetune.check_shapes(model, pretrained, train.input_shape(ctx), stage)
    note(f"[{stage}] from {pretrained.where}: width {width}, a new {cfg.embed_dim}-d "
         "embedding head")
  return model, genotype, width, pretrained


@register_stage("retrieval", needs=_needs, check_config=check_config, summary=_summary)
def run_retrieval(ctx: StageContext) -> dict[str, Any]:
  """Trains an embedding on the train classes; Recall@K on the held-out classes."""
  build, cfg = ctx.build, ctx.cfg
  train_classes, test_classes = list(cfg.train_classes), list(cfg.test_classes)
  test_data = build.load_split(ctx.stage, eval_split(cfg), classes=test_classes)
  check_gallery(cfg.recall_ks, len(test_data),
                f"split {eval_split(cfg)!r} of classes {_classes(test_classes)}")
  model, genotype, width, pretrained = _network(
      ctx, len(train_classes) if cfg.loss == "proxy_anchor" else 0)

  def final(net: evaluators.Net) -> dict[str, float]:
    scores = evaluators.run("retrieval", net, build.eval_batches(ctx.stage, test_data),
                            ks=tuple(cfg.recall_ks))
    return {k: v for k, v in scores.items() if k != "examples"} | {
        "test_examples": scores["examples"]}

  state, scores = train.fit(
      ctx, model, make_objective(cfg.loss, cfg),
      build.load_split(ctx.stage, cfg.split, classes=train_classes, relabel=True), final,
      start=finetune.start_from(pretrained) if pretrained else train.fresh,
      optimizer=finetune.grouped_optimizer(ctx, model))
  recall = {str(k): scores[f"recall_at_{k}"] for k in cfg.recall_ks}
  note(f"[{ctx.stage}] zero-shot retrieval on classes {_classes(test_classes)}: " +
       ", ".join(f"R@{k} {v:.4f}" for k, v in recall.items()) +
       f", MAP@R {scores['map_at_r']:.4f}, NMI {scores['nmi']:.4f}")
  return {"recall": recall, "map_at_r": scores["map_at_r"], "nmi": scores["nmi"],
          "loss": cfg.loss, "train_classes": train_classes, "test_classes": test_classes,
          "test_examples": int(scores["test_examples"]),
          "params": train.count_params(state.params), "genotype": genotype.to_dict(),
          "width": width, "pretrained": pretrained.where if pretrained else "",
          "head_lr_mult": cfg.head_lr_mult, "frozen": list(cfg.freeze),
          "freeze_bn": cfg.freeze_bn}
