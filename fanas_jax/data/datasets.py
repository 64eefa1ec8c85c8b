"""Dataset registry: what the pipeline must know about each dataset by name.

Besides the registered names, "folder:/path/to/ROOT" names a user image folder
(see image_folder.py). Every stage reads `stage_dataset(config, stage)`, so the
search's phase 1, its phase 2 and training can read different datasets.

The paper's datasets (cifar10, cifar100, imagenet2012, imagenet100_32,
caltech_birds2011, cars196, fgvc_aircraft, stanford_online_products) are read
with `tfds.data_source` from a TFDS data dir that holds them in ArrayRecord
format, prepared once from the official archives by
`python -m fanas_jax.data.prepare NAME --manual_dir=DIR` (or by TFDS itself);
reading never downloads anything.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Any, Callable, Sequence

from fanas_jax.data import image_folder
from fanas_jax.data import sklearn_digits
from fanas_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset, so configs only name it.

  Attributes:
    name: registry name, used in configs.
    tfds_name: name passed to `tfds.data_source` ('' for image folders).
    num_classes: number of labels.
    channels: image channels.
    native_size: stored image height (= width); 0 if sizes vary. How an image
      becomes config.image_size square is the stage's preprocessing
      (pipeline.Preprocess).
    mean: per-channel mean of the train split, in [0, 1] pixel units.
    std: per-channel standard deviation of the train split, same units.
    splits: splits that exist on disk; '+' joins them in `load_split`.
    prepare: called with a TFDS data dir before reading; makes the dataset
      readable there without network (sklearn_digits builds itself).
    class_names: label -> name, where the dataset names its classes.
    open_split: split -> random-access source of records {'image', 'label',
      optional 'index' and 'path'}, checking the split name itself; None
      reads `tfds.data_source(tfds_name)`. A source with a `labels` array
      lets class filters skip reading the records.
    tfds_version: the TFDS version read ('' = the newest on disk).
    id_key: a feature naming the example (file name, id) for error messages;
      '' if none.
    label_key: the feature read as the label.
  """
  name: str
  tfds_name: str
  num_classes: int
  channels: int
  native_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  splits: tuple[str, ...]
  prepare: Callable[[str], None]
  class_names: tuple[str, ...] = ()
  open_split: Callable[[str], Any] | None = None
  tfds_version: str = ""
  id_key: str = ""
  label_key: str = "label"


DATASETS: Registry[DatasetSpec] = Registry("dataset")

DATASETS.add("sklearn_digits", DatasetSpec(
    name="sklearn_digits",
    tfds_name=sklearn_digits.NAME,
    num_classes=10,
    channels=1,
    native_size=8,
    mean=(0.305033,),
    std=(0.375933,),
    splits=("train", "test"),
    prepare=sklearn_digits.ensure_built,
))


IMAGENET_MEAN = image_folder.IMAGENET_MEAN
IMAGENET_STD = image_folder.IMAGENET_STD


class DatasetNotPreparedError(ValueError):
  """A dataset that must be prepared in the data dir before it can be read."""


@dataclasses.dataclass(frozen=True)
class _RequirePrepared:
  """`prepare` of a dataset that must already be in the data dir (ArrayRecord).

  Preparing it from the official archives is a separate command, so a missing
  copy fails with one line naming the dataset, the directory looked in and the
  command that prepares it.
  """
  tfds_name: str
  version: str

  def __call__(self, data_dir: str) -> None:
    where = os.path.join(data_dir, self.tfds_name, self.version)
    command = (f"python -m fanas_jax.data.prepare {self.tfds_name} "
               f"--manual_dir=DIR_OF_ARCHIVES --data_dir={data_dir}")
    if not os.path.exists(os.path.join(where, "dataset_info.json")):
      raise DatasetNotPreparedError(
          f"Dataset {self.tfds_name!r} {self.version} is not prepared in "
          f"{where}: it must be prepared first with `{command}` (or by TFDS "
          "with file_format='array_record'; set data_dir or $TFDS_DATA_DIR to "
          "its data dir).")
    if not glob.glob(os.path.join(where, "*.array_record*")):
      raise DatasetNotPreparedError(
          f"Dataset {self.tfds_name!r} {self.version} in {where} has no "
          "ArrayRecord files: it must be prepared first with "
          f"`{command}` (random access needs ArrayRecord).")


def _tfds_spec(name: str, version: str, **facts: Any) -> DatasetSpec:
  return DatasetSpec(name=name, tfds_name=name, tfds_version=version,
                     prepare=_RequirePrepared(name, version), **facts)


DATASETS.add("cifar10", _tfds_spec(
    "cifar10", "3.0.2", num_classes=10, channels=3, native_size=32,
    mean=(0.49139968, 0.48215827, 0.44653124),
    std=(0.24703233, 0.24348505, 0.26158768),
    splits=("train", "test"), id_key="id",
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                 "horse", "ship", "truck")))

