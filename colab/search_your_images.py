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
# # Search an architecture for your own images
#
# **Runtime:** GPU recommended (Runtime > Change runtime type > GPU); CPU works at
# the tiny settings. **Time:** about 5 minutes to install; the tiny settings
# (`FANAS_NOTEBOOK_TINY=1`) take a few minutes on a CPU, most of it compiling; the
# default settings (10 + 10 search epochs and 30 training epochs on 600 images) are
# not measured yet: expect tens of minutes on a GPU.
#
# Point `IMAGES` at a folder of class folders per split, `IMAGES/train/CLASS/*.png`
# and `IMAGES/test/CLASS/*.png` (jpg, jpeg, png, bmp, gif, webp). For the demo a
# small folder of ten drawn shapes is generated below. The notebook then searches
# (self-supervised, then supervised), derives the architecture, trains it, evaluates
# it on the test split and classifies a few test images with the trained network.

# %% tags=["install"]
# Installs fanas_jax from its repository (FANAS_REPO may name another copy, e.g. a
# local clone).
import os

FANAS_REPO = os.environ.get("FANAS_REPO", "git+https://github.com/OWNER/fanas_jax")
# %pip install -q {FANAS_REPO}

# %% tags=["parameters"]
# FANAS_NOTEBOOK_TINY=1 runs the tests' sizes (configs/paper/cifar_train.py:searched,tiny).
import os

TINY = os.environ.get("FANAS_NOTEBOOK_TINY") == "1"
WORKDIR = os.environ.get("FANAS_NOTEBOOK_WORKDIR", "runs/my_images")
IMAGES = os.path.join(WORKDIR, "images")  # your folder here (then skip the next cell)
IMAGE_SIZE = 32
# The paper's CIFAR-10 search and training recipe; the search supernet compiles for
# 32x32 inputs, and non-square images are stretched.
CONFIG = "configs/paper/cifar_train.py:searched" + (",tiny" if TINY else "")
# Shortened, alpha as in the quickstart: Adam as over the paper's step counts, no
# weight decay on alpha (README, "Why the authors' decay stops a short search").
SHORTER = [] if TINY else [
    "--config.search_phase1.epochs=10", "--config.search_phase2.epochs=10",
    "--config.search_phase1.alpha_reference_steps=39580",
    "--config.search_phase2.alpha_reference_steps=39050",
    "--config.search_phase1.a_weight_decay=0.0", "--config.search_phase2.a_weight_decay=0.0",
    "--config.train.epochs=30", "--config.train.warmup_epochs=2"]
# Generated (train, test) images. Tiny: 32 training images, so each search phase and
# the training take as many steps per epoch as the tests' tiny runs.
IMAGES_PER_SPLIT = (32, 20) if TINY else (600, 200)

# %%
# `run` shows a command's progress as it comes; the `show_` helpers a run's figures.
from fanas_jax.notebook import read_json, run, show_genotype, show_heatmaps


# %% [markdown]
# ## A small image folder
# Ten classes of shapes, each drawn at a random place, size and colour on a random
# background.

# %%
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes",
          "diamond", "dots", "checker")


