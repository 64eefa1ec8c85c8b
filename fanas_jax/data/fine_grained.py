"""The paper's fine-grained and retrieval datasets from their official archives.

CUB-200-2011, Stanford Cars (the car_ims release), FGVC-Aircraft 2013b and
Stanford Online Products. JPEG images keep their own bytes where they are RGB
(archives.rgb_jpeg); Aircraft's are re-encoded once its copyright banner is cut.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Callable, ClassVar, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fanas_jax.data import archives
from fanas_jax.data.archives import Archive, ArchiveError
from fanas_jax.data.manual_builder import ManualBuilder

# split -> {archive member: (label, example features other than the image)}
Members = dict[str, dict[str, tuple[int, dict]]]


def _image_stream(path: str, members: dict[str, tuple[int, dict]],
                  transform: Callable[[bytes, str], bytes] = archives.rgb_jpeg
                  ) -> Iterator[tuple[str, dict]]:
  """(member, example) for each of `members` in a tar, each image checked.

  A member the archive lacks is one line naming it, after the stream ends.
  """
  seen = set()
  for member, data in archives.iter_tar(path, keep=members.__contains__):
    seen.add(member)
    label, extra = members[member]
    yield member, {"image": transform(data, f"{path}:{member}"),
                   "label": label, **extra}
  missing = sorted(set(members) - seen)
  if missing:
    raise ArchiveError(f"Archive {path} has no member {missing[0]} (truncated, or "
                       "not the official archive?)")


def _int(value: str, where: str) -> int:
  try:
    return int(value)
  except ValueError as e:
    raise ArchiveError(f"{where}: {value!r} is not an integer") from e


def _in_range(value: int, low: int, high: int, what: str, where: str) -> int:
  if not low <= value <= high:
    raise ArchiveError(f"{where}: {what} {value} outside {low}..{high}")
  return value


class CaltechBirds2011(ManualBuilder, skip_registration=True):
  """CUB-200-2011: 11,788 photos of 200 bird species; official train/test split."""

  VERSION = tfds.core.Version("0.2.0")
  ARCHIVES = (Archive(
      "CUB_200_2011.tgz",
      "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
      1150585339,
      "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081"),)
  ROOT: ClassVar[str] = "CUB_200_2011/"
  ANNOTATIONS: ClassVar[tuple[str, ...]] = (
      "images.txt", "image_class_labels.txt", "train_test_split.txt",
      "classes.txt")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("CUB-200-2011 from CUB_200_2011.tgz: TFDS's features less "
                     "bbox and segmentation_mask. 'label' is the class id - 1."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "image/filename": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=200),
            "label_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self.archive_path(dl_manager, self.ARCHIVES[0].file)
    members, names = self.read_annotations(path)
    self.set_label_names("label", names, f"{path}:{self.ROOT}classes.txt")
    return {split: self._generate_examples(path, members[split])
            for split in ("train", "test")}

  def read_annotations(self, path: str) -> tuple[Members, list[str]]:
    """Per-split members and the 200 class names, from the annotation files."""
    wanted = {self.ROOT + f: f for f in self.ANNOTATIONS}
    raw = archives.read_tar_members(path, set(wanted))
    tables = {}
    for member, file in wanted.items():
      rows = archives.text_lines(raw[member], path, member)
      tables[file] = {row[0]: row[1:] for row in rows if len(row) >= 2}
    classes = tables["classes.txt"]
    names = [classes.get(str(i), [""])[0] for i in range(1, 201)]
    if "" in names:
      raise ArchiveError(f"{path}:{self.ROOT}classes.txt does not name classes "
                         "1..200")
    members: Members = {"train": {}, "test": {}}
    for image_id, (file, *_) in tables["images.txt"].items():
      where = f"{path}:{self.ROOT}image_class_labels.txt/train_test_split.txt"
      if image_id not in tables["image_class_labels.txt"] or (
          image_id not in tables["train_test_split.txt"]):
        raise ArchiveError(f"{where}: no entry for image id {image_id}")
      label = _in_range(_int(tables["image_class_labels.txt"][image_id][0], where),
                        1, 200, "class", where) - 1
      is_train = _in_range(_int(tables["train_test_split.txt"][image_id][0], where),
                           0, 1, "split flag", where)
      member = f"{self.ROOT}images/{file}"
      label_name = names[label].split(".", 1)[-1].lower()
      members["train" if is_train else "test"][member] = (
          label, {"image/filename": member, "label_name": label_name})
    return members, [n.split(".", 1)[-1] for n in names]

  def _generate_examples(self, path: str, members: dict[str, tuple[int, dict]]
                         ) -> Iterator[tuple[str, dict]]:
    yield from _image_stream(path, members)


class Cars196(ManualBuilder, skip_registration=True):
  """Stanford Cars: 16,185 photos of 196 car models; official train/test split."""

  VERSION = tfds.core.Version("2.1.0")
  ARCHIVES = (
      Archive("car_ims.tgz", "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz"),
      Archive("cars_annos.mat",
              "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat"))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Stanford Cars from the car_ims.tgz / cars_annos.mat "
                     "release: TFDS's features less bbox; 'id' is the file "
                     "name without extension."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "label": tfds.features.ClassLabel(num_classes=196),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    images = self.archive_path(dl_manager, "car_ims.tgz")
    annotations = self.archive_path(dl_manager, "cars_annos.mat")
    members, names = read_cars_annotations(annotations)
    self.set_label_names("label", names, annotations)
    return {split: self._generate_examples(images, members[split])
            for split in ("train", "test")}

  def _generate_examples(self, path: str, members: dict[str, tuple[int, dict]]
                         ) -> Iterator[tuple[str, dict]]:
    yield from _image_stream(path, members)


def read_cars_annotations(path: str) -> tuple[Members, list[str]]:
  """Per-split members of car_ims.tgz and the 196 class names, from cars_annos.mat."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True)
    annotations, names = mat["annotations"], mat["class_names"]
    files, labels, tests = (annotations[k] for k in ("relative_im_path", "class",
                                                      "test"))
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise ArchiveError(f"Unreadable annotation file {path}: {e!r}") from e
  names = [str(n) for n in np.atleast_1d(names)]
  members: Members = {"train": {}, "test": {}}
  for file, label, test in zip(np.atleast_1d(files), np.atleast_1d(labels),
                               np.atleast_1d(tests)):
    label = _in_range(int(label), 1, 196, "class", path) - 1
    split = "test" if _in_range(int(test), 0, 1, "test flag", path) else "train"
    stem = os.path.splitext(os.path.basename(str(file)))[0]
    members[split][str(file)] = (label, {"id": stem})
  return members, names


