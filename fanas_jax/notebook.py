"""What the notebooks in colab/ share: a command run with its live progress, and a
run's derived genotype and alpha heatmaps shown inline.

Shipped with the package, so a notebook needs only the install cell. IPython is
imported where it is used: the command line never needs it.
"""
from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from typing import Any, Sequence

SEARCH_PHASES = ("search_phase1", "search_phase2")


def run(module: str, *args: str) -> None:
  """Runs `python -m module args`, its output shown as it comes; a failure raises."""
  proc = subprocess.Popen([sys.executable, "-m", module, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  text = codecs.getincrementaldecoder("utf-8")("replace")
  while chunk := proc.stdout.read1(4096):
    sys.stdout.write(text.decode(chunk))
    sys.stdout.flush()
  if proc.wait():
    raise RuntimeError(f"python -m {module} {' '.join(args)} exited with status "
                       f"{proc.returncode}")


def read_json(*path: str) -> Any:
  with open(os.path.join(*path)) as f:
    return json.load(f)


def read_jsonl(*path: str) -> list[Any]:
  """A JSON-lines file (metrics.jsonl), one record per line."""
  with open(os.path.join(*path)) as f:
    return [json.loads(line) for line in f]


def show_genotype(workdir: str) -> dict[str, Any]:
  """Prints the derived genotype, one `stage: ops` line per stage, and shows its
  figure; returns workdir/genotype.json."""
  from IPython.display import Image, display
  derived = read_json(workdir, "genotype.json")
  for stage, ops in derived["genotype"].items():
    print(f"{stage}: {', '.join(ops)}")
  display(Image(filename=os.path.join(workdir, "genotype.png")))
  return derived


def show_heatmaps(workdir: str, phases: Sequence[str] = SEARCH_PHASES) -> None:
  """Each search phase's alpha heatmap, under the phase's name."""
  from IPython.display import Image, display
  for phase in phases:
    print(phase)
    display(Image(filename=os.path.join(workdir, phase, "alpha_heatmap.png")))
