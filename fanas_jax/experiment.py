"""The pipeline of SPEC.md as one function of (config, workdir).

search_phase1 (CAR, labels unused) -> search_phase2 (supervised, alphas from phase
1, weights re-initialised) -> derive (constrained) -> train (the derived network
from scratch, test top-1) -> retrieval (zero-shot Recall@K on held-out classes).
The stages are found in the stage registry (fanas_jax/stages.py). Each writes
workdir/<stage>/ and is skipped on rerun once finished; an unfinished one resumes
from its newest checkpoint (fanas_jax/loop.py). The workdir's config.json pins the
config: rerunning a different config on the same workdir is refused rather than
mixing or overwriting results. Only `stages` may differ, so a later run can add
stages (e.g. baseline) to a finished workdir.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from fanas_jax import compile_cache, config_checks, report
from fanas_jax.builders import Builder
from fanas_jax.data import pipeline
from fanas_jax.derive_stage import derive_stage  # noqa: F401  (the stage as a function)
from fanas_jax.logging_utils import note
from fanas_jax.stage import StageContext, read_result, run_once, write_json
from fanas_jax.stages import stage_names


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Settings that cannot change a run's results, so a resumed run may change them (and
# config.json leaves them out).
UNPINNED = ("compile_cache",)
# Which stages run is not pinned either: a later run may add stages to a workdir
# (they read the finished ones' results); config.json's `stages` records every stage
# run there.
STAGES_KEY = "stages"


def pin_config(config: Any, workdir: str, names: list[str]) -> list[str]:
  """Writes workdir/config.json, or checks that it matches the config of this run
  (the UNPINNED keys aside). Returns every stage run in the workdir, this run's
  `names` included, in the order first run (config.json's `stages`)."""
  path = os.path.join(workdir, "config.json")
  current = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
             if k not in UNPINNED}
  if not os.path.exists(path):
    write_json(path, current)
    return names
  with open(path) as f:
    previous = json.load(f)
  old, new = (_flatten({k: v for k, v in c.items() if k not in UNPINNED + (STAGES_KEY,)})
              for c in (previous, current))
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  if changed:
    detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    raise config_checks.ConfigError(
        f"workdir {workdir} holds a run with a different config ({detail}); use a new "
        f"--workdir, or rerun with the same config to resume it.")
  recorded = [s.strip() for s in str(previous.get(STAGES_KEY, "")).split(",") if s.strip()]
  stages = recorded + [n for n in names if n not in recorded]
  if stages != recorded:
    write_json(path, {**previous, STAGES_KEY: ",".join(stages)})
  return stages


def run(config: Any, workdir: str, builder: type[Builder] = Builder) -> dict[str, Any]:
  """Runs the configured stages into workdir and returns their results.

  `builder` makes what the stages are built from (data, mesh, keys, optimizers,
  writers); a test passes a subclass to inject a fault. Raises loop.Preempted (a
  SystemExit with status 0) once a preempted stage has saved its checkpoint, so no
  later stage runs; loop.NonFiniteError when a loss or gradient is not finite
  (checkpoint.nan_policy='stop', or rollbacks used up); config_checks.ConfigError
  for a config that cannot run.
  """
  config_checks.validate(config, workdir)
  names = stage_names(config)
  os.makedirs(workdir, exist_ok=True)
  workdir_stages = pin_config(config, workdir, names)
  cache = compile_cache.enable(config.compile_cache)
  note(f"fanas_jax: workdir {workdir}; stages {', '.join(names)}; "
       f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
       f"{jax.process_count()} process(es); XLA compilation cache "
       f"{cache or 'off'}")
  build = builder(config, workdir)
  results: dict[str, Any] = {}
  timings: dict[str, float] = {}
  for name in names:
    t0 = time.time()
    results[name] = run_once(StageContext(config, workdir, name, build, dict(results)))
    timings[name] = time.time() - t0
    skipped = pipeline.bad_example_count()
    if skipped:
      note(f"[{name}] warning: {skipped} bad example(s) skipped so far in this process "
           "(bad_examples='skip'); the warnings above name them.")
  # Stages an earlier run finished in this workdir keep their summary sections.
  shown = {n: results[n] if n in results else read_result(workdir, n)
           for n in workdir_stages}
  report.write_summary(config, workdir,
                       {n: r for n, r in shown.items() if r is not None}, timings)
  return results
