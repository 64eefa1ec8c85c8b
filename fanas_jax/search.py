"""The bilevel DARTS-style search of SPEC.md 3: the stages search_phase1 and 2.

Each step first updates the architecture (alphas) on a batch from the architecture
half of the data, then the weights on a batch from the weight half, with separate
optax optimizers. Both halves have their own persistent iterator, so the alpha step
walks through the whole architecture half. Phase 1 uses the `car` objective
(labels unused), phase 2 `supervised` with alphas initialised from phase 1. The
alpha gradient is first order, second order or Gumbel single-path (`mode`), and
the first `warmup_epochs` epochs train the weights only. A phase with far fewer
alpha steps than the paper's can scale alpha's learning rate up to match
(`alpha_reference_steps`, optim.alpha_lr_scale). Every epoch logs how decided each
layer is (fanas_jax/decision.py).

`search.num_seeds` N > 1 runs N independent searches in one compiled program: the
N states stacked on a leading seed axis, the step vmapped over them, their batches
stacked [N, B, ...]. Seed s is the single search with config.seed + s: its own
halves, data order, initialisation, masks and noise. Its step metrics are
`seedS/NAME` (S = 0..N-1); its epoch records are the alpha history's `seeds` list,
whose top-level record (and result.json's single-seed keys) stay seed 0's;
metrics.jsonl gets each seed's epoch scalars as `seedS/NAME` and their means over
the seeds as `seeds_mean/NAME`. A batch found non-finite in any seed is skipped
(rolled back) in all.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fanas_jax import checks, decision, evaluators, parallel, plots
from fanas_jax.cpc import grid_size
from fanas_jax.derive import budget_from_config, derive, log_softmax
from fanas_jax.genotype import DeriveLimits, search_space_from_config
from fanas_jax.logging_utils import note
from fanas_jax.loop import EpochEnd, Rollback, StageRun, compile_step, peek
from fanas_jax.model import make_model, model_options
from fanas_jax.objectives import OBJECTIVES, Objective, make_objective
from fanas_jax.optim import alpha_b2, alpha_steps
from fanas_jax.registry import ConfigError
from fanas_jax.stage import Need, StageContext, register_stage, write_json
from fanas_jax.steps import (SEARCH_MODES, init_alphas, init_search_state,
                             make_search_step, seeds_step)

SEARCH_STAGES = ("search_phase1", "search_phase2")
SELECT_CHOICES = ("best", "last")
# The heads a supernet can carry, and the options each takes from the dataset.
SEARCH_HEADS = {
    "car_decoder": lambda spec, objective: dict(out_channels=spec.channels),
    "cpc": lambda spec, objective: dict(objective.head_config),
    "classifier": lambda spec, objective: dict(num_classes=spec.num_classes, dropout=0.0),
}


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _alpha_need(config: Any, stage: str) -> list[Need]:
  source = config[stage].init_alpha_from
  if not source:
    return []
  return [Need("alphas", (source,), f"{stage}.init_alpha_from={source!r}",
               f", or set {stage}.init_alpha_from=''")]


def _objective_config(config: Any, cfg: Any, spec: Any) -> Any:
  return ml_collections.ConfigDict(dict(
      image_size=config.image_size, num_boxes=cfg.get("num_boxes", 4),
      box_size=cfg.get("box_size", 8), num_classes=spec.num_classes,
      cpc=cfg.get("cpc")))


def _supernet(ctx: StageContext) -> tuple[Any, Objective, Any]:
  """(search space, objective, supernet model) of the phase."""
  config, cfg, spec = ctx.config, ctx.cfg, ctx.build.spec(ctx.stage)
  space = search_space_from_config(config.search)
  objective = make_objective(cfg.objective, _objective_config(config, cfg, spec))
  model = make_model(space.layer_ops(), config.model.width, objective.head,
                     **model_options(config.model),
                     **SEARCH_HEADS[objective.head](spec, objective))
  return space, objective, model


def _prior_alphas(ctx: StageContext) -> list[dict[str, Any]] | None:
  """Each seed's alphas of the phase init_alpha_from names (None: fresh alphas); that
  phase must have run as many seeds as this one."""
  needs = _alpha_need(ctx.config, ctx.stage)
  if not needs:
    return None
  source, prior = ctx.source(needs[0])
  have, want = prior.get("num_seeds", 1), ctx.config.search.num_seeds
  if have != want:
    raise ConfigError(
        f"{ctx.stage}.init_alpha_from={source!r}: {source} ran {have} seed(s) but "
        f"search.num_seeds={want}; set search.num_seeds={have}, or rerun {source} "
        f"with search.num_seeds={want}.")
  return [prior["alphas"]] if want == 1 else prior["seed_alphas"]


def _initial_alphas(ctx: StageContext, space: Any, key: jax.Array,
                    prior: dict[str, Any] | None) -> Any:
  if prior is None:
    return init_alphas(space, key, ctx.cfg.alpha_init_std)
  return {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in prior.items()}


@dataclasses.dataclass(frozen=True)
class _Seed:
  """One search's own data order and keys."""
  w_iter: Any
  a_iter: Any
  k_init: jax.Array
  k_alpha: jax.Array
  k_steps: jax.Array


