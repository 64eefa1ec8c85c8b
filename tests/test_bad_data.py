"""Bad data: errors that name the culprit, or skip-and-count (bad_examples="skip")."""
from __future__ import annotations

import logging
import os
import re

import numpy as np
from PIL import Image
import pytest

from fanas_jax.data import datasets
from fanas_jax.data import image_folder
from fanas_jax.data import pipeline

RGB4 = pipeline.Preprocess(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
GREY8 = pipeline.Preprocess(8, (0.5,), (0.25,))
# Eight 4x4 RGB images, a/0..3 (label 0) and b/0..3 (label 1): index = 4 * label + k.
FILES = [f"train/{c}/{k}.png" for c in "ab" for k in range(4)]


def write_images(root) -> str:
  rng = np.random.default_rng(0)
  for rel in FILES:
    os.makedirs(os.path.dirname(root / rel), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(
        root / rel)
  return f"folder:{root}"


def truncate(path) -> None:
  Image.fromarray(np.random.default_rng(1).integers(
      0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.fixture
def corrupt(tmp_path):
  """Index 2 is a truncated PNG, index 5 a text file named .png."""
  name = write_images(tmp_path)
  truncate(tmp_path / FILES[2])
  (tmp_path / FILES[5]).write_text("this is not an image")
  return name, str(tmp_path / FILES[2]), str(tmp_path / FILES[5])


def fake_dataset(monkeypatch, records: list[dict]) -> str:
  """A TFDS-like 8x8 grey 10-class dataset 'fake' reading `records`."""
  spec = datasets.DatasetSpec(
      name="fake", tfds_name="", num_classes=10, channels=1, native_size=8,
      mean=(0.5,), std=(0.25,), splits=("train",), prepare=lambda _: None,
      open_split=lambda split: records)
  real = pipeline.get_dataset
  monkeypatch.setattr(pipeline, "get_dataset",
                      lambda name: spec if name == "fake" else real(name))
  return "fake"


def grey_records(n: int) -> list[dict]:
  return [{"image": np.full((8, 8, 1), i, np.uint8), "label": i % 10,
           "index": 100 + i} for i in range(n)]


def read_all(ds) -> list:
  return [ds[i] for i in range(len(ds))]


# Errors that name the culprit.


@pytest.mark.parametrize("which,index", [(1, 2), (2, 5)])
def test_undecodable_image_names_the_file(corrupt, which, index):
  name, path = corrupt[0], corrupt[which]
  ds = pipeline.load_split(name, "train")
  with pytest.raises(pipeline.BadExampleError,
                     match=re.escape(f"split 'train' index {index}") + ".*"
                     + re.escape(f"cannot decode image file {path}")):
    ds[index]
  assert issubclass(pipeline.BadExampleError, ValueError)


def test_train_iterator_and_eval_raise_naming_the_file(corrupt):
  name, truncated, _ = corrupt
  ds = pipeline.load_split(name, "train")
  with pytest.raises(pipeline.BadExampleError, match=re.escape(truncated)):
    list(pipeline.eval_batches(ds, batch_size=4, preprocess=RGB4))
  it = pipeline.train_iterator(ds, batch_size=8, preprocess=RGB4, seed=0)
  with pytest.raises(pipeline.BadExampleError, match=re.escape(corrupt[1])
                     + "|" + re.escape(corrupt[2])):
    next(it)


def test_worker_process_error_still_names_the_file(tmp_path):
  name = write_images(tmp_path)
  (tmp_path / FILES[0]).write_text("not a png")
  ds = pipeline.load_split(name, "train")
  it = pipeline.train_iterator(ds, batch_size=8, preprocess=RGB4, seed=0,
                               num_workers=2)
  try:
    with pytest.raises(pipeline.BadExampleError, match=re.escape(
        f"cannot decode image file {tmp_path / FILES[0]}")):
      next(it)
  finally:
    it.close()


def test_wrong_channels_in_a_folder_names_split_index_and_file(
    tmp_path, monkeypatch):
  name = write_images(tmp_path)
  real = image_folder.decode_rgb
  two_channels = str(tmp_path / FILES[6])
  monkeypatch.setattr(image_folder, "decode_rgb", lambda path: (
      real(path)[..., :2] if path == two_channels else real(path)))
  ds = pipeline.load_split(name, "train")
  with pytest.raises(pipeline.BadExampleError, match=re.escape(
      f"split 'train' index 6 (file {two_channels}): image shape (4, 4, 2), "
      "expected HxWx3.")):
    read_all(ds)


@pytest.mark.parametrize("i,bad,message", [
    (3, {"image": np.zeros((8, 8, 3), np.uint8)},
     "index 3: image shape (8, 8, 3), expected 8x8x1."),
    (4, {"image": np.zeros((7, 8, 1), np.uint8)},
     "index 4: image shape (7, 8, 1), expected 8x8x1."),
    (5, {"image": np.zeros((8, 8), np.uint8)},
     "index 5: image shape (8, 8), expected 8x8x1."),
    (6, {"label": 10}, "index 6: label 10 outside 0..9."),
    (7, {"label": -1}, "index 7: label -1 outside 0..9."),
])
def test_wrong_shape_or_label_names_split_and_index(monkeypatch, i, bad,
                                                    message):
  records = grey_records(12)
  records[i] = {**records[i], **bad}
  ds = pipeline.load_split(fake_dataset(monkeypatch, records), "train")
  with pytest.raises(pipeline.BadExampleError,
                     match=re.escape(f"dataset 'fake' split 'train' {message}")):
    read_all(ds)
  it = pipeline.train_iterator(ds, batch_size=12, preprocess=GREY8,
                               seed=0)
  with pytest.raises(pipeline.BadExampleError, match=re.escape(message)):
    next(it)


def test_empty_split_folder_names_the_directory(tmp_path):
  name = write_images(tmp_path)
  os.makedirs(tmp_path / "val")
  with pytest.raises(ValueError, match=re.escape(
      f"Split directory {tmp_path / 'val'} has no class directories.")):
    pipeline.load_split(name, "val")


def test_empty_class_folder_names_the_directory(tmp_path):
  name = write_images(tmp_path)
  os.makedirs(tmp_path / "train" / "c")
  (tmp_path / "train" / "c" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match=re.escape(
      f"Class directory {tmp_path / 'train' / 'c'} has no images")):
    pipeline.load_split(name, "train")


def test_empty_split_of_a_source_rejected(monkeypatch):
  with pytest.raises(ValueError, match="Split 'train' of dataset 'fake'.*has "
                     "no examples"):
    pipeline.load_split(fake_dataset(monkeypatch, []), "train")


def test_unknown_policy_lists_choices(corrupt):
  with pytest.raises(ValueError, match="Unknown bad_examples 'ignore'; valid "
                     "choices: raise, skip."):
    pipeline.load_split(corrupt[0], "train", bad_examples="ignore")


# Skip mode.


def test_skip_masks_bad_eval_examples_warns_and_counts(corrupt, caplog):
  name, truncated, text = corrupt
  ds = pipeline.load_split(name, "train", bad_examples="skip")
  before = pipeline.bad_example_count()
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    batches = list(pipeline.eval_batches(ds, batch_size=3,
                                         preprocess=RGB4))
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 0, 1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(index, [0, 1, -1, 3, 4, -1, 6, 7, -1])
  assert pipeline.bad_example_count() == before + 2
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert truncated in warned and text in warned
  list(pipeline.eval_batches(ds, batch_size=3, preprocess=RGB4))
  assert pipeline.bad_example_count() == before + 2  # Distinct examples.


def stream_indices(ds, shard_count: int, steps: int) -> np.ndarray:
  its = [pipeline.train_iterator(ds, batch_size=12 // shard_count,
                                 preprocess=GREY8, seed=4, shard_index=p,
                                 shard_count=shard_count)
         for p in range(shard_count)]
  return np.stack([np.concatenate([next(it)["index"] for it in its])
                   for _ in range(steps)]).ravel()


def test_skip_replaces_bad_train_examples_by_the_next_good_one(monkeypatch):
  records = grey_records(30)
  bad = {3, 4, 17}
  for i in bad:
    records[i] = {**records[i], "label": 99}
  good_ds = pipeline.load_split(fake_dataset(monkeypatch, grey_records(30)),
                                "train")
  bad_ds = pipeline.load_split(fake_dataset(monkeypatch, records), "train",
                               bad_examples="skip")
  steps = 3 * pipeline.steps_per_epoch(30, 12)  # Three epochs of 24.
  order = stream_indices(good_ds, 1, steps + 10)  # The stream, all good.
  want = []
  for t in range(steps * 12):
    s = t
    while order[s] - 100 in bad:
      s += 1
    want.append(order[s])
  before = pipeline.bad_example_count()
  for shard_count in (1, 2):
    np.testing.assert_array_equal(stream_indices(bad_ds, shard_count, steps),
                                  want)
  assert pipeline.bad_example_count() == before + 3
  assert len(set(order[:24]) & {100 + i for i in bad}) > 0


def test_skip_with_nothing_good_left_raises(monkeypatch):
  records = [{**r, "label": 10} for r in grey_records(4)]
  ds = pipeline.load_split(fake_dataset(monkeypatch, records), "train",
                           bad_examples="skip")
  it = pipeline.train_iterator(ds, batch_size=2, preprocess=GREY8,
                               seed=0)
  try:
    with pytest.raises(pipeline.BadExampleError, match="all bad examples"):
      next(it)
  finally:
    it.close()
  with pytest.raises(pipeline.BadExampleError, match="All 4 examples are bad"):
    pipeline.eval_batches(ds, batch_size=2, preprocess=GREY8)
