"""User image folders, ROOT/SPLIT/CLASS/IMAGE, as a random-access source.

A config names one as dataset = "folder:/path/to/ROOT". The tree is scanned
once per root and process; an image is decoded only when its record is read,
so a folder larger than memory trains like a TFDS dataset.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np
from PIL import Image

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
# A user's folder comes without train-split statistics; most are photographs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnreadableImageError(ValueError):
  """PIL cannot decode an image file; the message names the file."""


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """What a scan of ROOT found.

  Attributes:
    root: absolute path of ROOT.
    splits: sorted sub-directories of ROOT that hold class directories.
    classes: sorted union of the class-directory names of all splits; a
      class's label is its position here, the same in every split.
  """
  root: str
  splits: tuple[str, ...]
  classes: tuple[str, ...]


def _subdirs(path: str) -> list[str]:
  """Sorted names of the non-hidden directories in `path`."""
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan(root: str) -> FolderLayout:
  """The splits and classes under `root` (cached per root in this process)."""
  if not root:
    raise ValueError(f"Dataset {PREFIX!r} names no directory; write "
                     f"'{PREFIX}/path/to/ROOT'.")
  return _scan(os.path.abspath(os.path.expanduser(root)))


@functools.lru_cache(maxsize=None)
def _scan(root: str) -> FolderLayout:
  if not os.path.isdir(root):
    raise ValueError(f"Image folder {root} does not exist (dataset "
                     f"'{PREFIX}{root}').")
  splits = tuple(s for s in _subdirs(root) if _subdirs(os.path.join(root, s)))
  if not splits:
    raise ValueError(f"Image folder {root} has no split directories; expected "
                     f"{root}/SPLIT/CLASS/IMAGE files.")
  classes = sorted(set().union(*(_subdirs(os.path.join(root, s))
                                 for s in splits)))
  return FolderLayout(root, splits, tuple(classes))


@functools.lru_cache(maxsize=None)
def _split_files(root: str, split: str) -> tuple[tuple[str, int], ...]:
  """(path, label) of one split's images, by class then file name."""
  layout = _scan(root)
  split_dir = os.path.join(root, split)
  if split not in layout.splits:
    if split and os.path.isdir(split_dir):
      raise ValueError(f"Split directory {split_dir} has no class "
                       "directories.")
    raise ValueError(f"Unknown split {split!r} for image folder {root}; valid "
                     f"splits: {', '.join(layout.splits)} (or several joined "
                     "by '+').")
  files = []
  for name in _subdirs(split_dir):
    class_dir = os.path.join(split_dir, name)
    images = sorted(f for f in os.listdir(class_dir) if _is_image(f)
                    and os.path.isfile(os.path.join(class_dir, f)))
    if not images:
      raise ValueError(f"Class directory {class_dir} has no images "
                       f"({', '.join(IMAGE_EXTENSIONS)}, any case).")
    label = layout.classes.index(name)
    files.extend((os.path.join(class_dir, f), label) for f in images)
  return tuple(files)


def decode_rgb(path: str) -> np.ndarray:
  """uint8 HxWx3: grey is replicated, alpha dropped, a GIF's first frame."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except Exception as e:  # Whatever PIL raises, the file is at fault.
    raise UnreadableImageError(
        f"cannot decode image file {path}: {type(e).__name__}: {e}") from e


class ImageFolderSource:
  """Random-access records {'image', 'label', 'index', 'path'} of a split.

  'index' is the position in the split's file list (sorted by class, then file
  name); splits joined by '+' follow one another, so indices stay distinct.
  `labels` lets class filters run without decoding a single image.
  """

  def __init__(self, files: tuple[tuple[str, int], ...]):
    self.paths = tuple(p for p, _ in files)
    self.labels = np.array([label for _, label in files], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    return {"image": decode_rgb(self.paths[i]), "label": int(self.labels[i]),
            "index": i, "path": self.paths[i]}


def open_split(root: str, split: str) -> ImageFolderSource:
  """The split's source; `split` may join several with '+'."""
  root = scan(root).root
  return ImageFolderSource(sum((_split_files(root, part)
                                for part in split.split("+")), ()))