def draw(shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
  """One image of `shape`, its place, size and colours drawn from rng."""
  image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 90, 3)))
  pen = ImageDraw.Draw(image)
  ink = tuple(int(v) for v in rng.integers(150, 256, 3))
  r = int(rng.integers(size // 5, size // 3))
  cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == "circle":
    pen.ellipse(box, fill=ink)
  elif shape == "square":
    pen.rectangle(box, fill=ink)
  elif shape == "triangle":
    pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
  elif shape == "cross":
    pen.line((cx - r, cy - r, cx + r, cy + r), fill=ink, width=3)
    pen.line((cx - r, cy + r, cx + r, cy - r), fill=ink, width=3)
  elif shape == "ring":
    pen.ellipse(box, outline=ink, width=3)
  elif shape == "diamond":
    pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=ink)
  elif shape == "dots":
    for dx in (-r // 2, r // 2):
      for dy in (-r // 2, r // 2):
        pen.ellipse((cx + dx - 2, cy + dy - 2, cx + dx + 2, cy + dy + 2), fill=ink)
  else:
    step = int(rng.integers(3, 6))
    for k in range(0, size, 2 * step):
      if shape == "hstripes":
        pen.rectangle((0, k, size, k + step - 1), fill=ink)
      elif shape == "vstripes":
        pen.rectangle((k, 0, k + step - 1, size), fill=ink)
      else:
        for j in range(0, size, 2 * step):
          pen.rectangle((j + k % (4 * step), k, j + k % (4 * step) + step - 1,
                         k + step - 1), fill=ink)
  return image


def write_folder(root: str, counts: tuple[int, int], seed: int = 0) -> None:
  """root/{train,test}/SHAPE/NNN.png: counts[k] images in split k, the classes in turn."""
  rng = np.random.default_rng(seed)
  for split, count in zip(("train", "test"), counts):
    for i in range(count):
      shape = SHAPES[i % len(SHAPES)]
      os.makedirs(os.path.join(root, split, shape), exist_ok=True)
      draw(shape, rng).save(os.path.join(root, split, shape, f"{i:03d}.png"))


write_folder(IMAGES, IMAGES_PER_SPLIT)

# %%
import matplotlib.pyplot as plt


def show(images: list, titles: list[str], columns: int = 10) -> None:
  rows = -(-len(images) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, image, title in zip(axes.flat, images, titles):
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
  fig.tight_layout()
  plt.show()


show([Image.open(os.path.join(IMAGES, "train", s, f"{k:03d}.png")) for k, s in enumerate(SHAPES)],
     list(SHAPES))

# %% [markdown]
# ## Search, derive, train, evaluate
# One command: search phase 1 (context auto-regression, labels unused), phase 2
# (supervised), derive, then training of the derived network and its test top-1.
# Rerun the cell after a disconnect: finished stages are skipped, the interrupted one
# resumes from its checkpoint.

# %%
RUN = os.path.join(WORKDIR, "run")
DATASET = f"folder:{os.path.abspath(IMAGES)}"
run("fanas_jax.main", f"--config={CONFIG}", f"--workdir={RUN}",
    f"--config.dataset={DATASET}", f"--config.search_phase1.dataset={DATASET}",
    f"--config.image_size={IMAGE_SIZE}", *SHORTER)

# %% [markdown]
# ## What the search found

# %%
show_genotype(RUN)
show_heatmaps(RUN, ["search_phase2"])
train = read_json(RUN, "train", "result.json")
print(f"test top-1 {train['test_top1']:.4f} on {train['test_examples']} test images "
      f"({train['params']:,} parameters, width {train['width']})")

# %% [markdown]
# ## Classify with the trained network
# The weights in `RUN/train/final_variables.msgpack` name their own architecture and
# width; the images go through the training stage's evaluation preprocessing.

# %%
import jax
import ml_collections

from fanas_jax import finetune
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset
from fanas_jax.data.transforms import eval_preprocess
from fanas_jax.model import make_model, model_options

config = ml_collections.ConfigDict(read_json(RUN, "config.json"))
trained = finetune.load_pretrained("train", RUN, "train")
spec = get_dataset(DATASET)
model = make_model(trained.genotype.layer_ops(), trained.width, "classifier",
                   **model_options(config.model), num_classes=spec.num_classes,
                   dropout=config.train.dropout)
classify = jax.jit(lambda images: model.apply(trained.variables, images, train=False))

test = pipeline.load_split(DATASET, "test")
few = test[::IMAGES_PER_SPLIT[1] // len(SHAPES)]  # the first test image of each class
batch = next(pipeline.eval_batches(few, batch_size=config.eval_batch_size,
                                   preprocess=eval_preprocess(config.train, IMAGE_SIZE, spec)))
predicted = np.asarray(classify(batch["image"])).argmax(-1)
shown = [i for i in range(len(few))]
names = spec.class_names
for i in shown:
  print(f"test image {batch['index'][i]}: predicted {names[predicted[i]]}, "
        f"true {names[batch['label'][i]]}")
show([test[int(batch["index"][i])]["image"] for i in shown],
     [f"{names[predicted[i]]}\n(true {names[batch['label'][i]]})" for i in shown])
