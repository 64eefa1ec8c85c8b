"""Official dataset archives in a manual dir: finding, verifying, streaming, decoding.

The builders of the paper's datasets read the archives a user downloaded, with
tarfile and zipfile (TFDS's own extraction needs TensorFlow). Tars are read as
streams, member after member, so no dataset is ever held in memory or unpacked
on disk. Every failure is one line naming the archive, and the member where
there is one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import warnings
import zlib
from typing import Callable, Iterator

from PIL import Image

_HASH_CHUNK = 1 << 22
# What a truncated or damaged tar/gzip/zip stream raises while it is read.
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class ArchiveError(ValueError):
  """An archive that is missing or unreadable, or a member that is bad."""


@dataclasses.dataclass(frozen=True)
class Archive:
  """An official download: its file name, where to get it, what it should be.

  Attributes:
    file: the file name a user puts in the manual dir.
    url: where to download it (or the page that gives access to it).
    size: its size in bytes; 0 if not known.
    sha256: its SHA-256 hex digest; '' if not known.
  """
  file: str
  url: str
  size: int = 0
  sha256: str = ""


def locate(manual_dir: str, archive: Archive, dataset: str) -> str:
  """The archive's path in `manual_dir`, or one line saying where to get it."""
  path = os.path.join(manual_dir, archive.file)
  if not os.path.isfile(path):
    raise ArchiveError(
        f"Missing {archive.file} for dataset {dataset!r}: download it from "
        f"{archive.url} and put it in {os.path.abspath(manual_dir)}/")
  return path


def sha256_of(path: str) -> str:
  """The file's SHA-256, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify(path: str, archive: Archive) -> None:
  """Warns, naming the file, if its size or SHA-256 differs from the official one.

  A differing archive may still be a valid copy (a re-pack, a mirror), so the
  build goes on; a broken one fails later on the member it cannot read.
  """
  if archive.size and os.path.getsize(path) != archive.size:
    warnings.warn(f"{path}: size {os.path.getsize(path)} bytes differs from the "
                  f"official {archive.file} ({archive.size} bytes).")
  elif archive.sha256 and sha256_of(path) != archive.sha256:
    warnings.warn(f"{path}: SHA-256 differs from the official {archive.file} "
                  f"({archive.sha256}).")


def iter_tar(path: str, keep: Callable[[str], bool] = lambda name: True
             ) -> Iterator[tuple[str, bytes]]:
  """Streams (member name, bytes) over the regular files of a tar that `keep`.

  Members are read one at a time in archive order, so memory holds one image.
  """
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        if member.isfile() and keep(member.name):
          yield member.name, tar.extractfile(member).read()
  except _STREAM_ERRORS as e:
    raise ArchiveError(f"Corrupt or truncated archive {path}: {e}") from e


def iter_nested_tar(path: str, keep: Callable[[str], bool] = lambda name: True
                    ) -> Iterator[tuple[str, str, bytes]]:
  """Streams (outer member, inner member, bytes) over a tar of tars that `keep`
  (by outer member name): ImageNet's train tar of per-class tars."""
  outer_name = ""
  try:
    with tarfile.open(path, mode="r|*") as outer:
      for member in outer:
        outer_name = member.name
        if not (member.isfile() and keep(member.name)):
          continue
        with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
          for item in inner:
            if item.isfile():
              yield member.name, item.name, inner.extractfile(item).read()
  except _STREAM_ERRORS as e:
    where = f"{path}:{outer_name}" if outer_name else path
    raise ArchiveError(f"Corrupt or truncated archive {where}: {e}") from e


def read_tar_members(path: str, wanted: set[str]) -> dict[str, bytes]:
  """The bytes of the `wanted` members of a tar (small annotation files)."""
  found = dict(iter_tar(path, keep=wanted.__contains__))
  missing = sorted(wanted - set(found))
  if missing:
    raise ArchiveError(f"Archive {path} has no member {missing[0]} (truncated, or "
                       "not the official archive?)")
  return found


def text_lines(data: bytes, path: str, member: str) -> list[list[str]]:
  """The whitespace-split non-empty lines of an annotation file."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ArchiveError(f"{path}:{member} is not a text file: {e}") from e
  return [line.split() for line in text.splitlines() if line.strip()]


def decode(data: bytes, where: str) -> Image.Image:
  """The fully decoded image, or one line naming `where` (archive:member)."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ArchiveError(f"Corrupt image {where}: {e}") from e
  return image


def encode(image: Image.Image, image_format: str) -> bytes:
  """`image` as RGB bytes in `image_format` ('PNG' lossless, 'JPEG' at quality 95)."""
  buffer = io.BytesIO()
  options = {"quality": 95} if image_format == "JPEG" else {}
  image.convert("RGB").save(buffer, format=image_format, **options)
  return buffer.getvalue()


def rgb_jpeg(data: bytes, where: str) -> bytes:
  """Checked JPEG bytes for an RGB image feature.

  An RGB JPEG keeps its own bytes, so pixels survive exactly; anything else
  (greyscale, CMYK, a PNG named .jpg) is converted to RGB and re-encoded, as
  TFDS does for ImageNet.
  """
  image = decode(data, where)
  if image.format == "JPEG" and image.mode == "RGB":
    return data
  return encode(image, "JPEG")
