"""The human-readable side of a run: workdir/summary.md.

Each stage's section comes from the `summary` it registered with (fanas_jax/stage.py).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax

from fanas_jax.logging_utils import note
from fanas_jax.stages import STAGES


def write_summary(config: Any, workdir: str, results: Mapping[str, Any],
                  timings: Mapping[str, float]) -> None:
  if jax.process_index() != 0:
    return
  lines = ["# fanas_jax run summary", "", f"workdir: `{workdir}`", ""]
  for name, result in results.items():
    lines += STAGES.get(name).summary(config, workdir, name, result)
  lines += ["## time per stage (this invocation)", ""]
  lines += [f"- {k}: {v:.1f} s" for k, v in timings.items()]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(text)
  note(text)