def _make_seeds(ctx: StageContext, ds: Any) -> tuple[list[_Seed], int, int]:
  """(the searches, weight half size, architecture half size): search s draws its
  halves, iterators and keys as the single search with config.seed + s does."""
  build, stage = ctx.build, ctx.stage
  seeds = []
  for s in range(ctx.config.search.num_seeds):
    seed = ctx.config.seed + s
    w_half, a_half = build.split_halves(ds, seed)
    k_init, k_alpha, k_steps = jax.random.split(build.stage_key(stage, seed), 3)
    seeds.append(_Seed(build.train_iterator(stage, w_half, seed),
                       build.train_iterator(stage, a_half, seed + 1),
                       k_init, k_alpha, k_steps))
  return seeds, len(w_half), len(a_half)


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _init_state(ctx: StageContext, seeds: list[_Seed], model: Any, space: Any,
                objective: Objective, txs: tuple[Any, Any]) -> Any:
  """The replicated SearchState; several seeds' stacked on a leading seed axis."""
  priors = _prior_alphas(ctx) or [None] * len(seeds)
  input_shape = objective.input_shape(
      (1, ctx.config.image_size, ctx.config.image_size, ctx.build.spec(ctx.stage).channels))
  states = [init_search_state(model, _initial_alphas(ctx, space, s.k_alpha, prior), *txs,
                              s.k_init, input_shape) for s, prior in zip(seeds, priors)]
  return ctx.build.replicate(states[0] if len(states) == 1 else _stack(states))


def _jit_step(step: Any, num_seeds: int) -> Any:
  return jax.jit(seeds_step(step, num_seeds), donate_argnums=0)


def _inputs(build: Any, seeds: list[_Seed], take: Any) -> tuple[Any, Any, jax.Array]:
  """The step's (weight batch, architecture batch, key), `take`n from each seed's
  iterators; several seeds' stacked on a leading seed axis."""
  if len(seeds) == 1:
    return (build.shard(take(seeds[0].w_iter)), build.shard(take(seeds[0].a_iter)),
            seeds[0].k_steps)
  stacked = lambda batches: build.shard(
      jax.tree.map(lambda *xs: np.stack(xs), *batches), seed_axis=True)
  return (stacked([take(s.w_iter) for s in seeds]),
          stacked([take(s.a_iter) for s in seeds]), jnp.stack([s.k_steps for s in seeds]))


def _seed_zero(state: Any, num_seeds: int) -> Any:
  return state if num_seeds == 1 else jax.tree.map(lambda x: x[0], state)


