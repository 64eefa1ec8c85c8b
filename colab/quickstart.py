# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fanas_jax quickstart: search, derive, train and retrieve on the embedded digits
#
# **Runtime:** a CPU runtime is enough (Runtime > Change runtime type > CPU); a GPU
# or TPU runtime also works. **Time:** about a minute to install, then about 20
# minutes on a 2-core CPU (README, "Results of the quickstart"), half of it
# compiling the two search steps; a rerun reads them from the compilation cache.
# No download: the 1,797 8x8 digits ship inside scikit-learn.
#
# The whole pipeline of `configs/quickstart.py`: a self-supervised search (context
# auto-regression), a supervised search, the derived architecture, its training
# (test top-1) and zero-shot retrieval on held-out classes (Recall@K). Then the
# alpha heatmaps, the derived genotype, the results and the logged scalars.

# %% tags=["install"]
# Installs fanas_jax from its repository (FANAS_REPO may name another copy, e.g. a
# local clone).
import os

FANAS_REPO = os.environ.get("FANAS_REPO", "git+https://github.com/OWNER/fanas_jax")
# %pip install -q {FANAS_REPO}

# %% tags=["parameters"]
# FANAS_NOTEBOOK_TINY=1 runs the seconds-per-stage variant (the tests do).
import os

TINY = os.environ.get("FANAS_NOTEBOOK_TINY") == "1"
CONFIG = "configs/quickstart.py:tiny" if TINY else "configs/quickstart.py"
WORKDIR = os.environ.get("FANAS_NOTEBOOK_WORKDIR", "runs/quickstart")

# %%
# `run` shows a command's progress as it comes; the `show_` helpers a run's figures.
from fanas_jax.notebook import read_json, read_jsonl, run, show_genotype, show_heatmaps


# %% [markdown]
# ## Run the pipeline
# Every stage writes `WORKDIR/<stage>/` and is skipped once finished; an interrupted
# run resumes from its newest checkpoint when this cell runs again.

# %%
run("fanas_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}")

# %% [markdown]
# ## Alpha heatmaps
# Per search phase and stage: softmax(alpha) minus uniform, per layer and op, over
# the epochs (red: the op gains weight).

# %%
show_heatmaps(WORKDIR)

# %% [markdown]
# ## The derived architecture
# Per stage, the three ops that maximise the summed log-probability with at most one
# 7x7 and one non-local op.

# %%
show_genotype(WORKDIR)

# %% [markdown]
# ## Results

# %%
from IPython.display import Markdown, display

train = read_json(WORKDIR, "train", "result.json")
retrieval = read_json(WORKDIR, "retrieval", "result.json")
recall = " / ".join(f"{retrieval['recall'][k]:.3f}" for k in sorted(retrieval["recall"], key=int))
display(Markdown("\n".join([
    "| stage | result |", "|---|---|",
    f"| train | test top-1 {train['test_top1']:.4f} on {train['test_examples']} images |",
    f"| retrieval | Recall@{'/'.join(sorted(retrieval['recall'], key=int))} {recall} |"])))
print(f"test top-1 {train['test_top1']:.4f}; Recall@1 {retrieval['recall']['1']:.3f}")
with open(os.path.join(WORKDIR, "summary.md")) as f:
  display(Markdown(f.read()))

# %% [markdown]
# ## The logged scalars
# The same scalars as `WORKDIR/tensorboard/` (in Colab: `%load_ext tensorboard` then
# `%tensorboard --logdir WORKDIR/tensorboard`), read here from `metrics.jsonl`.

# %%
import matplotlib.pyplot as plt

records = read_jsonl(WORKDIR, "metrics.jsonl")
PLOTS = [("search_phase1", "a_loss"), ("search_phase2", "a_loss"),
         ("search_phase2", "entropy_below_uniform"), ("train", "loss"),
         ("retrieval", "loss")]
fig, axes = plt.subplots(1, len(PLOTS), figsize=(4 * len(PLOTS), 3))
for ax, (stage, key) in zip(axes, PLOTS):
  points = [(r["step"], r[key]) for r in records if r["stage"] == stage and key in r]
  ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
  ax.set_title(f"{stage}/{key}", fontsize=9)
  ax.set_xlabel("step")
fig.tight_layout()
plt.show()