class FgvcAircraft(ManualBuilder, skip_registration=True):
  """FGVC-Aircraft 2013b: 10,000 photos of 100 aircraft variants; trainval/test."""

  VERSION = tfds.core.Version("1.0.0")
  ARCHIVES = (Archive(
      "fgvc-aircraft-2013b.tar.gz",
      "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
      "fgvc-aircraft-2013b.tar.gz"),)
  DATA: ClassVar[str] = "fgvc-aircraft-2013b/data/"
  SPLITS: ClassVar[dict[str, str]] = {
      "trainval": "images_variant_trainval.txt", "test": "images_variant_test.txt"}
  BANNER = 20  # Rows of copyright text at the bottom of every image.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("FGVC-Aircraft 2013b at the variant level (100 classes, in "
                     "variants.txt order), bottom 20-pixel copyright banner "
                     "removed, re-encoded as JPEG quality 95. 'id' is the image "
                     "number."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=100),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self.archive_path(dl_manager, self.ARCHIVES[0].file)
    members, names = self.read_annotations(path)
    self.set_label_names("label", names, f"{path}:{self.DATA}variants.txt")
    return {split: self._generate_examples(path, members[split])
            for split in self.SPLITS}

  def read_annotations(self, path: str) -> tuple[Members, list[str]]:
    """Per-split members and the variant names (variants.txt order)."""
    files = {"variants.txt", *self.SPLITS.values()}
    raw = archives.read_tar_members(path, {self.DATA + f for f in files})
    def lines(file: str) -> list[str]:
      data = raw[self.DATA + file]
      rows = archives.text_lines(data, path, self.DATA + file)
      return [" ".join(row) for row in rows]
    names = lines("variants.txt")
    label_of = {name: i for i, name in enumerate(names)}
    members: Members = {}
    for split, file in self.SPLITS.items():
      members[split] = {}
      for line in lines(file):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
          raise ArchiveError(f"{path}:{self.DATA}{file}: unknown variant "
                             f"{variant!r} for image {image_id}")
        members[split][f"{self.DATA}images/{image_id}.jpg"] = (
            label_of[variant], {"id": image_id})
    return members, names

  def crop_banner(self, data: bytes, where: str) -> bytes:
    image = archives.decode(data, where)
    width, height = image.size
    if height <= self.BANNER:
      raise ArchiveError(f"Image {where} is {height} pixels high, no room for "
                         f"its {self.BANNER}-pixel banner")
    return archives.encode(image.crop((0, 0, width, height - self.BANNER)), "JPEG")

  def _generate_examples(self, path: str, members: dict[str, tuple[int, dict]]
                         ) -> Iterator[tuple[str, dict]]:
    yield from _image_stream(path, members, self.crop_banner)