def _check_bilevel(cfg: Any, stage: str) -> None:
  """The search step's mode, alpha warm-up and Gumbel temperatures."""
  checks.check_choice(cfg.mode, SEARCH_MODES, f"{stage}.mode")
  if not 0 <= cfg.warmup_epochs < cfg.epochs:
    raise ConfigError(f"{stage}.warmup_epochs={cfg.warmup_epochs} must be in "
                      f"0..{cfg.epochs - 1}: alpha needs at least one epoch of updates.")
  if cfg.alpha_reference_steps < 0:
    raise ConfigError(f"{stage}.alpha_reference_steps={cfg.alpha_reference_steps} must "
                      f"be 0 (a_lr as given) or a number of alpha steps.")
  if not cfg.alpha_lr_scale_max >= 1:
    raise ConfigError(f"{stage}.alpha_lr_scale_max={cfg.alpha_lr_scale_max} must be at "
                      f"least 1.")
  if cfg.mode == "gumbel":
    if not cfg.gumbel_tau_min > 0:
      raise ConfigError(f"{stage}.gumbel_tau_min={cfg.gumbel_tau_min} must be positive.")
    if not cfg.gumbel_tau_max >= cfg.gumbel_tau_min:
      raise ConfigError(f"{stage}.gumbel_tau_max={cfg.gumbel_tau_max} must be at least "
                        f"gumbel_tau_min ({cfg.gumbel_tau_min}).")


def _check_cpc(cpc: Any, image_size: int, reduction: int, stem: str, key: str) -> None:
  """Every patch runs through the whole network, so it obeys image_size's rule."""
  size, stride = cpc.patch_size, cpc.patch_stride
  if size <= 0 or size % reduction or size > image_size:
    raise ConfigError(
        f"{key}.patch_size={size} cannot pass through the 5-stage network with the "
        f"{stem!r} stem: it must be a positive multiple of {reduction} no larger than "
        f"image_size ({image_size}).")
  if stride < 1:
    raise ConfigError(f"{key}.patch_stride={stride} must be at least 1.")
  rows = grid_size(image_size, size, stride)
  offsets = tuple(cpc.offsets)
  if not offsets or len(set(offsets)) < len(offsets) or not all(
      0 < k < rows for k in offsets):
    raise ConfigError(
        f"{key}.offsets={offsets} must be distinct rows ahead in 1..{rows - 1}: "
        f"image_size {image_size}, patch_size {size} and patch_stride {stride} give "
        f"{rows} patch row(s).")
  if cpc.context_layers < 1:
    raise ConfigError(f"{key}.context_layers={cpc.context_layers} must be at least 1.")
  if cpc.context_heads < 1 or cpc.embed_dim % cpc.context_heads:
    raise ConfigError(f"{key}.embed_dim={cpc.embed_dim} must be divisible by "
                      f"{key}.context_heads={cpc.context_heads} (at least 1).")


def _search_head(config: Any, stage: str, spec: Any) -> str:
  """The head of the phase's objective; refuses an objective no supernet can carry."""
  cfg = config[stage]
  try:
    OBJECTIVES.get(cfg.objective, key=f"{stage}.objective")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  head_of = lambda name: make_objective(name, _objective_config(config, cfg, spec)).head
  head = head_of(cfg.objective)
  if head not in SEARCH_HEADS:
    valid = [n for n in OBJECTIVES.names() if head_of(n) in SEARCH_HEADS]
    raise ConfigError(f"{stage}.objective={cfg.objective!r} trains the {head} head, which "
                      f"a search supernet does not carry; valid choices: "
                      f"{', '.join(valid)}.")
  return head


