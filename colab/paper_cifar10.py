# ---
# jupyter:
#   accelerator: GPU
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
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
# # The paper's CIFAR-10 experiments: the search, and the training of `original`
#
# **Runtime:** GPU (Runtime > Change runtime type > GPU; an A100 or L4 best) or TPU,
# with Google Drive mounted. **Time:** not measured yet; estimates from the model's
# MACs: the search (20 epochs of context auto-regression on ImageNet-100 at 32x32,
# then 50 supervised epochs on CIFAR-10) at least 4.7 PFLOP, and the 500-epoch
# training of the paper's `original` architecture about 70 PFLOP, 0.7-2 GPU-hours.
# Both are longer than a Colab session may last: the runs, their checkpoints and the
# prepared data live on Drive, and running a cell again after a disconnect resumes
# where the last checkpoint left it (finished stages are skipped).
#
# **Data it needs, in `ARCHIVES` on Drive** (downloaded once by you; nothing is
# fetched here): `cifar-10-python.tar.gz` (163 MB, https://www.cs.toronto.edu/~kriz/)
# for CIFAR-10, and for the search's first phase the ImageNet-100 subset at 32x32,
# prepared from `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
# (https://image-net.org, 148 GB + 6.3 GB). Preparing it reads the whole train tar
# once; you may instead prepare `imagenet100_32` elsewhere with
# `python -m fanas_jax.data.prepare imagenet100_32 --manual_dir=DIR --data_dir=DATA`
# and copy `DATA/imagenet100_32` into `DATA_DIR` on Drive: a dataset already there
# is not prepared again.

# %% tags=["install"]
# Installs fanas_jax from its repository (FANAS_REPO may name another copy, e.g. a
# local clone), with the JAX of the runtime's accelerator.
import os
import shutil

FANAS_REPO = os.environ.get("FANAS_REPO", "git+https://github.com/OWNER/fanas_jax")
JAX = ("jax[cuda12]" if shutil.which("nvidia-smi") else
       "jax[tpu]" if os.path.exists("/dev/accel0") else "jax")
# %pip install -q {FANAS_REPO} {JAX}

# %% tags=["parameters"]
# FANAS_NOTEBOOK_TINY=1 runs the tests' sizes (configs/paper/*.py:tiny) on the
# fabricated archives in FANAS_NOTEBOOK_ARCHIVES, without Drive.
import os

TINY = os.environ.get("FANAS_NOTEBOOK_TINY") == "1"
DRIVE = os.environ.get("FANAS_NOTEBOOK_WORKDIR", "/content/drive/MyDrive/fanas_jax")
ARCHIVES = os.environ.get("FANAS_NOTEBOOK_ARCHIVES", os.path.join(DRIVE, "archives"))
DATA_DIR = os.path.join(DRIVE, "tensorflow_datasets")
SEARCH_RUN = os.path.join(DRIVE, "runs", "cifar_search")
TRAIN_RUN = os.path.join(DRIVE, "runs", "cifar_original")
VARIANT = ":tiny" if TINY else ""
CHECKPOINT_EVERY = 500  # steps; a disconnect loses at most this many

# %%
# `run` shows a command's progress as it comes; the `show_` helpers a run's figures.
from fanas_jax.notebook import read_json, read_jsonl, run, show_genotype, show_heatmaps


# %% [markdown]
# ## Drive
# In Colab, Drive is mounted at `/content/drive`; elsewhere `DRIVE` is a local folder.

# %%
try:
  from google.colab import drive
except ImportError:
  print(f"not in Colab: runs and data go to {DRIVE}")
else:
  drive.mount("/content/drive")
os.makedirs(DRIVE, exist_ok=True)

# %% [markdown]
# ## The datasets
# Each is written once as ArrayRecord into `DATA_DIR` by the project's own builders
# (no TensorFlow, no network), with the archives' sizes and SHA-256 checked.

# %%
from fanas_jax.data.datasets import get_dataset

for name in ("cifar10", "imagenet100_32"):
  version = get_dataset(name).tfds_version
  if os.path.exists(os.path.join(DATA_DIR, name, version, "dataset_info.json")):
    print(f"[data] {name} {version} is in {DATA_DIR}/{name}/{version} (prepared earlier)")
  else:
    run("fanas_jax.data.prepare", name, f"--manual_dir={ARCHIVES}",
        f"--data_dir={DATA_DIR}")

# %% [markdown]
# ## The search
# `configs/paper/cifar_search.py`: phase 1 restores masked ImageNet-100 images from
# their context (labels unused), phase 2 searches supervised on CIFAR-10 from phase
# 1's alphas, and derive keeps per stage the three most probable ops with at most one
# 7x7 and one non-local op.

# %%
COMMON = [f"--config.data_dir={DATA_DIR}",
          f"--config.checkpoint.every_steps={CHECKPOINT_EVERY}"]
run("fanas_jax.main", f"--config=configs/paper/cifar_search.py{VARIANT}",
    f"--workdir={SEARCH_RUN}", *COMMON)

# %%
show_genotype(SEARCH_RUN)
show_heatmaps(SEARCH_RUN)

# %% [markdown]
# ## Training the paper's `original` architecture
# `configs/paper/cifar_train.py`: width 96, 500 epochs at batch 56, the authors'
# recipe. To train the architecture found above instead, add
# `--config.train.genotype={SEARCH_RUN}/genotype.json` (and use a new workdir).

# %%
run("fanas_jax.main", f"--config=configs/paper/cifar_train.py{VARIANT}",
    f"--workdir={TRAIN_RUN}", *COMMON)

# %%
import matplotlib.pyplot as plt

train = read_json(TRAIN_RUN, "train", "result.json")
print(f"original: test top-1 {train['test_top1']:.4f} on {train['test_examples']} "
      f"test images ({train['params']:,} parameters, {train['epochs']} epochs)")
losses = [(r["step"], r["loss"]) for r in read_jsonl(TRAIN_RUN, "metrics.jsonl")
          if "loss" in r]
plt.plot(*zip(*losses), marker=".")
plt.xlabel("step")
plt.ylabel("training loss")
plt.title("cifar_train: original")
plt.show()
