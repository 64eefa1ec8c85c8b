"""Tiny copies of the paper's official dataset archives, in their exact layout.

File names, directory prefixes, annotation formats (text tables, a MATLAB
struct written by scipy.io.savemat, python-2-style CIFAR pickles) follow the
real downloads; only the number and size of the images are small. Each writer
returns what the archive holds, so tests compare the prepared dataset with it.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
from PIL import Image


def image_array(rng: np.random.Generator, h: int, w: int, grey: bool = False
                ) -> np.ndarray:
  """A smooth random image (JPEG keeps it close), HxWx3 or HxW if grey."""
  shape = (h, w) if grey else (h, w, 3)
  coarse = rng.integers(0, 256, (2, 2) + shape[2:]).astype(np.float64)
  rows, cols = np.linspace(0, 1, h)[:, None], np.linspace(0, 1, w)[None, :]
  if not grey:
    rows, cols = rows[..., None], cols[..., None]
  top = coarse[0, 0] * (1 - cols) + coarse[0, 1] * cols
  bottom = coarse[1, 0] * (1 - cols) + coarse[1, 1] * cols
  return np.round(top * (1 - rows) + bottom * rows).astype(np.uint8)


def jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
  """Pixels of encoded image bytes as RGB, as PIL decodes them."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_tar(path: str, members: dict[str, bytes]) -> str:
  """A tar (gzipped if the name ends .tgz/.tar.gz) with `members` in order."""
  mode = "w:gz" if path.endswith((".tgz", ".gz")) else "w"
  with tarfile.open(path, mode) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _py2_pickle(value: dict) -> bytes:
  """CIFAR's batches are python 2 pickles: bytes keys and strings, protocol 2."""
  return pickle.dumps(value, protocol=2)


def cifar(manual_dir: str, hundred: bool, per_file: int = 4) -> dict:
  """cifar-10(0)-python.tar.gz; returns {split: (images NHWC, labels...)}."""
  rng = np.random.default_rng(10 + hundred)
  if hundred:
    prefix, files = "cifar-100-python/", {"train": ["train"], "test": ["test"]}
    meta_name = "meta"
    meta = {b"fine_label_names": [b"fine%d" % i for i in range(100)],
            b"coarse_label_names": [b"coarse%d" % i for i in range(20)]}
  else:
    prefix, meta_name = "cifar-10-batches-py/", "batches.meta"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)],
             "test": ["test_batch"]}
    meta = {b"label_names": [b"name%d" % i for i in range(10)],
            b"num_cases_per_batch": per_file, b"num_vis": 3072}
  members, expected = {}, {}
  for split, names in files.items():
    images, fine, coarse = [], [], []
    for name in names:
      batch_images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
      labels = rng.integers(0, 100 if hundred else 10, per_file).tolist()
      batch = {b"batch_label": b"batch " + name.encode(),
               b"data": batch_images.transpose(0, 3, 1, 2).reshape(per_file, -1),
               b"filenames": [b"img%d.png" % i for i in range(per_file)]}
      if hundred:
        coarse_labels = rng.integers(0, 20, per_file).tolist()
        batch.update({b"fine_labels": labels, b"coarse_labels": coarse_labels})
        coarse += coarse_labels
      else:
        batch[b"labels"] = labels
      members[prefix + name] = _py2_pickle(batch)
      images.append(batch_images)
      fine += labels
    expected[split] = (np.concatenate(images), np.asarray(fine), np.asarray(coarse))
  members[prefix + meta_name] = _py2_pickle(meta)
  file = "cifar-100-python.tar.gz" if hundred else "cifar-10-python.tar.gz"
  write_tar(os.path.join(manual_dir, file), members)
  return expected


# (class id 1-based, is_train, grey) per fabricated CUB / Cars image.
_FINE_IMAGES = ((1, 1, False), (1, 0, False), (2, 1, True), (150, 1, False),
                (150, 0, False), (196, 0, False))


def cub(manual_dir: str) -> dict[str, list[tuple[int, str, np.ndarray]]]:
  """CUB_200_2011.tgz; returns {split: [(label, member, RGB pixels)]}."""
  rng = np.random.default_rng(200)
  root = "CUB_200_2011/"
  classes = [f"{i:03d}.Bird_Number_{i}" for i in range(1, 201)]
  images, expected = {}, {"train": [], "test": []}
  rows = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
  for image_id, (label, train, grey) in enumerate(_FINE_IMAGES, start=1):
    file = f"{classes[label - 1]}/Bird_Number_{label}_{image_id:04d}_{image_id}.jpg"
    data = jpeg(image_array(rng, 24 + image_id, 30, grey))
    images[f"{root}images/{file}"] = data
    rows["images.txt"].append(f"{image_id} {file}")
    rows["image_class_labels.txt"].append(f"{image_id} {label}")
    rows["train_test_split.txt"].append(f"{image_id} {train}")
    expected["train" if train else "test"].append(
        (label - 1, f"{root}images/{file}", decoded(data)))
  members = {root + "classes.txt": "\n".join(
      f"{i} {c}" for i, c in enumerate(classes, start=1)).encode() + b"\n"}
  members.update(images)  # Images before the tables, so both passes matter.
  members.update({root + k: ("\n".join(v) + "\n").encode() for k, v in rows.items()})
  write_tar(os.path.join(manual_dir, "CUB_200_2011.tgz"), members)
  return expected


