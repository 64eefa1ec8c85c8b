"""Grain input pipelines over `tfds.data_source` or an image folder.

Everything stays a random-access `grain.MapDataset` until batching, so
filtering, the bilevel split and sharding are index arithmetic, and a training
iterator's position is a checkpointable `get_state()` that resumes exactly.

Each example is checked when it is read (decodable, shape and channels as the
DatasetSpec says, label in range). A bad one raises `BadExampleError`, or,
under `load_split(..., bad_examples="skip")`, reads as None, grain's "missing
element": training replaces it by the next good example of the stream,
evaluation masks it, a warning names it, and `bad_example_count()` counts it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import threading
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from fanas_jax.data import image_folder
from fanas_jax.data import datasets
from fanas_jax.data.datasets import DatasetSpec, default_data_dir, get_dataset
from fanas_jax.data.transforms import Preprocess, eval_preprocess, train_preprocess

Record = dict[str, Any]

BAD_EXAMPLE_POLICIES = ("raise", "skip")

# Elements of the thread prefetch are whole batches: a few suffice to overlap
# host preprocessing with the device step.
_READ_THREADS = 4
PREFETCH_BATCHES = 8

_log = logging.getLogger(__name__)
_skipped_lock = threading.Lock()
_skipped: set[str] = set()


class BadExampleError(ValueError):
  """An example that cannot be used; the message names split, index and file."""


def bad_example_count() -> int:
  """Distinct bad examples skipped so far by reads in this process.

  Read threads count here; grain worker processes (num_workers > 0) log their
  skips but count in their own process.
  """
  with _skipped_lock:
    return len(_skipped)


def _note_skipped(error: BadExampleError) -> None:
  with _skipped_lock:
    _skipped.add(str(error))
  _log.warning("Skipping bad example: %s", error)


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=PREFETCH_BATCHES)


@dataclasses.dataclass(frozen=True)
class _CheckedReader:
  """Reads record i of a split as {'image', 'label', 'index'} and checks it.

  A plain picklable object, so grain worker processes can run it.
  """
  source: Any
  dataset: str
  split: str
  num_classes: int
  channels: int
  native_size: int
  skip: bool
  id_key: str = ""
  label_key: str = "label"

  def __call__(self, i: int) -> Record | None:
    try:
      return self._read(int(i))
    except BadExampleError as e:
      if not self.skip:
        raise
      _note_skipped(e)
      return None

  def _read(self, i: int) -> Record:
    culprit = f"dataset {self.dataset!r} split {self.split!r} index {i}"
    try:
      example = self.source[i]
    except image_folder.UnreadableImageError as e:
      raise BadExampleError(f"{culprit}: {e}") from e
    if "path" in example:
      culprit += f" (file {example['path']})"
    elif self.id_key and self.id_key in example:
      name = example[self.id_key]
      name = name.decode() if isinstance(name, bytes) else name
      culprit += f" ({self.id_key} {name})"
    image = np.asarray(example["image"])
    label = int(example[self.label_key])
    size = self.native_size
    if image.ndim != 3 or image.shape[-1] != self.channels or (
        size and image.shape[:2] != (size, size)):
      want = f"{size}x{size}" if size else "HxW"
      raise BadExampleError(f"{culprit}: image shape {image.shape}, expected "
                            f"{want}x{self.channels}.")
    if not 0 <= label < self.num_classes:
      raise BadExampleError(f"{culprit}: label {label} outside "
                            f"0..{self.num_classes - 1}.")
    return {"image": image.astype(np.uint8, copy=False), "label": label,
            "index": int(example.get("index", i))}


def _lookup(ds: grain.MapDataset, i: int | np.integer) -> Record | None:
  return ds[int(i)]


def _take(ds: grain.MapDataset, indices: np.ndarray) -> grain.MapDataset:
  """`ds` restricted to `indices`, still random access."""
  return grain.MapDataset.source(indices).map(functools.partial(_lookup, ds))


def _relabel(mapping: dict[int, int], record: Record) -> Record:
  return {**record, "label": mapping[record["label"]]}


def _open(spec: DatasetSpec, split: str, data_dir: str | None) -> Any:
  """The split's random-access source, after checking the split's name."""
  if spec.open_split is not None:
    return spec.open_split(split)
  datasets.check_split(spec, split, "split")
  data_dir = data_dir or default_data_dir()
  spec.prepare(data_dir)
  name = (f"{spec.tfds_name}:{spec.tfds_version}" if spec.tfds_version
          else spec.tfds_name)
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def load_split(dataset: str, split: str, data_dir: str | None = None,
               classes: Sequence[int] | None = None,
               relabel: bool = False,
               bad_examples: str = "raise") -> grain.MapDataset:
  """Random-access records {'image': uint8 HWC, 'label': int, 'index': int}.

  Args:
    dataset: registered dataset name, or "folder:ROOT" for an image folder.
    split: a split of the dataset, or several joined by '+' ('train+test').
    data_dir: TFDS data dir; defaults to `default_data_dir()`.
    classes: if given, keep only these labels (costs one pass over the
      split's records to read their labels, unless the source lists them).
    relabel: map `classes` to 0..len(classes)-1 in the given order, so a class
      subset trains with a smaller head.
    bad_examples: "raise": reading a bad example raises `BadExampleError`;
      "skip": it reads as None, which `train_iterator` and `eval_batches`
      replace or mask (see the module docstring).
  """
  if bad_examples not in BAD_EXAMPLE_POLICIES:
    raise ValueError(f"Unknown bad_examples {bad_examples!r}; valid choices: "
                     f"{', '.join(BAD_EXAMPLE_POLICIES)}.")
  spec = get_dataset(dataset)
  source = _open(spec, split, data_dir)
  ds = grain.MapDataset.range(len(source)).map(_CheckedReader(
      source, dataset, split, spec.num_classes, spec.channels,
      spec.native_size, bad_examples == "skip", spec.id_key, spec.label_key))
  if classes is not None:
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(
        0 <= c < spec.num_classes for c in classes):
      raise ValueError(
          f"classes must be distinct labels in 0..{spec.num_classes - 1} for "
          f"dataset {dataset!r}; got {classes}.")
    labels = getattr(source, "labels", None)
    if labels is None:
      labels = np.fromiter((source[i][spec.label_key] for i in range(len(source))),
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


def _train_example(preprocess: Preprocess, record: Record,
                   rng: np.random.Generator) -> Record:
  return {"image": preprocess(record["image"], rng),
          "label": np.int32(record["label"]),
          "index": np.int64(record["index"])}


@dataclasses.dataclass(frozen=True)
class _GlobalStream:
  """Record t of the endless training stream that all shards share.

  Epoch e holds the first `per_epoch` entries of permutation e of `ds`
  (`order[e * len(ds) + k]`: grain's shuffle reseeds with seed + e); the rest
  of that permutation is the dropped remainder. A bad record is replaced by the
  next good one of the stream, so every position yields an example.
  """
  ds: grain.MapDataset
  order: grain.MapDataset
  per_epoch: int

  def __call__(self, t: int) -> Record:
    n = len(self.ds)
    for s in range(t, t + n):
      epoch, k = divmod(s, self.per_epoch)
      record = self.ds[self.order[epoch * n + k]]
      if record is not None:
        return record
    raise BadExampleError(f"Training stream positions {t}..{t + n - 1} are "
                          "all bad examples; nothing left to train on.")


def _global_position(batch_size: int, global_batch: int, shard_index: int,
                     u: int) -> int:
  """Stream position of this shard's u-th example: its slice of each batch."""
  step, b = divmod(u, batch_size)
  return step * global_batch + shard_index * batch_size + b


def train_iterator(ds: grain.MapDataset, *, batch_size: int,
                   preprocess: Preprocess, seed: int,
                   shard_index: int = 0, shard_count: int = 1,
                   num_workers: int = 0) -> grain.DatasetIterator:
  """Endless augmented batches: this shard's part of the global batches.

  Yields {'image': float32 [B,S,S,C], 'label': int32 [B], 'index': int64 [B]}
  with B = `batch_size` per shard. The global batches (batch_size *
  shard_count examples) depend only on the dataset, `seed` and the global
  batch size, not on the number of shards: shard p's batch j is rows
  [p*B, (p+1)*B) of global batch j, and each process reads and decodes only
  those. An epoch is `steps_per_epoch(len(ds), global batch)` global batches
  of distinct examples from a fresh permutation (seeded by seed and epoch),
  dropping the remainder; a skipped bad example's place goes to the next good
  example of the stream. `preprocess` (transforms.Preprocess) turns each image
  into the network's input; its augmentation draws from an RNG keyed by the
  example's position in the global stream. `get_state()` /
  `set_state()` checkpoint and restore the stream exactly. With
  `num_workers > 0`, batches are built in that many grain worker processes.
  """
  global_batch = batch_size * shard_count
  if len(ds) < global_batch:
    raise ValueError(f"{len(ds)} examples are fewer than the global batch "
                     f"({batch_size} x {shard_count} shards).")
  # Grain reseeds epoch e's shuffle with shuffle_seed + e; hashing `seed`
  # keeps seed s's epoch 1 from being seed s + 1's epoch 0.
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  order = grain.MapDataset.range(len(ds)).shuffle(seed=int(shuffle_seed))
  stream = (
      grain.MapDataset.range(sys.maxsize)
      .map(_GlobalStream(ds, order, global_batch * (len(ds) // global_batch)))
      .random_map(functools.partial(_train_example, preprocess),
                  seed=int(augment_seed)))
  batches = (
      grain.MapDataset.range(sys.maxsize)
      .map(functools.partial(_global_position, batch_size, global_batch,
                             shard_index))
      .map(functools.partial(_lookup, stream))
      .batch(batch_size, drop_remainder=True)
      .to_iter_dataset(_read_options()))
  if num_workers > 0:
    # Grain's worker processes read absl flags; outside absl.app (notebooks,
    # pytest) nothing parsed them, so use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(batches)


def _eval_example(shard: grain.MapDataset, preprocess: Preprocess,
                  channels: int, i: int) -> Record:
  """The i-th example of the shard, or a masked all-zero one (padding, bad)."""
  record = shard[i] if i < len(shard) else None
  if record is None:
    size = preprocess.image_size
    return {"image": np.zeros((size, size, channels), np.float32),
            "label": np.int32(0), "index": np.int64(-1),
            "mask": np.float32(0.0)}
  return {"image": preprocess(record["image"]),
          "label": np.int32(record["label"]),
          "index": np.int64(record["index"]), "mask": np.float32(1.0)}


def _channels(ds: grain.MapDataset) -> int:
  """Channels of the first good example, for the padding's shape."""
  for i in range(len(ds)):
    record = ds[i]
    if record is not None:
      return record["image"].shape[-1]
  raise BadExampleError(f"All {len(ds)} examples are bad; nothing to "
                        "evaluate.")


def eval_batches(ds: grain.MapDataset, *, batch_size: int,
                 preprocess: Preprocess, shard_index: int = 0,
                 shard_count: int = 1) -> Iterator[Record]:
  """This shard's examples once, in order, padded to whole batches.

  Yields `num_eval_batches(len(ds), batch_size, shard_count)` batches of
  {'image', 'label', 'index', 'mask'}; 'mask' is 1.0 for real examples and 0.0
  for padding and skipped bad examples, so masked sums count every good
  example exactly once across shards while all shards run the same number of
  steps. `preprocess` must be deterministic (an eval_preprocess).
  """
  if preprocess.is_random:
    raise ValueError("eval_batches needs a deterministic preprocess (no "
                     "random crop, flip or colour jitter).")
  shard = ds[shard_index::shard_count]
  total = num_eval_batches(len(ds), batch_size, shard_count) * batch_size
  padded = grain.MapDataset.range(total).map(functools.partial(
      _eval_example, shard, preprocess, _channels(ds)))
  return iter(padded.batch(batch_size).to_iter_dataset(_read_options()))
