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


def prep(size: int, **augment) -> pipeline.Preprocess:
  """Stretch to size x size, the digits' statistics, the given augmentation."""
  return pipeline.Preprocess(size, SPEC.mean, SPEC.std, **augment)


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
  it = pipeline.train_iterator(train, batch_size=64, preprocess=prep(size),
                               seed=0)
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
  it = pipeline.train_iterator(train, batch_size=256, seed=0,
                               preprocess=prep(8, flip=True))
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
  it = pipeline.train_iterator(train, batch_size=64, seed=0,
                               preprocess=prep(16, crop_padding=2))
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


def global_batches(ds, shard_count: int, steps: int, global_batch: int = 32,
                   **kw) -> list[dict]:
  """The first `steps` batches of every shard, concatenated in shard order."""
  its = [pipeline.train_iterator(ds, shard_index=p, shard_count=shard_count,
                                 batch_size=global_batch // shard_count, **kw)
         for p in range(shard_count)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
  return out


def test_global_batches_do_not_depend_on_shard_count(two_classes):
  kw = dict(preprocess=prep(8, flip=True, crop_padding=1), seed=3)
  steps = 2 * pipeline.steps_per_epoch(len(two_classes), 32)  # Two epochs.
  want = global_batches(two_classes, 1, steps, **kw)
  for shard_count in (2, 4):
    got = global_batches(two_classes, shard_count, steps, **kw)
    for w, g in zip(want, got):
      for key in ("image", "label", "index"):
        assert g[key].dtype == w[key].dtype
        np.testing.assert_array_equal(g[key], w[key])


def test_shards_of_a_batch_are_disjoint(two_classes):
  its = [pipeline.train_iterator(two_classes, batch_size=8, preprocess=prep(8),
                                 seed=0, shard_index=p, shard_count=4)
         for p in range(4)]
  for _ in range(18):
    parts = [set(next(it)["index"]) for it in its]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 32


@pytest.mark.parametrize("shard_count", [1, 2])
def test_epochs_are_fresh_permutations_dropping_the_remainder(train,
                                                              shard_count):
  steps = pipeline.steps_per_epoch(len(train), 100)
  assert steps == 14  # 1438 examples: 38 dropped per epoch.
  batches = global_batches(train, shard_count, 3 * steps, global_batch=100,
                           preprocess=prep(8), seed=1)
  epochs = [np.concatenate([b["index"] for b in batches[e * steps:
                                                         (e + 1) * steps]])
            for e in range(3)]
  for order in epochs:
    assert len(set(order)) == len(order) == 1400
    assert set(order) <= set(indices(train))
  assert set(epochs[0]) != set(epochs[1]) != set(epochs[2])


def test_each_shard_reads_only_its_own_examples(train):
  read = []
  spy = train.map(lambda record: read.append(record["index"]) or record)
  kw = dict(batch_size=16, preprocess=prep(8), seed=0, shard_count=2)
  own, other = (np.concatenate(batch_indices(
      pipeline.train_iterator(train, shard_index=p, **kw), 44))
      for p in (1, 0))  # 44 steps: one epoch of 1438 // 32.
  it = pipeline.train_iterator(spy, shard_index=1, **kw)
  batch_indices(it, 3)
  assert len(read) >= 48
  assert set(read) <= set(own)
  assert not set(read) & set(other)


def test_seed_determines_stream(train):
  kw = dict(batch_size=32, preprocess=prep(8, flip=True, crop_padding=1))
  a = next(pipeline.train_iterator(train, seed=5, **kw))
  b = next(pipeline.train_iterator(train, seed=5, **kw))
  c = next(pipeline.train_iterator(train, seed=6, **kw))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["index"], c["index"])


def test_iterator_state_restores_bitwise(train):
  kw = dict(batch_size=50, preprocess=prep(16, flip=True, crop_padding=2),
            seed=2, shard_index=1, shard_count=2)
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
  kw = dict(batch_size=16, preprocess=prep(8, flip=True), seed=0,
            shard_index=1, shard_count=2)
  local = pipeline.train_iterator(two_classes, **kw)
  remote = pipeline.train_iterator(two_classes, num_workers=2, **kw)
  try:
    for _ in range(12):  # 9 steps per epoch: crosses an epoch.
      want, got = next(local), next(remote)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  finally:
    remote.close()


def test_dataset_smaller_than_global_batch_rejected(two_classes):
  with pytest.raises(ValueError, match=r"288 examples are fewer than the "
                     r"global batch \(256 x 2 shards\)"):
    pipeline.train_iterator(two_classes, batch_size=256, preprocess=prep(8),
                            seed=0, shard_count=2)


# Evaluation batches.


def test_eval_pads_and_masks_exactly(data_dir):
  test = pipeline.load_split("sklearn_digits", "test", data_dir)
  batches = list(pipeline.eval_batches(test, batch_size=64,
                                       preprocess=prep(8)))
  assert len(batches) == pipeline.num_eval_batches(359, 64, 1) == 6
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 359
  np.testing.assert_array_equal(index[mask == 1], indices(test))
  assert np.all(index[mask == 0] == -1)
  assert np.all(batches[-1]["image"][mask[-64:] == 0] == 0)
  np.testing.assert_array_equal(
      batches[0]["image"][3],
      prep(8)(test[3]["image"]))


@pytest.mark.parametrize("n,shard_count", [(359, 3), (5, 8)])
def test_eval_shards_same_length_each_example_once(data_dir, n, shard_count):
  test = pipeline.load_split("sklearn_digits", "test", data_dir)[:n]
  seen, lengths = [], set()
  for shard in range(shard_count):
    batches = list(pipeline.eval_batches(
        test, batch_size=4, preprocess=prep(8), shard_index=shard,
        shard_count=shard_count))
    lengths.add(len(batches))
    for b in batches:
      seen.extend(b["index"][b["mask"] == 1])
  assert lengths == {pipeline.num_eval_batches(n, 4, shard_count)}
  assert sorted(seen) == sorted(indices(test))
