"""Tests for the embedded digits dataset, the dataset registry and the pipeline."""
from __future__ import annotations

import multiprocessing

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits

from fanas_jax.data import datasets
from fanas_jax.data import pipeline
from fanas_jax.data import sklearn_digits

SPEC = datasets.get_dataset("sklearn_digits")
NORM = {"mean": SPEC.mean, "std": SPEC.std}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  sklearn_digits.ensure_built(path)
  return path


@pytest.fixture(scope="module")
def digits():
  """sklearn's arrays, scaled independently of the builder's code."""
  raw = load_digits()
  images = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  return images, raw.target


@pytest.fixture(scope="module")
def train(data_dir):
  return pipeline.load_split("sklearn_digits", "train", data_dir)


@pytest.fixture(scope="module")
def two_classes(data_dir):
  """Classes 0 and 1 of train: 288 examples, divisible by 16 and 32."""
  return pipeline.load_split("sklearn_digits", "train", data_dir,
                             classes=[0, 1])


def indices(ds) -> np.ndarray:
  return np.array([ds[i]["index"] for i in range(len(ds))])


def batch_indices(it, n: int) -> list[np.ndarray]:
  return [next(it)["index"] for _ in range(n)]


# sklearn_digits builder.


def test_split_sizes_are_stratified_and_disjoint(data_dir, digits):
  _, target = digits
  train = indices(pipeline.load_split("sklearn_digits", "train", data_dir))
  test = indices(pipeline.load_split("sklearn_digits", "test", data_dir))
  both = indices(pipeline.load_split("sklearn_digits", "train+test", data_dir))
  assert (len(train), len(test), len(both)) == (1438, 359, 1797)
  assert not set(train) & set(test)
  assert sorted(both) == list(range(1797))
  for c in range(10):
    per_class = np.sum(target == c)
    assert np.sum(target[test] == c) == round(0.2 * per_class)


def test_builds_are_deterministic(data_dir, tmp_path):
  sklearn_digits.ensure_built(str(tmp_path))
  for split in ("train", "test"):
    a = pipeline.load_split("sklearn_digits", split, data_dir)
    b = pipeline.load_split("sklearn_digits", split, str(tmp_path))
    np.testing.assert_array_equal(indices(a), indices(b))


def test_pixels_and_labels_match_sklearn(data_dir, digits):
  images, target = digits
  ds = pipeline.load_split("sklearn_digits", "train+test", data_dir)
  for i in range(len(ds)):
    record = ds[i]
    assert record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"], images[record["index"]])
    assert record["label"] == target[record["index"]]
  np.testing.assert_array_equal(
      sklearn_digits.scale_pixels(np.arange(17)),
      [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223, 239,
       255])


def test_concurrent_ensure_built_leaves_readable_dataset(tmp_path):
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=sklearn_digits.ensure_built,
                       args=(str(tmp_path),)) for _ in range(2)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(timeout=120)
  assert [p.exitcode for p in procs] == [0, 0]
  assert not list(tmp_path.glob("sklearn_digits/incomplete*"))
  ds = pipeline.load_split("sklearn_digits", "train+test", str(tmp_path))
  assert sorted(indices(ds)) == list(range(1797))


# Dataset registry.


def test_mean_std_match_train_split(train):
  pixels = np.stack([train[i]["image"] for i in range(len(train))])
  pixels = pixels.astype(np.float64) / 255.0
  assert pixels.shape[1:] == (SPEC.native_size, SPEC.native_size,
                              SPEC.channels)
  np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), SPEC.mean, atol=1e-3)
  np.testing.assert_allclose(pixels.std(axis=(0, 1, 2)), SPEC.std, atol=1e-3)


def test_unknown_dataset_lists_choices():
  with pytest.raises(ValueError, match=r"dataset\.name.*sklearn_digits"):
    datasets.get_dataset("imagenet_typo")


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/somewhere/tfds")
  assert datasets.default_data_dir() == "/somewhere/tfds"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert datasets.default_data_dir().endswith("tensorflow_datasets")


# load_split.


