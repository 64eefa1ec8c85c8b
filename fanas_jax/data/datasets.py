"""Dataset registry: what the pipeline must know about each dataset by name."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from fanas_jax.data import sklearn_digits
from fanas_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset, so configs only name it.

  Attributes:
    name: registry name, used in configs.
    tfds_name: name passed to `tfds.data_source`.
    num_classes: number of labels.
    channels: image channels.
    native_size: stored image height (= width).
    mean: per-channel mean of the train split, in [0, 1] pixel units.
    std: per-channel standard deviation of the train split, same units.
    splits: splits that exist on disk; '+' joins them in `load_split`.
    prepare: called with a TFDS data dir before reading; makes the dataset
      readable there without network (sklearn_digits builds itself).
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


def get_dataset(name: str) -> DatasetSpec:
  """Looks up a dataset; the error names config key 'dataset.name'."""
  return DATASETS.get(name, key="dataset.name")
