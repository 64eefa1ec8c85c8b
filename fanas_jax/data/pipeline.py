"""Grain input pipelines over `tfds.data_source`, deterministic per seed.

Everything stays a random-access `grain.MapDataset` until batching, so
filtering, the bilevel split and sharding are index arithmetic, and a training
iterator's position is a checkpointable `get_state()` that resumes exactly.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fanas_jax.data.datasets import default_data_dir, get_dataset

Record = dict[str, Any]

# Elements of the thread prefetch are whole batches: a few suffice to overlap
# host preprocessing with the device step.
_READ_THREADS = 4
_PREFETCH_BATCHES = 8


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=_PREFETCH_BATCHES)


def _to_record(position: int, example: Record) -> Record:
  """Keeps image/label/index; 'index' falls back to the position in the split."""
  return {"image": np.asarray(example["image"], dtype=np.uint8),
          "label": int(example["label"]),
          "index": int(example.get("index", position))}


def _lookup(ds: grain.MapDataset, i: np.integer) -> Record:
  return ds[int(i)]


def _take(ds: grain.MapDataset, indices: np.ndarray) -> grain.MapDataset:
  """`ds` restricted to `indices`, still random access."""
  return grain.MapDataset.source(indices).map(functools.partial(_lookup, ds))


def _relabel(mapping: dict[int, int], record: Record) -> Record:
  return {**record, "label": mapping[record["label"]]}


def load_split(dataset: str, split: str, data_dir: str | None = None,
               classes: Sequence[int] | None = None,
               relabel: bool = False) -> grain.MapDataset:
  """Random-access records {'image': uint8 HWC, 'label': int, 'index': int}.

  Args:
    dataset: registered dataset name.
    split: a split of the dataset, or several joined by '+' ('train+test').
    data_dir: TFDS data dir; defaults to `default_data_dir()`.
    classes: if given, keep only these labels (costs one pass over the
      split's records to read their labels).
    relabel: map `classes` to 0..len(classes)-1 in the given order, so a class
      subset trains with a smaller head.
  """
  spec = get_dataset(dataset)
  parts = split.split("+")
  if not all(parts) or any(p not in spec.splits for p in parts):
    raise ValueError(
        f"Unknown split {split!r} for dataset {dataset!r}; valid splits: "
        f"{', '.join(spec.splits)} (or several joined by '+').")
  data_dir = data_dir or default_data_dir()
  spec.prepare(data_dir)
  source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir,
                            download=False)
  ds = grain.MapDataset.source(source).map_with_index(_to_record)
  if classes is not None:
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(
        0 <= c < spec.num_classes for c in classes):
      raise ValueError(
          f"classes must be distinct labels in 0..{spec.num_classes - 1} for "
          f"dataset {dataset!r}; got {classes}.")
    labels = np.fromiter((source[i]["label"] for i in range(len(source))),
                         dtype=np.int64, count=len(source))
    ds = _take(ds, np.flatnonzero(np.isin(labels, classes)))
    if relabel:
      ds = ds.map(functools.partial(
          _relabel, {c: new for new, c in enumerate(classes)}))
  if len(ds) == 0:
    raise ValueError(f"Split {split!r} of dataset {dataset!r} with classes="
                     f"{classes} has no examples.")
  return ds


def split_halves(ds: grain.MapDataset,
                 seed: int) -> tuple[grain.MapDataset, grain.MapDataset]:
  """Disjoint random halves: (weight half, architecture half) for bilevel search.

  The first half gets floor(n/2) examples. Each half keeps the source order,
  so reads stay as local as the source allows.
  """
  perm = np.random.default_rng(seed).permutation(len(ds))
  half = len(ds) // 2
  return _take(ds, np.sort(perm[:half])), _take(ds, np.sort(perm[half:]))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (train batches drop the remainder), at least 1."""
  return max(1, num_examples // batch_size)


def num_eval_batches(n: int, batch_size: int, shard_count: int) -> int:
  """Batches every shard runs so the largest of `n` examples' shards fits."""
  return math.ceil(math.ceil(n / shard_count) / batch_size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 HWC to size x size.

  Integer upscaling replicates pixels (nearest), which is exact; any other
  size uses PIL bilinear (antialiased when shrinking), one channel at a time.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  if size % h == 0 and size % w == 0:
    return np.repeat(np.repeat(image, size // h, axis=0), size // w, axis=1)
  return np.stack([
      np.asarray(Image.fromarray(image[..., c]).resize(
          (size, size), Image.Resampling.BILINEAR))
      for c in range(image.shape[-1])
  ], axis=-1)


def preprocess(image_uint8: np.ndarray, image_size: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
  """uint8 HWC -> float32 size x size, normalised; one rule for train and eval."""
  image = _resize(image_uint8, image_size).astype(np.float32) / 255.0
  return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _augment(image: np.ndarray, rng: np.random.Generator, flip: bool,
             crop_padding: int) -> np.ndarray:
  """Random horizontal flip and zero-padded random crop of a uint8 HWC image."""
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  if crop_padding > 0:
    h, w = image.shape[:2]
    p = crop_padding
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    top, left = rng.integers(0, 2 * p + 1, size=2)
    image = padded[top:top + h, left:left + w]
  return image


def _train_example(image_size: int, mean: Sequence[float], std: Sequence[float],
                   flip: bool, crop_padding: int, record: Record,
                   rng: np.random.Generator) -> Record:
  image = _augment(_resize(record["image"], image_size), rng, flip,
                   crop_padding)
  return {"image": preprocess(image, image_size, mean, std),
          "label": np.int32(record["label"]),
          "index": np.int64(record["index"])}


def train_iterator(ds: grain.MapDataset, *, batch_size: int, image_size: int,
                   mean: Sequence[float], std: Sequence[float], seed: int,
                   flip: bool = False, crop_padding: int = 0,
                   shard_index: int = 0, shard_count: int = 1,
                   num_workers: int = 0) -> grain.DatasetIterator:
  """Endless augmented batches of this shard, reshuffled every epoch.

  Yields {'image': float32 [B,S,S,C], 'label': int32 [B], 'index': int64 [B]}.
  An epoch is `steps_per_epoch(len(ds[shard_index::shard_count]), batch_size)`
  batches of distinct examples. Augmentation (after resizing) draws from an
  RNG seeded by (seed, epoch, position), so the stream depends only on `seed`;
  `get_state()`/`set_state()` checkpoint and restore it exactly. With
  `num_workers > 0`, batches are built in that many grain worker processes.
  """
  shard = ds[shard_index::shard_count]
  if len(shard) < batch_size:
    raise ValueError(f"Shard {shard_index}/{shard_count} has {len(shard)} "
                     f"examples, fewer than batch_size={batch_size}.")
  batches = (
      shard.seed(seed)
      .shuffle()
      .random_map(functools.partial(_train_example, image_size, tuple(mean),
                                    tuple(std), flip, crop_padding))
      .batch(batch_size, drop_remainder=True)
      .repeat()
      .to_iter_dataset(_read_options()))
  if num_workers > 0:
    # Grain's worker processes read absl flags; outside absl.app (notebooks,
    # pytest) nothing parsed them, so use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(batches)


def _eval_example(shard: grain.MapDataset, image_size: int,
                  mean: Sequence[float], std: Sequence[float], channels: int,
                  i: int) -> Record:
  """The i-th example of the shard, or a masked all-zero one past its end."""
  if i >= len(shard):
    return {"image": np.zeros((image_size, image_size, channels), np.float32),
            "label": np.int32(0), "index": np.int64(-1),
            "mask": np.float32(0.0)}
  record = shard[i]
  return {"image": preprocess(record["image"], image_size, mean, std),
          "label": np.int32(record["label"]),
          "index": np.int64(record["index"]), "mask": np.float32(1.0)}


def eval_batches(ds: grain.MapDataset, *, batch_size: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float],
                 shard_index: int = 0,
                 shard_count: int = 1) -> Iterator[Record]:
  """This shard's examples once, in order, padded to whole batches.

  Yields `num_eval_batches(len(ds), batch_size, shard_count)` batches of
  {'image', 'label', 'index', 'mask'}; 'mask' is 1.0 for real examples and 0.0
  for padding, so masked sums count every example exactly once across shards
  while all shards run the same number of steps.
  """
  shard = ds[shard_index::shard_count]
  total = num_eval_batches(len(ds), batch_size, shard_count) * batch_size
  channels = ds[0]["image"].shape[-1]
  padded = grain.MapDataset.range(total).map(functools.partial(
      _eval_example, shard, image_size, tuple(mean), tuple(std), channels))
  return iter(padded.batch(batch_size).to_iter_dataset(_read_options()))
