"""The pipeline of SPEC.md as one function of (config, workdir).

search_phase1 (CAR, labels unused) -> search_phase2 (supervised, alphas from phase
1, weights re-initialised) -> derive (constrained) -> train (the derived network
from scratch, test top-1) -> retrieval (zero-shot Recall@K on held-out classes).
Each stage writes workdir/<stage>/ and is skipped on rerun once finished; an
unfinished one resumes from its newest checkpoint (fanas_jax.stage.StageLoop). The
workdir's config.json pins the config: rerunning a different config on the same
workdir is refused rather than mixing or overwriting results.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from fanas_jax import config_checks, report
from fanas_jax.cost import network_cost
from fanas_jax.data import pipeline
from fanas_jax.derive import budget_from_config, derive
from fanas_jax.genotype import (DeriveLimits, Genotype, named_genotype, plot_genotype,
                                search_space_from_config)
from fanas_jax.search import run_search_phase
from fanas_jax.stage import read_result, run_once, stage_dir, write_json
from fanas_jax.train import run_classification, run_retrieval


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def pin_config(config: Any, workdir: str) -> None:
  """Writes workdir/config.json, or checks that it matches the config of this run."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    old, new = _flatten(previous), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
      raise config_checks.ConfigError(
          f"workdir {workdir} holds a run with a different config ({detail}); use a new "
          f"--workdir, or rerun with the same config to resume it.")
    return
  write_json(path, current)


def derive_stage(config: Any, workdir: str, search_stage: str) -> dict[str, Any]:
  """The final genotype from the last search phase's alphas (selected epoch)."""
  found = read_result(workdir, search_stage)
  space = search_space_from_config(config.search.candidates)
  limits = DeriveLimits(config.derive.max_window7, config.derive.max_global)
  alphas = {k: np.asarray(v) for k, v in found["alphas"].items()}
  budget = budget_from_config(config)
  genotype = derive(alphas, space, config.derive.rule, limits, budget)
  genotype.check_limits(limits)
  # The cost of the network the train stage builds from it (arithmetic, no tracing).
  cost = network_cost(genotype.layer_ops(), budget.width, budget.image_size,
                      in_channels=budget.in_channels, stem=budget.stem,
                      num_classes=budget.num_classes)
  record = {"genotype": genotype.to_dict(), "from_stage": search_stage,
            "epoch": found["epoch"], "select": config.derive.select,
            "rule": config.derive.rule,
            "limits": {"max_window7": limits.max_window7, "max_global": limits.max_global,
                       "max_params": budget.max_params, "max_macs": budget.max_macs},
            "cost": cost.totals(),
            "alphas": found["alphas"]}
  write_json(os.path.join(workdir, "genotype.json"), record)
  if jax.process_index() == 0:
    plot_genotype(genotype, os.path.join(workdir, "genotype.png"),
                  title=f"derived genotype ({config.derive.rule} rule)")
  print("[derive] genotype (" + config.derive.rule + " rule):\n" + genotype.table())
  print(f"[derive] at train width {cost.width}, {cost.image_size}x{cost.image_size} "
        f"input, {cost.stem} stem, {cost.num_classes}-class head: "
        f"{cost.params / 1e6:.3f}M params, {cost.macs / 1e9:.4f} GMACs per image")
  return record


def _genotype_for_training(config: Any, workdir: str) -> Genotype:
  if config.train.genotype != "searched":
    return named_genotype(config.train.genotype)
  path = os.path.join(stage_dir(workdir, "derive"), "result.json")
  if not os.path.exists(path):
    raise config_checks.ConfigError(
        f"train.genotype='searched' but {path} does not exist: run the derive stage "
        "(config key stages) or name a genotype.")
  with open(path) as f:
    return Genotype.from_dict(json.load(f)["genotype"])


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the configured stages into workdir and returns their results.

  Raises stage.Preempted (a SystemExit with status 0) once a preempted stage has
  saved its checkpoint, so no later stage runs; stage.NonFiniteError when a loss
  or gradient is not finite (checkpoint.nan_policy='stop', or rollbacks used up);
  config_checks.ConfigError for a config that cannot run.
  """
  config_checks.validate(config)
  stages = config_checks.stages(config)
  os.makedirs(workdir, exist_ok=True)
  pin_config(config, workdir)
  print(f"fanas_jax: workdir {workdir}; stages {', '.join(stages)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)")
  results: dict[str, Any] = {}
  timings: dict[str, float] = {}
  last_search = None
  for stage in stages:
    t0 = time.time()
    if stage in config_checks.SEARCH_STAGES:
      source = config[stage].init_alpha_from
      init = None
      if source:
        prior = results.get(source) or read_result(workdir, source)
        if prior is None:
          raise config_checks.ConfigError(
              f"{stage}.init_alpha_from={source!r} but that stage has no result in "
              f"{workdir}.")
        init = {k: np.asarray(v, np.float32) for k, v in prior["alphas"].items()}
      results[stage] = run_once(
          workdir, stage, lambda: run_search_phase(config, workdir, stage, init))
      last_search = stage
    elif stage == "derive":
      source = last_search or next(
          (s for s in reversed(config_checks.SEARCH_STAGES)
           if os.path.exists(os.path.join(stage_dir(workdir, s), "result.json"))), None)
      if source is None:
        raise config_checks.ConfigError(
            f"the derive stage needs a finished search stage in {workdir}.")
      results[stage] = run_once(workdir, stage, lambda: derive_stage(config, workdir, source))
    elif stage == "train":
      genotype = _genotype_for_training(config, workdir)
      results[stage] = run_once(workdir, stage,
                                lambda: run_classification(config, workdir, genotype))
    elif stage == "retrieval":
      genotype = _genotype_for_training(config, workdir)
      results[stage] = run_once(workdir, stage,
                                lambda: run_retrieval(config, workdir, genotype))
    timings[stage] = time.time() - t0
    skipped = pipeline.bad_example_count()
    if skipped:
      print(f"[{stage}] warning: {skipped} bad example(s) skipped so far in this process "
            "(bad_examples='skip'); the warnings above name them.", flush=True)
  report.write_summary(config, workdir, results, timings)
  return results