def check_config(config: Any, stage: str) -> None:
  """A search phase's block: data, batch, epochs, alpha source, bilevel step,
  objective."""
  cfg = config[stage]
  spec = checks.check_stage_data(config, stage, [cfg.split], evaluates=False)
  checks.check_batch(cfg.batch_size, f"{stage}.batch_size", config.num_devices)
  checks.check_epochs(cfg.epochs, f"{stage}.epochs")
  if cfg.init_alpha_from and cfg.init_alpha_from not in SEARCH_STAGES:
    raise ConfigError(f"Unknown {stage}.init_alpha_from {cfg.init_alpha_from!r}; "
                      f"valid choices: '', {', '.join(SEARCH_STAGES)}.")
  _check_bilevel(cfg, stage)
  head = _search_head(config, stage, spec)
  size = config.image_size
  if cfg.objective == "car":
    if not 0 < cfg.box_size <= size:
      raise ConfigError(f"{stage}.box_size={cfg.box_size} must be in 1..image_size "
                        f"({size}).")
    if cfg.num_boxes < 1:
      raise ConfigError(f"{stage}.num_boxes={cfg.num_boxes} must be at least 1.")
  if cfg.objective == "cpc":
    _check_cpc(cfg.cpc, size, checks.input_reduction(config), config.model.stem,
               f"{stage}.cpc")
  space = search_space_from_config(config.search)
  checks.check_width(config.model.width, {op for ops in space.candidates for op in ops},
                     "model.width")
  evaluators.check_config(cfg.get("evals"), f"{stage}.evals", head, spec.splits)


def summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  """The phase's losses and entropies, and its alpha heatmap (drawn here)."""
  candidates = search_space_from_config(config.search).candidates
  out_dir = os.path.join(workdir, stage)
  with open(os.path.join(out_dir, "alpha_history.json")) as f:
    history = json.load(f)
  plots.plot_alpha_history(history, candidates, os.path.join(out_dir, "alpha_heatmap.png"))
  r = result
  return [f"## {stage}: {config[stage].objective}", "",
          f"- architecture-half loss: {r['first_a_loss']:.4f} "
          f"(epoch {r['first_a_epoch']}) -> {r['final_a_loss']:.4f} (last)",
          f"- weight-half loss (last epoch): {r['final_w_loss']:.4f}",
          f"- mean alpha entropy per layer: {r['entropy_first']:.6f} -> "
          f"{r['entropy_last']:.6f} nats (uniform: {np.log(len(candidates[0])):.6f})",
          f"- how decided (last epoch): {decision.describe(r['decision_last'])}",
          f"- genotype of this phase (epoch {r['epoch']}): "
          f"`{stage}/genotype.json`; alpha heatmap: `{stage}/alpha_heatmap.png`", ""] + (
              [f"- the lines above are seed 0's of {r['num_seeds']} searches "
               f"(search.num_seeds); every seed's genotype: `{stage}/result.json` "
               "seed_genotypes", ""] if r.get("num_seeds", 1) > 1 else [])


@register_stage("search_phase1", needs=_alpha_need, check_config=check_config,
                summary=summary)
@register_stage("search_phase2", needs=_alpha_need, check_config=check_config,
                summary=summary)
def run_search_phase(ctx: StageContext) -> dict[str, Any]:
  """Runs one search phase into workdir/<stage>/ and returns its result record."""
  build, cfg, stage = ctx.build, ctx.cfg, ctx.stage
  num_seeds = ctx.config.search.num_seeds
  space, objective, model = _supernet(ctx)
  seeds, w_examples, a_examples = _make_seeds(ctx, build.load_split(stage, cfg.split))
  steps_per_epoch = build.steps_per_epoch(min(w_examples, a_examples), cfg.batch_size)
  total_steps = cfg.epochs * steps_per_epoch
  w_tx, a_tx = build.search_optimizers(cfg, steps_per_epoch)
  state = _init_state(ctx, seeds, model, space, objective, (w_tx, a_tx))
  warmup_steps = cfg.warmup_epochs * steps_per_epoch
  step_fn = _jit_step(make_search_step(
      model, objective, w_tx, a_tx, cfg.mode, warmup_steps=warmup_steps,
      tau_schedule=build.gumbel_temperature(cfg, total_steps)), num_seeds)
  _describe(ctx, steps_per_epoch, w_examples, a_examples, warmup_steps)
  evals, infer = evaluators.Evals(cfg.get("evals"), build, stage), _infer(model)
  # The evaluators see seed 0's supernet only.
  net = lambda state: evaluators.Net(infer, _seed_zero(state, num_seeds), build.mesh,
                                     objective.head, objective)
  iterators = [it for s in seeds for it in (s.w_iter, s.a_iter)]

  with build.stage_run(stage, iterators, steps_per_epoch, cfg.epochs,
                       cfg.batch_size) as run:
    state = run.start(state)
    if not run.finished:
      step_fn = compile_step(step_fn, stage, state, *_inputs(build, seeds, peek))
    while not run.finished:
      try:
        state = run.step(step_fn, state, _inputs(build, seeds, next))
        if run.loop.epoch_ended:
          end = run.end_epoch()
          _end_epoch(ctx, run, state, end, space)
          evaluators.log(run, int(_seed_zero(state, num_seeds).step),
                         evals.run_due(net(state), end.epoch, cfg.epochs))
        run.checkpoint(state)
      except Rollback as bad:
        state = run.roll_back(bad)
  return _finish(ctx, run.carry["history"])


