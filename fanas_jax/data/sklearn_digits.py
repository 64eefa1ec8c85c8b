"""The UCI digits shipped inside scikit-learn, as an offline TFDS dataset.

It gives the pipeline and the tests a real image classification dataset that
builds in a second without network access, through the same
`tfds.data_source` path as the large datasets.
"""
from __future__ import annotations

import fcntl
import os
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def scale_pixels(images: np.ndarray) -> np.ndarray:
  """Maps sklearn's 0..16 intensities onto 0..255 uint8, rounding half up."""
  return np.floor(images.astype(np.float64) * 255.0 / 16.0 + 0.5).astype(
      np.uint8)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Stratified 80/20 train/test split of sklearn indices, fixed forever.

  Each class is permuted by its own seeded generator, so the split depends only
  on the labels, not on numpy's global state or on the other classes.
  """
  test = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rng = np.random.default_rng([_SPLIT_SEED, int(c)])
    n_test = int(round(TEST_FRACTION * len(members)))
    test.append(rng.permutation(members)[:n_test])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """sklearn.datasets.load_digits: 1,797 8x8 grey digits, 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split."}
  # TFDS's default probes `importlib_resources`, which it only requires on
  # Python < 3.9, so it fails for builders that live in a package.
  code_path = epath.Path(__file__)

  # TFDS announces a "download" of "Unknown size"; nothing is downloaded here, and
  # ensure_built prints what really happens.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "UCI ML hand-written digits as shipped with scikit-learn: 8x8 "
            "images with intensities 0..16 rescaled to 0..255. The test split "
            "holds a fixed, stratified 20% of every class. 'index' is the "
            "position in sklearn.datasets.load_digits()."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage=("https://archive.ics.uci.edu/dataset/80/"
                  "optical+recognition+of+handwritten+digits"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = scale_pixels(digits.images)[..., None]
    labels = digits.target.astype(np.int64)
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices(labels).items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]),
                     "index": int(i)}


def ensure_built(data_dir: str) -> None:
  """Builds the dataset into `data_dir` unless it is already there.

  The check and the build run under an exclusive file lock, so concurrent
  callers (pytest-xdist workers, several hosts on one disk) build it once and
  never read a half-written copy.
  """
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{NAME}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      print(f"[data] building {NAME} from the copy inside scikit-learn into "
            f"{data_dir} (offline, once)")
      tfds.display_progress_bar(False)  # TFDS's own bars would flood the console.
      try:
        builder.download_and_prepare()
      finally:
        tfds.display_progress_bar(True)
