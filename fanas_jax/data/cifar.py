"""CIFAR-10 and CIFAR-100 from the official python pickle tarballs.

The batches are pickles, and a pickle can run any code it names. They are read
with an unpickler that builds only plain containers and numpy arrays, and the
result is checked to be CIFAR's layout before a pixel is used.
"""
from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, ClassVar, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fanas_jax.data import archives
from fanas_jax.data.archives import Archive, ArchiveError
from fanas_jax.data.manual_builder import ManualBuilder

_SIZE = 32
_HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

# The only globals a CIFAR batch pickle needs: numpy's array reconstruction
# (under numpy 1's and numpy 2's module names) and Python 3's pickling of bytes.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Refuses every global but numpy array reconstruction."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
        f"refusing {module}.{name}: only numpy arrays and plain containers "
        "may appear in a CIFAR batch")


def load_pickle(data: bytes, where: str) -> dict[str, Any]:
  """A CIFAR pickle (a dict) with str keys, or one line naming `where`."""
  try:
    value = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError) as e:
    raise ArchiveError(f"Unreadable CIFAR pickle {where}: {e}") from e
  if not isinstance(value, dict):
    raise ArchiveError(f"Unreadable CIFAR pickle {where}: a "
                       f"{type(value).__name__}, not a dict")
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in value.items()}


def _field(batch: dict[str, Any], key: str, where: str) -> Any:
  if key not in batch:
    raise ArchiveError(f"CIFAR pickle {where} has no {key!r} entry")
  return batch[key]


def batch_images(batch: dict[str, Any], where: str) -> np.ndarray:
  """The batch's images as uint8 NHWC, checked to be CIFAR's (N, 3072) rows."""
  data = _field(batch, "data", where)
  if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
          and data.ndim == 2 and data.shape[1] == 3 * _SIZE * _SIZE):
    raise ArchiveError(f"CIFAR pickle {where}: 'data' is not a uint8 (N, 3072) "
                       "array")
  return data.reshape(-1, 3, _SIZE, _SIZE).transpose(0, 2, 3, 1)


def batch_labels(batch: dict[str, Any], key: str, n: int, num_classes: int,
                 where: str) -> np.ndarray:
  """The batch's `key` labels, checked: one per image, in 0..num_classes-1."""
  labels = np.asarray(_field(batch, key, where))
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (
      n and not 0 <= labels.min() <= labels.max() < num_classes):
    raise ArchiveError(f"CIFAR pickle {where}: {key!r} is not {n} labels in "
                       f"0..{num_classes - 1}")
  return labels


def label_names(meta: dict[str, Any], key: str, where: str) -> list[str]:
  names = _field(meta, key, where)
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class Cifar10(ManualBuilder, skip_registration=True):
  """CIFAR-10: 50,000 train and 10,000 test 32x32 colour images, 10 classes."""

  VERSION = tfds.core.Version("3.0.2")
  ARCHIVES = (Archive(
      "cifar-10-python.tar.gz",
      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170498071,
      "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),)
  PREFIX: ClassVar[str] = "cifar-10-batches-py/"
  SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
      "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
      "test": ("test_batch",)}
  META: ClassVar[str] = "batches.meta"
  # (feature, pickle labels key, pickle meta names key, number of classes)
  LABELS: ClassVar[tuple[tuple[str, str, str, int], ...]] = (
      ("label", "labels", "label_names", 10),)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(_SIZE, _SIZE, 3))}
    for feature, _, _, num_classes in self.LABELS:
      features[feature] = tfds.features.ClassLabel(num_classes=num_classes)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.name} from the official python tarball "
                     f"{self.ARCHIVES[0].file}; images stored as PNG."),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label"), homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self.archive_path(dl_manager, self.ARCHIVES[0].file)
    meta_member = self.PREFIX + self.META
    meta = load_pickle(archives.read_tar_members(path, {meta_member})[meta_member],
                       f"{path}:{meta_member}")
    for feature, _, names_key, _ in self.LABELS:
      names = label_names(meta, names_key, f"{path}:{meta_member}")
      self.set_label_names(feature, names, f"{path}:{meta_member}")
    return {split: self._generate_examples(path, split, files)
            for split, files in self.SPLIT_FILES.items()}

  def _generate_examples(self, path: str, split: str,
                         files: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    index = 0
    for member in [self.PREFIX + f for f in files]:  # Official order, as TFDS numbers them.
      where = f"{path}:{member}"
      data = archives.read_tar_members(path, {member})[member]  # One batch in memory.
      batch = load_pickle(data, where)
      images = batch_images(batch, where)
      labels = {feature: batch_labels(batch, key, len(images), n, where)
                for feature, key, _, n in self.LABELS}
      for i, image in enumerate(images):
        record = {feature: int(values[i]) for feature, values in labels.items()}
        record["id"] = f"{split}_{index:05d}"
        record["image"] = archives.encode(Image.fromarray(image), "PNG")
        yield index, record
        index += 1


class Cifar100(Cifar10, skip_registration=True):
  """CIFAR-100: 50,000 train and 10,000 test images, 100 classes in 20 superclasses."""

  VERSION = tfds.core.Version("3.0.2")
  ARCHIVES = (Archive(
      "cifar-100-python.tar.gz",
      "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", 169001437,
      "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),)
  PREFIX = "cifar-100-python/"
  SPLIT_FILES = {"train": ("train",), "test": ("test",)}
  META = "meta"
  LABELS = (("label", "fine_labels", "fine_label_names", 100),
            ("coarse_label", "coarse_labels", "coarse_label_names", 20))