# Statistics of CIFAR-100's 50,000 train images (the values in common use).
DATASETS.add("cifar100", _tfds_spec(
    "cifar100", "3.0.2", num_classes=100, channels=3, native_size=32,
    mean=(0.50707516, 0.48654887, 0.44091784),
    std=(0.26733429, 0.25643846, 0.27615047),
    splits=("train", "test"), id_key="id"))

# The fine-grained and retrieval datasets are natural photos of varying size:
# they use ImageNet's statistics, as the networks fine-tuned on them do.
DATASETS.add("caltech_birds2011", _tfds_spec(
    "caltech_birds2011", "0.2.0", num_classes=200, channels=3, native_size=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "test"),
    id_key="image/filename"))

DATASETS.add("cars196", _tfds_spec(
    "cars196", "2.1.0", num_classes=196, channels=3, native_size=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "test"), id_key="id"))

DATASETS.add("fgvc_aircraft", _tfds_spec(
    "fgvc_aircraft", "1.0.0", num_classes=100, channels=3, native_size=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("trainval", "test"),
    id_key="id"))

# Labelled by product ('class_id'), as retrieval uses it.
DATASETS.add("stanford_online_products", _tfds_spec(
    "stanford_online_products", "1.0.0", num_classes=22634, channels=3,
    native_size=0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    splits=("train", "test"), label_key="class_id"))

DATASETS.add("imagenet2012", _tfds_spec(
    "imagenet2012", "5.1.0", num_classes=1000, channels=3, native_size=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
    splits=("train", "validation"), id_key="file_name"))

# The search's phase 1 data: the 100 ImageNet classes of the ImageNet-100
# subset of Tian et al., "Contrastive Multiview Coding" (CMC, 2019; the class
# list is the CMC repository's imagenet100.txt), stored at 32x32x3 like TFDS's
# imagenet_resized/32x32 (box-downsampled whole images), labels 0..99 in the
# sorted order of their WordNet ids; features 'image' (uint8 32x32x3) and
# 'label'. Splits: train (ImageNet train images of those classes) and
# validation (their 5,000 validation images).
DATASETS.add("imagenet100_32", _tfds_spec(
    "imagenet100_32", "1.0.0", num_classes=100, channels=3, native_size=32,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "validation")))


def default_data_dir() -> str:
  """$TFDS_DATA_DIR if set, else TFDS's own default, so both tools agree."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def _nothing_to_prepare(data_dir: str) -> None:
  del data_dir  # An image folder is read where it is.


def _folder_spec(name: str) -> DatasetSpec:
  """An image folder: RGB, ImageNet statistics, labels from directory names."""
  layout = image_folder.scan(name[len(image_folder.PREFIX):])
  return DatasetSpec(
      name=name, tfds_name="", num_classes=len(layout.classes), channels=3,
      native_size=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=layout.splits,
      prepare=_nothing_to_prepare, class_names=layout.classes,
      open_split=functools.partial(image_folder.open_split, layout.root))


def get_dataset(name: str, key: str = "dataset.name") -> DatasetSpec:
  """Looks up a dataset ("folder:ROOT" or a registered name).

  The error for an unknown name names config key `key`.
  """
  if name.startswith(image_folder.PREFIX):
    return _folder_spec(name)
  return DATASETS.get(name, key=key)


def stage_dataset(config: Any, stage: str) -> str:
  """The dataset `stage` reads: its own `dataset` key, or '' = config.dataset."""
  return config[stage].get("dataset", "") or config.dataset


def check_split(spec: DatasetSpec, split: str, key: str) -> None:
  """A split name (parts joined by '+') that the dataset has, else one line."""
  parts = split.split("+")
  if not all(parts) or any(p not in spec.splits for p in parts):
    raise ValueError(
        f"{key}={split!r} is not a split of dataset {spec.name!r}; valid "
        f"splits: {', '.join(spec.splits)} (or several joined by '+').")


def check_stage_data(config: Any, stage: str, splits: Sequence[str]) -> DatasetSpec:
  """The dataset `stage` reads exists and has the `splits` it names, so a bad one
  fails before any compute; returns its spec (`prepare_stage_data` checks its files)."""
  name = stage_dataset(config, stage)
  key = f"{stage}.dataset" if config[stage].get("dataset", "") else "dataset"
  spec = get_dataset(name, key=key)
  for split in splits:
    check_split(spec, split, f"{stage}.split")
  return spec


def prepare_stage_data(config: Any, stage: str) -> None:
  """Makes the dataset of a stage that reads one readable (the embedded digits build
  themselves), or fails in one line naming where it looked."""
  if "dataset" in config[stage]:
    get_dataset(stage_dataset(config, stage)).prepare(config.data_dir or default_data_dir())
