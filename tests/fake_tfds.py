"""Small fabricated copies of cifar10, imagenet2012 and imagenet100_32 in TFDS format.

Each is written by a TFDS GeneratorBasedBuilder with the real dataset's name,
version and features (image encoded as PNG or JPEG, ClassLabel, the id feature)
as ArrayRecord files in a temp data dir, so `tfds.data_source` reads them exactly
as it would read the prepared originals. No TensorFlow: images are handed to TFDS
as PIL images, which it encodes with PIL. Pixels carry a class-dependent tint so a
model can learn something from them.
"""
from __future__ import annotations

from typing import Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# (train, test/validation) examples per dataset: tiny, a few batches each.
SIZES = {"cifar10": (32, 16), "imagenet2012": (24, 8), "imagenet100_32": (32, 8)}


def _image(rng: np.random.Generator, label: int, num_classes: int, h: int,
           w: int) -> Image.Image:
  tint = np.asarray([label, num_classes - label, (7 * label) % num_classes])
  base = 40 + 160 * tint / max(num_classes, 1)
  noise = rng.integers(-40, 41, (h, w, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


class _Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared writing path: `_example(i, rng, split)` per example of each split."""
  SPLITS: tuple[str, str] = ("train", "test")
  code_path = epath.Path(__file__)

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n)
            for split, n in zip(self.SPLITS, SIZES[self.name])}

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
    rng = np.random.default_rng([len(split), n])
    for i in range(n):
      yield i, self._example(i, rng, split)


class Cifar10(_Fake, skip_registration=True):
  VERSION = tfds.core.Version("3.0.2")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10),
    }), supervised_keys=("image", "label"))

  def _example(self, i: int, rng: np.random.Generator, split: str) -> dict:
    label = i % 10
    return {"id": f"{split}_{i:05d}", "image": _image(rng, label, 10, 32, 32),
            "label": label}


class Imagenet2012(_Fake, skip_registration=True):
  VERSION = tfds.core.Version("5.1.0")
  SPLITS = ("train", "validation")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000),
        "file_name": tfds.features.Text(),
    }), supervised_keys=("image", "label"))

  def _example(self, i: int, rng: np.random.Generator, split: str) -> dict:
    label = (37 * i) % 1000
    h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))  # sizes vary
    return {"image": _image(rng, label, 1000, h, w), "label": label,
            "file_name": f"n{label:08d}_{split}_{i}.JPEG"}


class Imagenet100_32(_Fake, skip_registration=True):  # pylint: disable=invalid-name
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = ("train", "validation")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=100),
    }), supervised_keys=("image", "label"))

  def _example(self, i: int, rng: np.random.Generator, split: str) -> dict:
    label = (13 * i) % 100
    return {"image": _image(rng, label, 100, 32, 32), "label": label}


BUILDERS = (Cifar10, Imagenet2012, Imagenet100_32)


def write(data_dir: str, names: tuple[str, ...] = tuple(SIZES)) -> str:
  """Writes the named fakes into data_dir (ArrayRecord) and returns data_dir."""
  tfds.display_progress_bar(False)
  try:
    for cls in BUILDERS:
      if cls.name in names:
        builder = cls(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
          builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)
  return data_dir
