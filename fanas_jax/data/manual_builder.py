"""The shared part of the builders that prepare a dataset from official archives.

Each builder is a TFDS GeneratorBasedBuilder with the dataset's TFDS name,
version and feature keys, so what it writes (ArrayRecord) is read exactly like a
copy prepared by TFDS itself. It reads the archives a user put in a manual dir
(see archives.py) and needs neither TensorFlow nor network.
"""
from __future__ import annotations

import fcntl
import os
from typing import ClassVar

from etils import epath
import tensorflow_datasets as tfds

from fanas_jax.data import archives
from fanas_jax.data.archives import Archive


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose `ARCHIVES` are read from `dl_manager.manual_dir`.

  Not registered with TFDS: TFDS's own builders of the same names stay what
  `tfds.data_source` finds, and they read these files as their own.
  """
  ARCHIVES: ClassVar[tuple[Archive, ...]] = ()
  # TFDS's default probes `importlib_resources`, which fails for builders that
  # live in a package.
  code_path = epath.Path(__file__)

  # TFDS announces a "download" of "Unknown size"; nothing is downloaded here.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name
    """TFDS's manual-dir instructions: each archive and where to get it."""
    return "Put in the manual dir: " + "; ".join(
        f"{a.file} (from {a.url})" for a in self.ARCHIVES)

  def set_label_names(self, feature: str, names: list[str], where: str) -> None:
    """Names the classes of ClassLabel `feature`, from annotation file `where`."""
    expected = self.info.features[feature].num_classes
    if len(names) != expected or len(set(names)) != expected:
      raise archives.ArchiveError(
          f"{where}: {len(set(names))} distinct class names for {feature!r}, "
          f"expected {expected}")
    self.info.features[feature].names = names

  def archive_path(self, dl_manager: tfds.download.DownloadManager,
                   file: str) -> str:
    """The path of archive `file` (one of ARCHIVES) in the manual dir."""
    archive = next(a for a in self.ARCHIVES if a.file == file)
    return archives.locate(os.fspath(dl_manager.manual_dir), archive, self.name)


def prepare(builder_cls: type[ManualBuilder], manual_dir: str, data_dir: str,
            verify: bool = True) -> ManualBuilder:
  """Writes the dataset into `data_dir` from the archives in `manual_dir`.

  Every archive is located (and, with `verify`, checked against its official
  size and SHA-256) before anything is written. The check and the build run
  under an exclusive file lock, so concurrent callers build once and never read
  a half-written copy; a dataset already there is left as it is.
  """
  paths = [archives.locate(manual_dir, a, builder_cls.name)
           for a in builder_cls.ARCHIVES]
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{builder_cls.name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
      return builder
    if verify:
      for path, archive in zip(paths, builder_cls.ARCHIVES):
        archives.verify(path, archive)
    tfds.display_progress_bar(False)  # TFDS's own bars would flood the console.
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir))
    finally:
      tfds.display_progress_bar(True)
  return builder
