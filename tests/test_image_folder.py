"""User image folders (dataset = "folder:ROOT") against the files written here."""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image
import pytest

from fanas_jax.data import datasets
from fanas_jax.data import image_folder
from fanas_jax.data import pipeline

RNG = np.random.default_rng(0)


def pixels(*shape: int) -> np.ndarray:
  return RNG.integers(0, 256, shape, dtype=np.uint8)


def gradient(h: int, w: int) -> np.ndarray:
  """Smooth RGB, which JPEG keeps within a few levels."""
  y, x = np.mgrid[:h, :w]
  return np.stack([20 * y + 40, 20 * x + 60, 10 * (x + y) + 80],
                  axis=-1).astype(np.uint8)


# Relative path -> (array written, PIL mode). Classes: cat and dog in train,
# cat and emu in test, so labels must come from the union (cat, dog, emu).
FILES = {
    "train/cat/a.png": (pixels(5, 7, 3), "RGB"),
    "train/cat/b.JPG": (gradient(6, 6), "RGB"),
    "train/cat/c.png": (pixels(4, 4), "L"),
    "train/dog/d.png": (pixels(3, 5, 4), "RGBA"),
    "train/dog/e.bmp": (pixels(8, 8, 3), "RGB"),
    "test/cat/f.png": (pixels(9, 4, 3), "RGB"),
    "test/emu/g.webp": (pixels(6, 6, 3), "RGB"),
}
TRAIN = ["train/cat/a.png", "train/cat/b.JPG", "train/cat/c.png",
         "train/dog/d.png", "train/dog/e.bmp"]
TEST = ["test/cat/f.png", "test/emu/g.webp"]
LABELS = {"cat": 0, "dog": 1, "emu": 2}
LOSSLESS = (".png", ".bmp")


def write_folder(root, files) -> str:
  for rel, (array, mode) in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(
        path, **({"lossless": True} if rel.endswith(".webp") else
                 {"quality": 95, "subsampling": 0} if rel.endswith(".JPG") else {}))
  return f"folder:{root}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("images")
  name = write_folder(str(root), FILES)
  (root / "notes.txt").write_text("not a split")
  (root / "train" / "dog" / "readme.txt").write_text("not an image")
  os.makedirs(root / "scratch")  # No class directories: not a split.
  os.makedirs(root / ".cache" / "x")  # Hidden: ignored.
  return name


def expected_rgb(rel: str) -> np.ndarray:
  array, mode = FILES[rel]
  if mode == "L":
    return np.repeat(array[..., None], 3, axis=-1)
  return array[..., :3]


def test_spec_lists_splits_and_class_union(folder):
  spec = datasets.get_dataset(folder)
  assert spec.name == folder
  assert spec.splits == ("test", "train")
  assert spec.class_names == ("cat", "dog", "emu")
  assert (spec.num_classes, spec.channels, spec.native_size) == (3, 3, 0)
  assert spec.mean == (0.485, 0.456, 0.406)
  assert spec.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("split,files", [("train", TRAIN), ("test", TEST),
                                         ("train+test", TRAIN + TEST)])
def test_records_labels_and_pixels(folder, split, files):
  ds = pipeline.load_split(folder, split)
  assert len(ds) == len(files)
  for i, rel in enumerate(files):
    record = ds[i]
    want = expected_rgb(rel)
    assert record["index"] == i
    assert record["label"] == LABELS[rel.split("/")[1]]
    assert record["image"].dtype == np.uint8
    assert record["image"].shape == want.shape
    if rel.lower().endswith(LOSSLESS) or rel.endswith(".webp"):
      np.testing.assert_array_equal(record["image"], want)
    else:  # JPEG is lossy.
      error = np.abs(record["image"].astype(int) - want)
      assert error.mean() < 3 and error.max() <= 10


def test_class_filter_uses_folder_labels(folder):
  dogs = pipeline.load_split(folder, "train", classes=[1], relabel=True)
  assert [dogs[i]["index"] for i in range(len(dogs))] == [3, 4]
  assert {dogs[i]["label"] for i in range(len(dogs))} == {0}


def test_unknown_split_lists_valid_ones(folder):
  with pytest.raises(ValueError, match=r"Unknown split 'val'.*valid splits: "
                     r"test, train"):
    pipeline.load_split(folder, "val")
  with pytest.raises(ValueError, match=r"Unknown split ''"):
    pipeline.load_split(folder, "train+")


def test_missing_root_and_no_splits(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match=re.escape(f"Image folder {missing} does "
                                                 "not exist")):
    datasets.get_dataset(f"folder:{missing}")
  with pytest.raises(ValueError, match="names no directory"):
    datasets.get_dataset("folder:")
  flat = tmp_path / "flat"
  os.makedirs(flat / "train")  # A split directory without classes.
  Image.fromarray(pixels(4, 4, 3)).save(flat / "a.png")
  with pytest.raises(ValueError, match=re.escape(f"Image folder {flat} has no "
                                                 "split directories")):
    pipeline.load_split(f"folder:{flat}", "train")


def test_scan_is_cached_per_root(tmp_path):
  name = write_folder(str(tmp_path), {"train/a/x.png": (pixels(2, 2, 3),
                                                        "RGB")})
  assert datasets.get_dataset(name).class_names == ("a",)
  write_folder(str(tmp_path), {"train/b/y.png": (pixels(2, 2, 3), "RGB")})
  assert datasets.get_dataset(name).class_names == ("a",)
  relative = os.path.relpath(tmp_path)
  assert image_folder.scan(relative) is image_folder.scan(str(tmp_path))


def test_train_iterator_and_eval_batches_run(folder):
  spec = datasets.get_dataset(folder)
  train = pipeline.load_split(folder, "train")
  it = pipeline.train_iterator(train, batch_size=2, seed=0,
                               preprocess=pipeline.Preprocess(
                                   8, spec.mean, spec.std, flip=True,
                                   crop_padding=1))
  seen = []
  for _ in range(4):  # Two epochs of 5 // 2 = 2 steps.
    batch = next(it)
    assert batch["image"].shape == (2, 8, 8, 3)
    assert batch["image"].dtype == np.float32
    for label, index in zip(batch["label"], batch["index"]):
      assert label == LABELS[TRAIN[index].split("/")[1]]
    seen.extend(batch["index"])
  assert len(set(seen[:4])) == 4 and len(set(seen[4:])) == 4

  test = pipeline.load_split(folder, "test")
  batches = list(pipeline.eval_batches(
      test, batch_size=4, preprocess=pipeline.Preprocess(8, spec.mean,
                                                         spec.std)))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(batches[0]["label"][:2], [0, 2])
  for i, rel in enumerate(TEST):  # Non-square f.png is stretched to 8x8.
    resized = np.asarray(Image.fromarray(expected_rgb(rel)).resize(
        (8, 8), Image.Resampling.BILINEAR))
    want = (resized / np.float32(255.0) - np.float32(spec.mean)) / np.float32(
        spec.std)
    np.testing.assert_allclose(batches[0]["image"][i], want, atol=1e-6)
