"""Figures of a run: a genotype's layout and the alpha history of a search phase.

matplotlib is imported inside the functions, so the rest of the package never pays
for it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fanas_jax.genotype import NUM_STAGES, STAGE_KINDS, Genotype, stage_name
from fanas_jax.ops.layers import OPS


def op_family(op: str) -> str:
  """What a figure colours an op by: its window, global, or its name without heads."""
  spec = OPS.get(op, key="genotype")
  if spec.is_global:
    return "global"
  if spec.window:
    return f"local {spec.window}x{spec.window}"
  return op.split("_h")[0]


def _family_colours() -> dict[str, Any]:
  """One colour per family of every registered op, so figures compare across runs."""
  import matplotlib.pyplot as plt

  def order(op):
    spec = OPS.get(op)
    return (spec.is_global, spec.window is None, spec.window or 0, op)

  families = list(dict.fromkeys(op_family(op) for op in sorted(OPS.names(), key=order)))
  palette = plt.get_cmap("tab10").colors
  return {family: palette[i % len(palette)] for i, family in enumerate(families)}


def plot_genotype(genotype: Genotype, path: str, title: str = "genotype") -> None:
  """Saves the genotype as a PNG: stages left to right, layers top to bottom.

  Boxes are coloured by op family (window size, or global), so the pattern of an
  architecture (e.g. large windows early, global attention late) shows at a glance;
  the stride-2 layer opening each reduce stage is hatched.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import patches

  colours = _family_colours()
  layers = genotype.layers
  fig, ax = plt.subplots(figsize=(2.0 * NUM_STAGES, 1.2 + 1.0 * layers))
  box_w, box_h = 0.8, 0.6
  for s, ops in enumerate(genotype.stages):
    x = s + 0.5
    widening = 2 ** STAGE_KINDS[:s + 1].count("reduce")
    ax.text(x, layers + 0.6,
            f"stage {s + 1}\n{STAGE_KINDS[s]}, {widening if widening > 1 else ''}C",
            ha="center", va="center", fontsize=10, fontweight="bold")
    for l, op in enumerate(ops):
      y = layers - l
      stride2 = STAGE_KINDS[s] == "reduce" and l == 0
      ax.add_patch(patches.FancyBboxPatch(
          (x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
          facecolor=colours[op_family(op)], edgecolor="black",
          linewidth=1.6 if stride2 else 0.8, hatch="//" if stride2 else None))
      ax.text(x, y, op + ("\nstride 2" if stride2 else ""), ha="center", va="center",
              fontsize=9, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                  "alpha": 0.8, "linewidth": 0})
      if l:
        ax.annotate("", (x, y + box_h / 2), (x, y + 1 - box_h / 2),
                    arrowprops={"arrowstyle": "->", "color": "0.3"})
    if s:  # From the previous stage's last layer (y=1) to this stage's first.
      ax.annotate("", (x - box_w / 2, layers), (x - 1 + box_w / 2, 1),
                  arrowprops={"arrowstyle": "->", "color": "0.6"})
  used = dict.fromkeys(op_family(op) for ops in genotype.stages for op in ops)
  handles = [patches.Patch(facecolor=colours[f], edgecolor="black", label=f)
             for f in colours if f in used]
  handles.append(patches.Patch(facecolor="white", edgecolor="black", hatch="//",
                               label="stride 2 (halves the map)"))
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02),
            ncol=len(handles), fontsize=8, frameon=False)
  ax.set_xlim(0, NUM_STAGES)
  ax.set_ylim(0.4, layers + 1)
  ax.axis("off")
  ax.set_title(title)
  fig.savefig(path, dpi=150, bbox_inches="tight")
  plt.close(fig)


def plot_alpha_history(history: list[dict[str, Any]], candidates: Any, path: str) -> None:
  """One heatmap per stage: softmax(alpha) - 1/n_ops per layer and op over epochs.

  Deviations from uniform, on one symmetric colour scale for all stages, so the small
  early moves of a search are visible and stages compare directly.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [stage_name(s) for s in range(len(STAGE_KINDS))]
  grids = []
  for name in names:
    a = np.asarray([h["alphas"][name] for h in history])  # [epochs, layers, ops]
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    grids.append((p - 1.0 / p.shape[-1]).transpose(1, 2, 0).reshape(-1, len(history)))
  limit = max(max(np.abs(g).max() for g in grids), 1e-9)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
  for ax, (s, name), grid in zip(axes[0], enumerate(names), grids):
    layers, ops = len(grid) // len(candidates[s]), len(candidates[s])
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_yticks(range(layers * ops))
    ax.set_yticklabels([f"L{l + 1} {candidates[s][o]}" for l in range(layers)
                        for o in range(ops)], fontsize=5)
    ax.set_xlabel("epoch")
    ax.set_xticks(range(len(history)))
    ax.set_xticklabels([h["epoch"] for h in history], fontsize=6)
    ax.set_title(f"{name} ({STAGE_KINDS[s]})", fontsize=8)
  fig.suptitle("softmax(alpha) - uniform, per layer and op, over epochs", fontsize=9)
  fig.tight_layout()
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
  fig.savefig(path, dpi=150)
  plt.close(fig)