def _infer(model: Any) -> Any:
  """The supernet at inference on a SearchState, for the evaluators."""
  return jax.jit(lambda state, x: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, x, alphas=state.alphas,
      train=False))


def _describe(ctx: StageContext, steps_per_epoch: int, w_examples: int, a_examples: int,
              warmup_steps: int) -> None:
  cfg, stage = ctx.cfg, ctx.stage
  lr_scale = ctx.build.lr_scale(cfg)
  alpha_lr = _describe_alpha_lr(cfg, ctx.build.alpha_lr_scale(cfg, steps_per_epoch),
                                alpha_steps(cfg, steps_per_epoch))
  note(f"[{stage}] objective={cfg.objective} epochs={cfg.epochs} "
       f"steps/epoch={steps_per_epoch} weight half={w_examples} "
       f"architecture half={a_examples}")
  note(f"[{stage}] {parallel.describe(cfg.batch_size, ctx.config.num_devices)} per half; "
       f"weight lr {lr_scale * cfg.w_lr:g} (w_lr={cfg.w_lr:g} x {lr_scale:g}), "
       f"{alpha_lr}")
  note(f"[{stage}] mode={cfg.mode} alpha warm-up={cfg.warmup_epochs} epochs "
       f"({warmup_steps} weight-only steps)" +
       (f" gumbel tau {cfg.gumbel_tau_max} -> {cfg.gumbel_tau_min}"
        if cfg.mode == "gumbel" else ""))
  n, seed = ctx.config.search.num_seeds, ctx.config.seed
  if n > 1:
    note(f"[{stage}] {n} independent searches (search.num_seeds) with seeds {seed}.."
         f"{seed + n - 1} in one vmapped step; logs, alpha_history.json's top level and "
         f"genotype.json are seed {seed}'s")


def _describe_alpha_lr(cfg: Any, scale: float, steps: int) -> str:
  """The lr the alpha optimizer steps with, where it comes from, and lr x steps (about
  the farthest Adam can move an alpha in the phase)."""
  lr = scale * cfg.a_lr
  text = f"alpha lr {lr:g} x {steps} alpha steps = {lr * steps:.4g}"
  if not cfg.alpha_reference_steps:
    return text + f" (a_lr={cfg.a_lr:g})"
  ratio = cfg.alpha_reference_steps / max(steps, 1)
  source = (f"alpha_lr_scale_max; alpha_reference_steps={cfg.alpha_reference_steps} / "
            f"{steps} is {ratio:.4g}" if scale < ratio else
            f"alpha_reference_steps={cfg.alpha_reference_steps} / {steps}")
  return text + (f" (a_lr={cfg.a_lr:g} x {scale:.4g} = {source}), Adam b2 "
                 f"{alpha_b2(cfg.a_b1, cfg.a_b2, scale):g} (a_b2={cfg.a_b2:g})")


