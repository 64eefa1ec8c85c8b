"""ImageNet-1k (ILSVRC 2012) and its 100-class 32x32 subset from the official tars.

Labels follow TFDS: the sorted WordNet ids of its labels.txt, and validation
labels from TFDS's validation_labels.txt (the devkit's ground truth as
synsets, line n for ILSVRC2012_val_{n:08d}.JPEG). The train tar of per-class
tars is streamed, one image at a time.
"""
from __future__ import annotations

import re
from typing import ClassVar, Iterator

import tensorflow_datasets as tfds
from PIL import Image

from fanas_jax.data import archives
from fanas_jax.data.archives import Archive, ArchiveError
from fanas_jax.data.manual_builder import ManualBuilder

_ARCHIVES = (
    Archive("ILSVRC2012_img_train.tar", "https://image-net.org/download-images.php",
            147897477120,
            "b08200a27a8e34218a0e58fde36b0fe8f73bc377f4acea2d91602057c3ca45bb"),
    Archive("ILSVRC2012_img_val.tar", "https://image-net.org/download-images.php",
            6744924160,
            "c7e06a6c0baccf06d8dbeb6577d71efff84673a5dbdd50633ab44f8ea0456ae0"))
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")

# The ImageNet-100 classes of Tian et al., "Contrastive Multiview Coding"
# (2019): the CMC repository's imagenet100.txt, in its order.
CMC_IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 "
    "n04589890 n03062245 n01773797 n01735189 n07831146 n07753275 n03085013 "
    "n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 n02086910 "
    "n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 "
    "n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 "
    "n01820546 n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 "
    "n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 "
    "n03379051 n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 "
    "n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 "
    "n03032252 n02138441 n02104029 n03837869 n03494278 n04136333 n03794056 "
    "n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 n04229816 "
    "n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 "
    "n01855672 n02090622").split()


def _tfds_lines(relative: str) -> list[str]:
  return tfds.core.tfds_path(relative).read_text().strip().splitlines()


def synsets() -> list[str]:
  """The 1,000 WordNet ids in label order (sorted), from TFDS's labels.txt."""
  return _tfds_lines("datasets/imagenet2012/labels.txt")


def validation_synsets() -> list[str]:
  """Synset of validation image n at position n - 1 (TFDS's validation_labels.txt)."""
  return _tfds_lines("datasets/imagenet2012/validation_labels.txt")


class Imagenet2012(ManualBuilder, skip_registration=True):
  """ILSVRC 2012: 1,281,167 train and 50,000 validation images, 1,000 classes."""

  VERSION = tfds.core.Version("5.1.0")
  ARCHIVES = _ARCHIVES
  CLASSES: ClassVar[tuple[str, ...]] = ()  # () = all 1,000 synsets.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("ILSVRC 2012 from the official train and val tars; "
                     "TFDS's features, splits train and validation."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=synsets()),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"), homepage="https://image-net.org/")

  def classes(self) -> list[str]:
    return sorted(self.CLASSES) if self.CLASSES else synsets()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    train, val = (self.archive_path(dl_manager, a.file) for a in self.ARCHIVES)
    label_of = {s: i for i, s in enumerate(self.classes())}
    return {"train": self._generate_examples("train", train, label_of),
            "validation": self._generate_examples("validation", val, label_of)}

  def _generate_examples(self, split: str, path: str, label_of: dict[str, int]
                         ) -> Iterator[tuple[str, dict]]:
    if split == "train":
      return self._generate_train(path, label_of)
    return self._generate_validation(path, label_of)

  def image(self, data: bytes, where: str) -> bytes:
    return archives.rgb_jpeg(data, where)

  def record(self, data: bytes, where: str, label: int, file_name: str) -> dict:
    return {"image": self.image(data, where), "label": label,
            "file_name": file_name}

  def _generate_train(self, path: str, label_of: dict[str, int]
                      ) -> Iterator[tuple[str, dict]]:
    def keep(member: str) -> bool:
      synset = member.removesuffix(".tar")
      if member == synset or not re.fullmatch(r"n\d{8}", synset):
        raise ArchiveError(f"{path}: member {member} is not a per-class "
                           "nXXXXXXXX.tar (is it ILSVRC2012_img_train.tar?)")
      return synset in label_of
    for outer, inner, data in archives.iter_nested_tar(path, keep):
      label = label_of[outer.removesuffix(".tar")]
      yield inner, self.record(data, f"{path}:{outer}:{inner}", label, inner)

  def _generate_validation(self, path: str, label_of: dict[str, int]
                           ) -> Iterator[tuple[str, dict]]:
    truth = validation_synsets()
    for member, data in archives.iter_tar(path):
      match = _VAL_NAME.search(member)
      if not match or not 1 <= int(match.group(1)) <= len(truth):
        raise ArchiveError(f"{path}: member {member} is not an ILSVRC2012_val_"
                           f"NNNNNNNN.JPEG with N in 1..{len(truth)}")
      synset = truth[int(match.group(1)) - 1]
      if synset in label_of:
        yield member, self.record(data, f"{path}:{member}", label_of[synset],
                                  member)


class Imagenet100_32(Imagenet2012, skip_registration=True):  # pylint: disable=invalid-name
  """The CMC ImageNet-100 classes, whole images box-downsampled to 32x32.

  Labels 0..99 follow the sorted WordNet ids, like imagenet_resized/32x32.
  """

  name = "imagenet100_32"
  VERSION = tfds.core.Version("1.0.0")
  CLASSES = tuple(CMC_IMAGENET100)
  SIZE = 32

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The 100 ImageNet classes of the CMC ImageNet-100 list, "
                     "train and validation images box-downsampled (whole image, "
                     "no crop) to 32x32 RGB, PNG; labels in sorted synset "
                     "order."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self.SIZE, self.SIZE, 3)),
            "label": tfds.features.ClassLabel(names=sorted(self.CLASSES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/HobbitLong/CMC")

  def image(self, data: bytes, where: str) -> bytes:
    small = archives.decode(data, where).convert("RGB").resize(
        (self.SIZE, self.SIZE), Image.BOX)
    return archives.encode(small, "PNG")

  def record(self, data: bytes, where: str, label: int, file_name: str) -> dict:
    del file_name  # Not a feature of the downsampled dataset.
    return {"image": self.image(data, where), "label": label}