@pytest.mark.parametrize("split", ["validation", "train+", "train+val"])
def test_unknown_split_lists_valid_splits(data_dir, split):
  with pytest.raises(ValueError, match=r"valid splits: train, test"):
    pipeline.load_split("sklearn_digits", split, data_dir)


@pytest.mark.parametrize("classes", [[3, 3], [10], [-1]])
def test_bad_classes_rejected(data_dir, classes):
  with pytest.raises(ValueError, match="distinct labels in 0..9"):
    pipeline.load_split("sklearn_digits", "test", data_dir, classes=classes)


def test_class_filter_and_relabel(data_dir, digits, train):
  _, target = digits
  kept = pipeline.load_split("sklearn_digits", "train", data_dir,
                             classes=[7, 3])
  relabelled = pipeline.load_split("sklearn_digits", "train", data_dir,
                                   classes=[7, 3], relabel=True)
  expected = [i for i in indices(train) if target[i] in (3, 7)]
  np.testing.assert_array_equal(indices(kept), expected)
  np.testing.assert_array_equal(indices(relabelled), expected)
  for i in range(len(kept)):
    original = kept[i]["label"]
    assert original == target[kept[i]["index"]]
    assert relabelled[i]["label"] == {7: 0, 3: 1}[original]


def test_split_halves_disjoint_covering_deterministic(train):
  weights, arch = pipeline.split_halves(train, seed=3)
  a, b = indices(weights), indices(arch)
  assert (len(a), len(b)) == (719, 719)
  assert not set(a) & set(b)
  assert sorted(np.concatenate([a, b])) == sorted(indices(train))
  np.testing.assert_array_equal(
      indices(pipeline.split_halves(train, seed=3)[0]), a)
  assert set(indices(pipeline.split_halves(train, seed=4)[0])) != set(a)


# Preprocessing and training batches.


def test_steps_and_eval_batch_counts():
  assert pipeline.steps_per_epoch(1438, 64) == 22
  assert pipeline.steps_per_epoch(10, 64) == 1
  assert pipeline.num_eval_batches(1438, 64, 1) == 23
  assert pipeline.num_eval_batches(1438, 64, 3) == 8  # Largest shard: 480.
  assert pipeline.num_eval_batches(5, 4, 8) == 1


def unnormalise(images: np.ndarray) -> np.ndarray:
  return np.round((images * np.float32(SPEC.std) + np.float32(SPEC.mean))
                  * 255.0)