def _end_epoch(ctx: StageContext, run: StageRun, state: Any, end: EpochEnd,
               space: Any) -> None:
  """Writes the epoch's record and appends it to the alpha history (`run.carry`)."""
  stage, n = ctx.stage, ctx.config.search.num_seeds
  alphas = _to_numpy(state.alphas)
  if n == 1:
    records = [_epoch_record(ctx.config, stage, end.epoch, end.means, alphas, space)]
  else:
    records = [_epoch_record(ctx.config, f"{stage} seed {s}", end.epoch,
                             _seed_means(end.means, s), {k: v[s] for k, v in alphas.items()},
                             space) for s in range(n)]
  stats = _mean_over_seeds([r["decision"] for r, _ in records])
  note(f"[{stage}] epoch {end.epoch}: " + ("" if n == 1 else f"{n} seeds, mean over "
                                           "seeds: ") + decision.describe(stats))
  a_losses = [r["a_loss"] for r, _ in records if r["a_loss"] is not None]
  run.bar.set_postfix(w_loss=f"{np.mean([r['w_loss'] for r, _ in records]):.3f}",
                      a_loss=f"{np.mean(a_losses):.3f}" if a_losses else "warm-up")
  entry = records[0][0] if n == 1 else dict(records[0][0], seeds=[r for r, _ in records])
  run.carry = {"history": run.carry.get("history", []) + [entry]}
  written = dict(epoch=end.epoch, mode=ctx.cfg.mode, epoch_seconds=end.seconds)
  if n > 1:
    written.update(num_seeds=n, **{f"seeds_mean/{k}": v for k, v in stats.items()})
  for s, (_, scalars) in enumerate(records):
    prefix = "" if n == 1 else f"seed{s}/"
    written.update({prefix + k: v for k, v in {**scalars["means"], **scalars["rest"]}.items()})
  run.writer.write(int(_seed_zero(state, n).step), written)


def _seed_means(means: dict[str, float], seed: int) -> dict[str, float]:
  """Seed `seed`'s step means, without their `seedS/` prefix."""
  prefix = f"seed{seed}/"
  return {k[len(prefix):]: v for k, v in means.items() if k.startswith(prefix)}


def _mean_over_seeds(stats: list[dict[str, float]]) -> dict[str, float]:
  """Each decision statistic's mean over the seeds (the layer count is every seed's)."""
  if len(stats) == 1:
    return stats[0]
  return {k: stats[0][k] if k == "layers" else float(np.mean([s[k] for s in stats]))
          for k in stats[0]}