SOP_SUPER_CLASSES = (
    "bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp",
    "mug", "sofa", "stapler", "table", "toaster")


class StanfordOnlineProducts(ManualBuilder, skip_registration=True):
  """Stanford Online Products: 120,053 photos of 22,634 products in 12 kinds."""

  VERSION = tfds.core.Version("1.0.0")
  ARCHIVES = (Archive(
      "Stanford_Online_Products.zip",
      "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip", 3083860082,
      "b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48"),)
  ROOT: ClassVar[str] = "Stanford_Online_Products/"
  SPLITS: ClassVar[dict[str, str]] = {"train": "Ebay_train.txt",
                                      "test": "Ebay_test.txt"}
  NUM_PRODUCTS = 22634

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Stanford Online Products from its zip, TFDS's features: "
                     "'class_id' is the product (Ebay_*.txt class_id - 1), "
                     "'super_class_id' its kind."),
        features=tfds.features.FeaturesDict({
            "class_id": tfds.features.ClassLabel(num_classes=self.NUM_PRODUCTS),
            "super_class_id/num": tfds.features.ClassLabel(
                num_classes=len(SOP_SUPER_CLASSES)),
            "super_class_id": tfds.features.ClassLabel(names=SOP_SUPER_CLASSES),
            "image": tfds.features.Image(),
        }),
        supervised_keys=("image", "class_id"),
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self.archive_path(dl_manager, self.ARCHIVES[0].file)
    return {split: self._generate_examples(path, file)
            for split, file in self.SPLITS.items()}

  def _generate_examples(self, path: str, file: str) -> Iterator[tuple[str, dict]]:
    try:
      with zipfile.ZipFile(path) as archive:
        rows = self.read_rows(path, archive, file)
        for image_id, class_id, super_class, member in rows:
          data = self.read_member(path, archive, member)
          yield image_id, {
              "class_id": class_id, "super_class_id/num": super_class,
              "super_class_id": SOP_SUPER_CLASSES[super_class],
              "image": archives.rgb_jpeg(data, f"{path}:{member}")}
    except (zipfile.BadZipFile, OSError) as e:
      raise ArchiveError(f"Corrupt archive {path}: {e}") from e

  def read_rows(self, path: str, archive: zipfile.ZipFile, file: str
                ) -> list[tuple[str, int, int, str]]:
    """(image_id, class_id, super_class_id, member) rows, ids from 0."""
    member = self.ROOT + file
    rows = archives.text_lines(self.read_member(path, archive, member), path, member)
    where = f"{path}:{member}"
    if not rows or rows[0] != ["image_id", "class_id", "super_class_id", "path"]:
      raise ArchiveError(f"{where}: no 'image_id class_id super_class_id path' "
                         "header")
    out = []
    for row in rows[1:]:
      if len(row) != 4:
        raise ArchiveError(f"{where}: row {' '.join(row)!r} is not "
                           "'image_id class_id super_class_id path'")
      image_id, class_id, super_class, image = row
      out.append((image_id,
                  _in_range(_int(class_id, where), 1, self.NUM_PRODUCTS,
                            "class_id", where) - 1,
                  _in_range(_int(super_class, where), 1, len(SOP_SUPER_CLASSES),
                            "super_class_id", where) - 1,
                  self.ROOT + image))
    return out

  @staticmethod
  def read_member(path: str, archive: zipfile.ZipFile, member: str) -> bytes:
    try:
      return archive.read(member)
    except KeyError as e:
      raise ArchiveError(f"Archive {path} has no member {member} (truncated, or "
                         "not the official archive?)") from e
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
      raise ArchiveError(f"Corrupt member {path}:{member}: {e}") from e