@pytest.mark.parametrize("size", [32, 12])
def test_train_batches_are_normalised_resized_images(train, digits, size):
  images, target = digits
  it = pipeline.train_iterator(train, batch_size=64, image_size=size, seed=0,
                               **NORM)
  batch = next(it)
  assert batch["image"].dtype == np.float32
  assert batch["image"].shape == (64, size, size, 1)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (64,)
  np.testing.assert_array_equal(batch["label"], target[batch["index"]])
  for image, index in zip(batch["image"], batch["index"]):
    original = images[index][..., 0]
    if size % 8 == 0:
      ref = np.kron(original, np.ones((size // 8, size // 8), np.uint8))
    else:
      ref = np.asarray(Image.fromarray(original).resize(
          (size, size), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(unnormalise(image[..., 0]), ref)


def test_flip_flips_some_examples_only(train, digits):
  images, _ = digits
  it = pipeline.train_iterator(train, batch_size=256, image_size=8, seed=0,
                               flip=True, **NORM)
  batch = next(it)
  flipped = kept = 0
  for image, index in zip(unnormalise(batch["image"]), batch["index"]):
    ref = images[index]
    if np.array_equal(ref, ref[:, ::-1]):
      continue
    kept += np.array_equal(image, ref)
    flipped += np.array_equal(image, ref[:, ::-1])
  assert kept + flipped == 256 - sum(
      np.array_equal(images[i], images[i][:, ::-1]) for i in batch["index"])
  assert kept > 50 and flipped > 50


def test_crop_is_a_shifted_window_of_zero_padded_image(train, digits):
  images, _ = digits
  it = pipeline.train_iterator(train, batch_size=64, image_size=16, seed=0,
                               crop_padding=2, **NORM)
  batch = next(it)
  offsets = set()
  for image, index in zip(unnormalise(batch["image"]), batch["index"]):
    resized = np.kron(images[index], np.ones((2, 2, 1), np.uint8))
    padded = np.pad(resized, ((2, 2), (2, 2), (0, 0)))
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(image, padded[dy:dy + 16, dx:dx + 16])]
    assert matches
    offsets.update(matches)
  assert len(offsets) > 5


def test_epochs_are_distinct_permutations(two_classes):
  it = pipeline.train_iterator(two_classes, batch_size=32, image_size=8,
                               seed=1, **NORM)
  steps = pipeline.steps_per_epoch(len(two_classes), 32)
  assert steps == 9
  epochs = [np.concatenate(batch_indices(it, steps)) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == sorted(indices(two_classes))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_seed_determines_stream(train):
  kw = dict(batch_size=32, image_size=8, flip=True, crop_padding=1, **NORM)
  a = next(pipeline.train_iterator(train, seed=5, **kw))
  b = next(pipeline.train_iterator(train, seed=5, **kw))
  c = next(pipeline.train_iterator(train, seed=6, **kw))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["index"], c["index"])


def test_train_shards_disjoint_and_covering(two_classes):
  seen = []
  for shard in range(2):
    it = pipeline.train_iterator(two_classes, batch_size=16, image_size=8,
                                 seed=0, shard_index=shard, shard_count=2,
                                 **NORM)
    seen.append(np.concatenate(batch_indices(it, 9)))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == sorted(indices(two_classes))


def test_iterator_state_restores_bitwise(train):
  kw = dict(batch_size=100, image_size=16, seed=2, flip=True, crop_padding=2,
            **NORM)
  it = pipeline.train_iterator(train, **kw)
  for _ in range(12):  # 14 steps per epoch: the replay crosses an epoch.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  restored = pipeline.train_iterator(train, **kw)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      assert got[key].dtype == want[key].dtype
      np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_match_in_process(two_classes):
  kw = dict(batch_size=32, image_size=8, seed=0, flip=True, **NORM)
  local = pipeline.train_iterator(two_classes, **kw)
  remote = pipeline.train_iterator(two_classes, num_workers=2, **kw)
  try:
    for _ in range(4):
      want, got = next(local), next(remote)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["index"], want["index"])
  finally:
    remote.close()


def test_train_shard_smaller_than_batch_rejected(two_classes):
  with pytest.raises(ValueError, match="fewer than batch_size"):
    pipeline.train_iterator(two_classes, batch_size=512, image_size=8, seed=0,
                            **NORM)


# Evaluation batches.


def test_eval_pads_and_masks_exactly(data_dir):
  test = pipeline.load_split("sklearn_digits", "test", data_dir)
  batches = list(pipeline.eval_batches(test, batch_size=64, image_size=8,
                                       **NORM))
  assert len(batches) == pipeline.num_eval_batches(359, 64, 1) == 6
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 359
  np.testing.assert_array_equal(index[mask == 1], indices(test))
  assert np.all(index[mask == 0] == -1)
  assert np.all(batches[-1]["image"][mask[-64:] == 0] == 0)
  np.testing.assert_array_equal(
      batches[0]["image"][3],
      pipeline.preprocess(test[3]["image"], 8, SPEC.mean, SPEC.std))


@pytest.mark.parametrize("n,shard_count", [(359, 3), (5, 8)])
def test_eval_shards_same_length_each_example_once(data_dir, n, shard_count):
  test = pipeline.load_split("sklearn_digits", "test", data_dir)[:n]
  seen, lengths = [], set()
  for shard in range(shard_count):
    batches = list(pipeline.eval_batches(
        test, batch_size=4, image_size=8, shard_index=shard,
        shard_count=shard_count, **NORM))
    lengths.add(len(batches))
    for b in batches:
      seen.extend(b["index"][b["mask"] == 1])
  assert lengths == {pipeline.num_eval_batches(n, 4, shard_count)}
  assert sorted(seen) == sorted(indices(test))
