"""Dataset registry: what the pipeline must know about each dataset by name.

Besides the registered names, "folder:/path/to/ROOT" names a user image folder
(see image_folder.py).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

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
    native_size: stored image height (= width); 0 if sizes vary. The pipeline
      resizes every image to config.image_size square, so a non-square image
      is stretched, not cropped.
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
      native_size=0, mean=image_folder.IMAGENET_MEAN,
      std=image_folder.IMAGENET_STD, splits=layout.splits,
      prepare=_nothing_to_prepare, class_names=layout.classes,
      open_split=functools.partial(image_folder.open_split, layout.root))


def get_dataset(name: str) -> DatasetSpec:
  """Looks up a dataset ("folder:ROOT" or a registered name).

  The error for an unknown name names config key 'dataset.name'.
  """
  if name.startswith(image_folder.PREFIX):
    return _folder_spec(name)
  return DATASETS.get(name, key="dataset.name")
