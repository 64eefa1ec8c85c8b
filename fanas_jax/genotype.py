"""The stage-wise search space and the discrete architectures (genotypes) it contains.

The network has five stages (normal, reduce, normal, reduce, normal) of three layers
each (`search.layers_per_stage`; the tests' tiny configs use one). A search space
lists, per stage, the candidate attention ops every layer of that stage chooses
among; a genotype names the one op chosen for each of the 15 layers. Both are plain
data, so configs, JSON files and tests can hold them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from fanas_jax.ops.layers import OPS, ORIGINAL_OPS

STAGE_KINDS = ("normal", "reduce", "normal", "reduce", "normal")
NUM_STAGES = len(STAGE_KINDS)
LAYERS_PER_STAGE = 3  # the paper's; a search space may hold fewer or more
# Each reduce stage halves the feature map, so the network (after its stem) divides
# the image side by this; the CAR decoder also needs the stage-2 map to be >= 2x2.
NETWORK_REDUCTION = 2 ** STAGE_KINDS.count("reduce")


def stage_name(stage: int) -> str:
  return f"stage{stage + 1}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Per-stage candidate op names; every layer of a stage shares its stage's list."""
  candidates: tuple[tuple[str, ...], ...]
  layers: int = LAYERS_PER_STAGE  # per stage

  def __post_init__(self):
    if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
      raise ValueError(f"A stage needs at least one layer (search.layers_per_stage), "
                       f"got {self.layers!r}.")
    if len(self.candidates) != NUM_STAGES:
      raise ValueError(
          f"A search space needs {NUM_STAGES} stages of candidates, got "
          f"{len(self.candidates)}.")
    for s, ops in enumerate(self.candidates):
      if not ops:
        raise ValueError(f"{stage_name(s)} has no candidate ops.")
      if len(set(ops)) != len(ops):
        raise ValueError(f"{stage_name(s)} lists an op twice: {list(ops)}.")
      OPS.check_all(ops, key="search.candidates")

  @classmethod
  def uniform(cls, ops: Sequence[str] = ORIGINAL_OPS,
              layers: int = LAYERS_PER_STAGE) -> "SearchSpace":
    return cls(tuple(tuple(ops) for _ in range(NUM_STAGES)), layers)

  def layer_ops(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """[stage][layer] -> candidate ops, the form the network is built from."""
    return tuple(tuple(ops for _ in range(self.layers)) for ops in self.candidates)

  def alpha_shapes(self) -> dict[str, tuple[int, int]]:
    return {stage_name(s): (self.layers, len(ops))
            for s, ops in enumerate(self.candidates)}


@dataclasses.dataclass(frozen=True)
class DeriveLimits:
  """Per-stage limits of the original parser: at most this many 7x7 / global ops."""
  max_window7: int | None = 1
  max_global: int | None = 1

  def violations(self, ops: Sequence[str]) -> list[str]:
    specs = [OPS.get(op) for op in ops]
    problems = []
    n7 = sum(spec.window == 7 for spec in specs)
    ng = sum(spec.is_global for spec in specs)
    if self.max_window7 is not None and n7 > self.max_window7:
      problems.append(f"{n7} 7x7 local ops (at most {self.max_window7})")
    if self.max_global is not None and ng > self.max_global:
      problems.append(f"{ng} global ops (at most {self.max_global})")
    return problems


@dataclasses.dataclass(frozen=True)
class Genotype:
  """One op per layer: stages[s][l] is the op of layer l of stage s; every stage has
  the same number of layers (3 in the paper's network)."""
  stages: tuple[tuple[str, ...], ...]

  def __post_init__(self):
    object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
    if len(self.stages) != NUM_STAGES:
      raise ValueError(
          f"A genotype has {NUM_STAGES} stages, got {len(self.stages)}.")
    for s, ops in enumerate(self.stages):
      if not ops or len(ops) != len(self.stages[0]):
        raise ValueError(
            f"{stage_name(s)} of the genotype has {len(ops)} layers; every stage needs "
            f"the same number, at least one (stage1 has {len(self.stages[0])}).")
      OPS.check_all(ops, key="genotype")

  @property
  def layers(self) -> int:
    """Layers per stage."""
    return len(self.stages[0])

  def check_limits(self, limits: DeriveLimits) -> None:
    for s, ops in enumerate(self.stages):
      problems = limits.violations(ops)
      if problems:
        raise ValueError(
            f"Genotype {stage_name(s)} {list(ops)} breaks the derive limits: "
            + "; ".join(problems) + ".")

  def layer_ops(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
    return tuple(tuple((op,) for op in ops) for ops in self.stages)

  def to_dict(self) -> dict[str, list[str]]:
    return {stage_name(s): list(ops) for s, ops in enumerate(self.stages)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Sequence[str]]) -> "Genotype":
    expected = [stage_name(s) for s in range(NUM_STAGES)]
    if sorted(d) != sorted(expected):
      raise ValueError(f"A genotype has the keys {expected}, got {sorted(d)}.")
    return cls(tuple(tuple(d[k]) for k in expected))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Genotype":
    return cls.from_dict(json.loads(text))

  def table(self) -> str:
    """A fixed-width table, one row per stage, for logs and the summary."""
    layers = range(1, self.layers + 1)
    rows = ["| stage | kind | " + " | ".join(f"layer {l}" for l in layers) + " |",
            "|---|---|" + "---|" * self.layers]
    for s, ops in enumerate(self.stages):
      first = ops[0] + (" (stride 2)" if STAGE_KINDS[s] == "reduce" else "")
      rows.append(f"| {s + 1} | {STAGE_KINDS[s]} | " + " | ".join((first,) + ops[1:]) + " |")
    return "\n".join(rows)


# The architecture found by the original search (its shipped genotype).
NAMED_GENOTYPES: dict[str, Genotype] = {
    "original": Genotype((
        ("local7_h4", "local5_h4", "local3_h8"),
        ("local3_h4", "local7_h8", "local5_h4"),
        ("local3_h8", "local3_h4", "local5_h8"),
        ("local3_h4", "local3_h4", "local7_h8"),
        ("nonlocal", "local3_h8", "local3_h4"),
    )),
}


def search_space_from_config(search: Any) -> SearchSpace:
  """The config's `search` block -> SearchSpace: its candidates (a list of op names for
  every stage, or 5 lists) and layers_per_stage."""
  cands, layers = list(search.candidates), search.layers_per_stage
  if cands and all(isinstance(c, str) for c in cands):
    return SearchSpace.uniform(cands, layers)
  return SearchSpace(tuple(tuple(c) for c in cands), layers)


def genotype_from_file(path: str, key: str) -> Genotype:
  """The genotype in a JSON file: a run's genotype.json (derive's or a search phase's
  record, under 'genotype') or a bare {stageN: [op, op, op]}. A file that is missing,
  not JSON, or not a genotype of registered ops fails in one line naming `key`."""
  where = f"{key}={path!r}"
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{where}: no such genotype file (a genotype.json, a named genotype "
                     f"({', '.join(sorted(NAMED_GENOTYPES))}) or 'searched').") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{where} does not read as JSON: {e}.") from None
  if isinstance(record, dict) and "genotype" in record:
    record = record["genotype"]
  try:
    if not isinstance(record, dict):
      raise ValueError(f"expected {{stage1: [op, op, op], ...}}, got {type(record).__name__}")
    genotype = Genotype.from_dict(record)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where} is not a genotype: {e}") from None
  return genotype


def named_genotype(name: str) -> Genotype:
  if name not in NAMED_GENOTYPES:
    raise ValueError(f"Unknown genotype {name!r} (config key train.genotype); valid "
                     f"choices: {', '.join(sorted(NAMED_GENOTYPES))}, or 'searched'.")
  return NAMED_GENOTYPES[name]