def _epoch_record(config: Any, who: str, epoch: int, means: dict[str, float],
                  alphas: dict[str, np.ndarray], space: Any
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """One search's (alpha history record, metric scalars: its step means and the
  rest) of the epoch."""
  # Warm-up spans whole epochs; there the alpha pass did not run, so its metrics
  # are placeholders and are dropped.
  alpha_updated = means["alpha_updated"] > 0
  if not alpha_updated:
    means = {k: v for k, v in means.items() if not k.startswith("a_")}
  a_loss = means["a_loss"] if alpha_updated else None
  genotype = derive(alphas, space, config.derive.rule,
                    DeriveLimits(config.derive.max_window7, config.derive.max_global),
                    budget_from_config(config)).to_dict()
  decisions = decision.layer_decisions(alphas)
  stats = decision.decision_stats(decisions)
  _collapse_alarm(who, epoch, decisions.entropy, alphas, space)
  record = {
      "epoch": epoch, "w_loss": means["w_loss"], "a_loss": a_loss,
      "alpha_updated": alpha_updated,
      "alphas": {k: v.tolist() for k, v in alphas.items()},
      "entropy": {k: v.tolist() for k, v in decisions.entropy.items()},
      "top_prob": {k: v.tolist() for k, v in decisions.top_prob.items()},
      "margin": {k: v.tolist() for k, v in decisions.margin.items()},
      "decision": stats, "genotype": genotype}
  rest = dict(**stats, **_alpha_scalars(alphas, space), **decision.per_layer_scalars(decisions),
              genotype=genotype)
  return record, {"means": means, "rest": rest}


def _finish(ctx: StageContext, history: list[dict[str, Any]]) -> dict[str, Any]:
  """Writes alpha_history.json and genotype.json (seed 0's); returns the phase's
  result, with every seed's chosen epoch, alphas and genotype when there are several."""
  config = ctx.config
  write_json(os.path.join(ctx.out_dir, "alpha_history.json"), history)
  chosen = select_epoch(history, config.derive.select)
  first_alpha_epoch = next(h for h in history if h.get("alpha_updated", True))
  write_json(os.path.join(ctx.out_dir, "genotype.json"),
             {"genotype": chosen["genotype"], "epoch": chosen["epoch"],
              "select": config.derive.select, "rule": config.derive.rule,
              "alphas": chosen["alphas"]})
  mean_entropy = lambda h: float(np.mean([np.mean(v) for v in h["entropy"].values()]))
  result = {"genotype": chosen["genotype"], "alphas": chosen["alphas"],
            "epoch": chosen["epoch"], "final_alphas": history[-1]["alphas"],
            "final_w_loss": history[-1]["w_loss"], "final_a_loss": history[-1]["a_loss"],
            "first_a_loss": first_alpha_epoch["a_loss"],
            "first_a_epoch": first_alpha_epoch["epoch"],
            "entropy_first": mean_entropy(history[0]),
            "entropy_last": mean_entropy(history[-1]),
            "decision_last": history[-1]["decision"]}
  n = config.search.num_seeds
  if n > 1:
    seeds = [select_epoch([h["seeds"][s] for h in history], config.derive.select)
             for s in range(n)]
    result.update(num_seeds=n, seed_alphas=[c["alphas"] for c in seeds],
                  seed_genotypes=[c["genotype"] for c in seeds],
                  seed_epochs=[c["epoch"] for c in seeds])
  return result


def _alpha_scalars(alphas: dict[str, np.ndarray], space: Any) -> dict[str, float]:
  """'alpha/stageS/layerL/OP' (softmax weight) scalars, so JSON lines and TensorBoard
  show every layer's mixture over the epochs."""
  out = {}
  for s, ops in enumerate(space.candidates):
    name = f"stage{s + 1}"
    probs = np.exp(log_softmax(alphas[name]))
    for l in range(probs.shape[0]):
      out.update({f"alpha/{name}/layer{l + 1}/{op}": float(probs[l, o])
                  for o, op in enumerate(ops)})
  return out


# A layer whose mixture entropy falls under this fraction of uniform has all but
# chosen one op: early in a search that is the DARTS collapse to watch for.
COLLAPSE_FRACTION = 0.25


def _collapse_alarm(who: str, epoch: int, entropy: dict[str, np.ndarray],
                    alphas: dict[str, np.ndarray], space: Any) -> None:
  for s, ops in enumerate(space.candidates):
    name = f"stage{s + 1}"
    uniform = np.log(len(ops))
    for l, h in enumerate(entropy[name]):
      if len(ops) > 1 and h < COLLAPSE_FRACTION * uniform:
        top = ops[int(np.argmax(alphas[name][l]))]
        note(f"[{who}] epoch {epoch}: {name} layer {l + 1} has collapsed onto {top} "
             f"(entropy {h:.3f} nats, uniform {uniform:.3f})")


def select_epoch(history: list[dict[str, Any]], select: str) -> dict[str, Any]:
  """'last': the final epoch; 'best': the epoch with the lowest architecture-half loss
  (alpha warm-up epochs have none and are skipped)."""
  if select == "last":
    return history[-1]
  if select == "best":
    return min((h for h in history if h["a_loss"] is not None), key=lambda h: h["a_loss"])
  raise ValueError(f"Unknown derive.select {select!r}; valid choices: "
                   f"{', '.join(SELECT_CHOICES)}.")