def cars(manual_dir: str) -> dict[str, list[tuple[int, str, np.ndarray]]]:
  """car_ims.tgz and cars_annos.mat; returns {split: [(label, id, RGB pixels)]}."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(196)
  fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
            "class", "test"]
  annotations = np.zeros((1, len(_FINE_IMAGES)),
                         dtype=[(f, object) for f in fields])
  members, expected = {}, {"train": [], "test": []}
  for i, (label, train, grey) in enumerate(_FINE_IMAGES):
    path = f"car_ims/{i + 1:06d}.jpg"
    data = jpeg(image_array(rng, 20 + i, 28, grey))
    members[path] = data
    annotations[0, i] = (path, 1, 2, 10, 12, label, 1 - train)
    expected["train" if train else "test"].append((label - 1, f"{i + 1:06d}",
                                                   decoded(data)))
  names = np.empty((1, 196), dtype=object)
  names[0, :] = [f"Maker Model {i} 2012" for i in range(196)]
  scipy.io.savemat(os.path.join(manual_dir, "cars_annos.mat"),
                   {"annotations": annotations, "class_names": names})
  write_tar(os.path.join(manual_dir, "car_ims.tgz"), members)
  return expected


AIRCRAFT_VARIANTS = [f"Variant-{i}" if i % 3 else f"Cessna {i}" for i in range(100)]


def aircraft(manual_dir: str) -> dict[str, list[tuple[int, str, np.ndarray]]]:
  """fgvc-aircraft-2013b.tar.gz; returns {split: [(label, id, full RGB pixels)]}."""
  rng = np.random.default_rng(100)
  data_dir = "fgvc-aircraft-2013b/data/"
  members = {data_dir + "variants.txt": ("\n".join(AIRCRAFT_VARIANTS) + "\n").encode()}
  expected = {"trainval": [], "test": []}
  tables = {"trainval": [], "test": []}
  for i, (label, split) in enumerate([(0, "trainval"), (3, "trainval"),
                                      (3, "test"), (99, "test"), (50, "trainval")]):
    image_id = f"{1000000 + 37 * i:07d}"
    data = jpeg(image_array(rng, 48 + i, 40))
    members[f"{data_dir}images/{image_id}.jpg"] = data
    tables[split].append(f"{image_id} {AIRCRAFT_VARIANTS[label]}")
    expected[split].append((label, image_id, decoded(data)))
  for split, lines in tables.items():
    members[f"{data_dir}images_variant_{split}.txt"] = ("\n".join(lines) + "\n").encode()
  write_tar(os.path.join(manual_dir, "fgvc-aircraft-2013b.tar.gz"), members)
  return expected


def sop(manual_dir: str) -> dict[str, list[tuple[int, int, np.ndarray]]]:
  """Stanford_Online_Products.zip; returns {split: [(class_id, super, pixels)]}."""
  rng = np.random.default_rng(12)
  root = "Stanford_Online_Products/"
  rows = {"train": [(1, 1), (1, 1), (2, 5), (11318, 12)],
          "test": [(11319, 3), (22634, 12), (22634, 12)]}
  expected = {"train": [], "test": []}
  with zipfile.ZipFile(os.path.join(manual_dir, "Stanford_Online_Products.zip"),
                       "w") as archive:
    image_id = 0
    for split, entries in rows.items():
      lines = ["image_id class_id super_class_id path"]
      for class_id, super_class in entries:
        image_id += 1
        path = f"kind{super_class}_final/{class_id}_{image_id}.JPG"
        data = jpeg(image_array(rng, 16 + image_id, 20))
        archive.writestr(root + path, data)
        lines.append(f"{image_id} {class_id} {super_class} {path}")
        expected[split].append((class_id - 1, super_class - 1, decoded(data)))
      archive.writestr(f"{root}Ebay_{split}.txt", "\n".join(lines) + "\n")
  return expected


def imagenet(manual_dir: str, train_synsets: list[str], val_numbers: list[int]
             ) -> dict[str, list[tuple[str, str, np.ndarray]]]:
  """ILSVRC2012_img_train.tar (tar of per-class tars) and ILSVRC2012_img_val.tar.

  Returns {split: [(synset or val number, file name, RGB pixels)]}; images
  are 64x96 so a 32x32 box filter averages exact 2x3 blocks.
  """
  rng = np.random.default_rng(1000)
  outer, expected = {}, {"train": [], "validation": []}
  for synset in train_synsets:
    inner = {}
    for k in range(2):
      name = f"{synset}_{k + 10}.JPEG"
      data = jpeg(image_array(rng, 64, 96))
      inner[name] = data
      expected["train"].append((synset, name, decoded(data)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
      for name, data in inner.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    outer[f"{synset}.tar"] = buffer.getvalue()
  write_tar(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), outer)
  val = {}
  for n in val_numbers:
    name = f"ILSVRC2012_val_{n:08d}.JPEG"
    val[name] = jpeg(image_array(rng, 64, 96, grey=n % 2 == 0))
    expected["validation"].append((n, name, decoded(val[name])))
  write_tar(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), val)
  return expected
