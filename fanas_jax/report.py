"""The human-readable side of a run: summary.md and figures in the workdir."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from fanas_jax.genotype import STAGE_KINDS, Genotype, search_space_from_config, stage_name
from fanas_jax.stage import stage_dir


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


def write_summary(config: Any, workdir: str, results: Mapping[str, Any],
                  timings: Mapping[str, float]) -> None:
  if jax.process_index() != 0:
    return
  candidates = search_space_from_config(config.search.candidates).candidates
  lines = ["# fanas_jax run summary", "", f"workdir: `{workdir}`", ""]
  for stage in ("search_phase1", "search_phase2"):
    if stage not in results:
      continue
    r = results[stage]
    history_path = os.path.join(stage_dir(workdir, stage), "alpha_history.json")
    with open(history_path) as f:
      history = json.load(f)
    figure = os.path.join(stage_dir(workdir, stage), "alpha_heatmap.png")
    plot_alpha_history(history, candidates, figure)
    lines += [f"## {stage}: {config[stage].objective}", "",
              f"- architecture-half loss: {r['first_a_loss']:.4f} "
              f"(epoch {r['first_a_epoch']}) -> "
              f"{r['final_a_loss']:.4f} (last)",
              f"- weight-half loss (last epoch): {r['final_w_loss']:.4f}",
              f"- mean alpha entropy per layer: {r['entropy_first']:.6f} -> "
              f"{r['entropy_last']:.6f} nats (uniform: {np.log(len(candidates[0])):.6f})",
              f"- genotype of this phase (epoch {r['epoch']}): "
              f"`{stage}/genotype.json`; alpha heatmap: `{stage}/alpha_heatmap.png`", ""]
  if "derive" in results:
    g = Genotype.from_dict(results["derive"]["genotype"])
    lines += [f"## derived architecture ({results['derive']['rule']} rule, from "
              f"{results['derive']['from_stage']})", "", g.table(), "",
              "Saved as `genotype.json`.", ""]
  if "train" in results:
    r = results["train"]
    lines += ["## classification", "",
              f"- test top-1: **{r['test_top1']:.4f}** on {r['test_examples']} examples",
              f"- network: width {r['width']}, {r['params']:,} parameters, trained from "
              f"scratch for {r['epochs']} epochs", ""]
  if "retrieval" in results:
    r = results["retrieval"]
    lines += ["## zero-shot retrieval", "",
              f"- train classes {r['train_classes']}, test classes {r['test_classes']} "
              f"({r['test_examples']} test images)",
              "- " + ", ".join(f"Recall@{k}: **{v:.4f}**" for k, v in r["recall"].items()), ""]
  lines += ["## time per stage (this invocation)", ""]
  lines += [f"- {k}: {v:.1f} s" for k, v in timings.items()]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(text)
  print(text)
