"""What a pipeline stage is: a registered function, what it needs, where it writes.

A stage is a function of a `StageContext` that writes workdir/<stage>/ and returns
its result record. It is registered by name with `register_stage`, together with
what it needs from earlier stages (`Need`), its own config check and its lines
of summary.md. The config check, the pipeline and the summary find stages only
through `STAGES`.

A stage is finished when workdir/<stage>/result.json exists; a finished stage is
not redone, its result is read back. A need is met by the nearest earlier stage
of the `stages` list that gives it, else by a finished stage in the workdir, so a
`stages` list that cannot run fails in one line before any compute.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax

from fanas_jax import parallel
from fanas_jax.logging_utils import note, write_bytes
from fanas_jax.loop import Preempted
from fanas_jax.registry import ConfigError, Registry


@dataclasses.dataclass(frozen=True)
class Need:
  """What a stage reads from an earlier one: any of `stages`, nearest first."""
  what: str                 # e.g. 'a derived genotype'
  stages: tuple[str, ...]   # the stages that give it, in order of preference
  because: str              # the config that makes it needed
  instead: str = ""         # how else to meet it, for the error


@dataclasses.dataclass(frozen=True)
class Stage:
  run: Callable[["StageContext"], dict[str, Any]]
  needs: Callable[[Any, str], Sequence[Need]]
  check_config: Callable[[Any, str], None]  # (config, stage): raises ConfigError
  summary: Callable[[Any, str, str, dict[str, Any]], list[str]]


STAGES: Registry[Stage] = Registry("stage")


def _no_needs(config: Any, stage: str) -> Sequence[Need]:
  del config, stage
  return ()


def _no_check(config: Any, stage: str) -> None:
  del config, stage


def _no_summary(config: Any, workdir: str, stage: str, result: dict[str, Any]) -> list[str]:
  del config, workdir, stage, result
  return []


def register_stage(name: str, needs: Callable[[Any, str], Sequence[Need]] = _no_needs,
                   check_config: Callable[[Any, str], None] = _no_check,
                   summary: Callable[..., list[str]] = _no_summary) -> Callable:
  """Registers the decorated `run(ctx) -> result` as stage `name`."""
  def decorator(run: Callable[["StageContext"], dict[str, Any]]):
    STAGES.add(name, Stage(run, needs, check_config, summary))
    return run
  return decorator


def stage_names(config: Any) -> list[str]:
  """The `stages` config key as a list of registered stage names."""
  names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  for name in names:
    if name not in STAGES:
      raise ConfigError(f"Unknown stage {name!r} in config key stages; valid choices: "
                        f"{', '.join(STAGES.names())}.")
  return names


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def read_result(workdir: str, stage: str) -> dict[str, Any] | None:
  path = os.path.join(stage_dir(workdir, stage), "result.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Writes atomically (temp file + rename), so a kill never leaves half a file."""
  write_bytes(path, json.dumps(obj, indent=2).encode())


def provider(need: Need, earlier: Sequence[str], workdir: str | None) -> str | None:
  """The stage that meets `need`: the nearest earlier one of the run that gives it,
  else the first of `need.stages` finished in the workdir."""
  ran = [s for s in earlier if s in need.stages]
  if ran:
    return ran[-1]
  if workdir is None:
    return None
  return next((s for s in need.stages
               if os.path.exists(os.path.join(stage_dir(workdir, s), "result.json"))),
              None)


def check_needs(config: Any, workdir: str) -> None:
  """Refuses a `stages` list in which a stage needs what nothing before it gives."""
  names = stage_names(config)
  for i, name in enumerate(names):
    for need in STAGES.get(name).needs(config, name):
      if provider(need, names[:i], workdir) is None:
        raise ConfigError(
            f"stage {name} needs {need.what} from {' or '.join(need.stages)} "
            f"({need.because}), but no stage before it in stages={config.stages!r} "
            f"gives it and {workdir} holds no finished one; put "
            f"{need.stages[0]} before {name}{need.instead}.")


@dataclasses.dataclass
class StageContext:
  """What a stage runs with: the config, the workdir, its name, the run's builder,
  and the results of the stages before it."""
  config: Any
  workdir: str
  stage: str
  build: Any                       # builders.Builder
  earlier: dict[str, dict[str, Any]]

  @property
  def cfg(self) -> Any:
    """The stage's own config block."""
    return self.config[self.stage]

  @property
  def out_dir(self) -> str:
    return stage_dir(self.workdir, self.stage)

  def source(self, need: Need) -> tuple[str, dict[str, Any]]:
    """(the stage that meets `need`, its result)."""
    name = provider(need, list(self.earlier), self.workdir)
    result = self.earlier.get(name) or read_result(self.workdir, name)
    return name, result


def run_once(ctx: StageContext) -> dict[str, Any]:
  """Runs the stage unless it is finished; returns its result either way."""
  done = read_result(ctx.workdir, ctx.stage)
  if done is not None:
    note(f"[{ctx.stage}] finished earlier; reusing {ctx.out_dir}/result.json")
    return done
  preemption = ctx.build.preemption
  with preemption.catching():
    result = STAGES.get(ctx.stage).run(ctx)
    write_json(os.path.join(ctx.out_dir, "result.json"), result)
    if jax.process_count() > 1:  # Later stages read the files process 0 just wrote.
      parallel.wait_for_processes(f"{ctx.stage} finished")
    if preemption.requested:  # Came after the last step (evaluation, derive).
      message = (f"[{ctx.stage}] preempted after finishing the stage; rerun the same "
                 "command to run the remaining stages")
      note(message)
      raise Preempted(message)
  return result
