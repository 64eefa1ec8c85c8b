"""The TF-free builders of the paper's datasets, on tiny archives in the official
layout (tests/fake_archives.py), read back through the real input pipeline."""
from __future__ import annotations

import gzip
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fanas_jax.configs import default
from fanas_jax.builders import Builder
from fanas_jax.data import archives, cifar, datasets, imagenet, pipeline, prepare
from fanas_jax.data.archives import ArchiveError
from tests import fake_archives

_FEATURE_MATCHES = {  # dataset -> TFDS features it leaves out
    "cifar10": set(), "cifar100": set(), "imagenet2012": set(),
    "stanford_online_products": set(), "cars196": {"bbox"},
    "caltech_birds2011": {"bbox", "segmentation_mask"}}


def _build(tmp_path_factory, name: str, write) -> tuple[str, object]:
  manual = str(tmp_path_factory.mktemp(f"{name}_manual"))
  expected = write(manual)
  data_dir = str(tmp_path_factory.mktemp(f"{name}_data"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Tiny archives differ from the official ones.
    prepare.prepare(name, manual, data_dir)
  return data_dir, expected


def _records(name: str, split: str, data_dir: str) -> list[dict]:
  ds = pipeline.load_split(name, split, data_dir)
  return [ds[i] for i in range(len(ds))]


def _raw(name: str, split: str, data_dir: str) -> list[dict]:
  spec = datasets.get_dataset(name)
  source = tfds.data_source(f"{name}:{spec.tfds_version}", split=split,
                            data_dir=data_dir, download=False)
  return [source[i] for i in range(len(source))]


def _assert_same_pixels(got: np.ndarray, want: np.ndarray, exact: bool) -> None:
  assert got.shape == want.shape and got.dtype == np.uint8
  diff = np.abs(got.astype(int) - want.astype(int))
  if exact:
    assert diff.max() == 0
  else:  # Re-encoded once as JPEG quality 95.
    assert diff.mean() < 2.0


# Every builder keeps TFDS's name, version and feature keys.


@pytest.mark.parametrize("name", sorted(_FEATURE_MATCHES))
def test_builders_have_tfds_name_version_and_features(name, tmp_path):
  mine = prepare.BUILDERS.get(name)
  theirs = tfds.builder_cls(name)
  assert mine.name == name and mine.VERSION == theirs.VERSION
  assert datasets.get_dataset(name).tfds_version == str(theirs.VERSION)
  my_features = mine(data_dir=str(tmp_path)).info.features
  their_features = theirs(data_dir=str(tmp_path)).info.features
  assert set(their_features.keys()) - set(my_features.keys()) == _FEATURE_MATCHES[name]
  assert set(my_features.keys()) <= set(their_features.keys())
  for key in my_features.keys():
    assert type(my_features[key]) is type(their_features[key]), key
    assert my_features[key].shape == their_features[key].shape, key


# CIFAR.


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
  return _build(tmp_path_factory, "cifar10",
                lambda d: fake_archives.cifar(d, hundred=False))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _in_source_order(name: str, split: str, data_dir: str) -> list[tuple[dict, dict]]:
  """(raw record, pipeline record) pairs sorted by CIFAR's 'id' (source order).

  TFDS stores records in the order of their keys' hashes, TFDS's own copies too.
  """
  pairs = zip(_raw(name, split, data_dir), _records(name, split, data_dir))
  return sorted(pairs, key=lambda pair: _text(pair[0]["id"]))


def test_cifar10_round_trip(cifar10):
  data_dir, expected = cifar10
  for split, n in (("train", 20), ("test", 4)):
    images, labels, _ = expected[split]
    pairs = _in_source_order("cifar10", split, data_dir)
    assert len(pairs) == n == len(labels)
    assert [_text(raw["id"]) for raw, _ in pairs] == [
        f"{split}_{i:05d}" for i in range(n)]
    np.testing.assert_array_equal([r["label"] for _, r in pairs], labels)
    np.testing.assert_array_equal(np.stack([r["image"] for _, r in pairs]), images)
  info = tfds.builder("cifar10", data_dir=data_dir).info
  assert info.features["label"].names == [f"name{i}" for i in range(10)]


def test_cifar100_fine_and_coarse_labels(tmp_path_factory):
  data_dir, expected = _build(tmp_path_factory, "cifar100",
                              lambda d: fake_archives.cifar(d, hundred=True))
  _, fine, coarse = expected["train"]
  pairs = _in_source_order("cifar100", "train", data_dir)
  np.testing.assert_array_equal([r["label"] for _, r in pairs], fine)
  np.testing.assert_array_equal([raw["coarse_label"] for raw, _ in pairs], coarse)
  pairs = _in_source_order("cifar100", "test", data_dir)
  np.testing.assert_array_equal(np.stack([r["image"] for _, r in pairs]),
                                expected["test"][0])
  names = tfds.builder("cifar100", data_dir=data_dir).info.features
  assert names["coarse_label"].names[19] == "coarse19"


class _Boom:
  def __reduce__(self):
    return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
  payload = pickle.dumps({b"data": _Boom()}, protocol=2)
  with pytest.raises(ArchiveError, match=r"^Unreadable CIFAR pickle X: refusing "
                     r"(posix|nt)\.system"):
    cifar.load_pickle(payload, "X")
  good = pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=2)
  np.testing.assert_array_equal(cifar.load_pickle(good, "X")["data"], np.arange(6))


def test_malicious_batch_in_tarball_fails_naming_member(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  members = {"cifar-10-batches-py/batches.meta": pickle.dumps(
      {b"label_names": [b"a%d" % i for i in range(10)]}, protocol=2)}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    members["cifar-10-batches-py/" + name] = pickle.dumps({b"data": _Boom()}, 2)
  fake_archives.write_tar(str(tmp_path / "cifar-10-python.tar.gz"), members)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ArchiveError, match=r"cifar-10-python\.tar\.gz:cifar-10-"
                       r"batches-py/data_batch_1: refusing"):
      prepare.prepare("cifar10", str(tmp_path), str(tmp_path / "data"))
  assert not (tmp_path / "pwned").exists()


# Fine-grained and retrieval datasets.


def test_caltech_birds_splits_labels_and_pixels(tmp_path_factory):
  data_dir, expected = _build(tmp_path_factory, "caltech_birds2011",
                              fake_archives.cub)
  for split in ("train", "test"):
    raw = {_text(r["image/filename"]): r
           for r in _raw("caltech_birds2011", split, data_dir)}
    records = _records("caltech_birds2011", split, data_dir)
    assert len(records) == len(raw) == len(expected[split])
    for label, member, pixels in expected[split]:
      got = raw[member]
      assert got["label"] == label
      assert _text(got["label_name"]) == f"bird_number_{label + 1}"
      _assert_same_pixels(np.asarray(got["image"]), pixels,
                          exact="_0003_" not in member)  # image 3 is grey
  assert len(expected["train"]) == 3 and len(expected["test"]) == 3
  names = prepare.BUILDERS.get("caltech_birds2011")(data_dir=data_dir).info.features
  assert names["label"].names[149] == "Bird_Number_150"


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
  return _build(tmp_path_factory, "cars196", fake_archives.cars)


def test_cars_splits_labels_and_pixels(cars):
  data_dir, expected = cars
  for split in ("train", "test"):
    records = _records("cars196", split, data_dir)
    raw = _raw("cars196", split, data_dir)
    assert len(records) == len(expected[split])
    by_id = {_text(r["id"]): (r, p)
             for r, p in zip(raw, records)}
    for label, stem, pixels in expected[split]:
      record, read = by_id[stem]
      assert record["label"] == read["label"] == label
      _assert_same_pixels(read["image"], pixels, exact=stem != "000003")
  names = prepare.BUILDERS.get("cars196")(data_dir=data_dir).info.features["label"].names
  assert names[195] == "Maker Model 195 2012"


def test_stages_read_a_prepared_dataset_through_the_builder(cars, tmp_path):
  data_dir, expected = cars
  config = default.get_config()
  config.dataset, config.data_dir, config.image_size = "cars196", data_dir, 16
  config.eval_batch_size = 4
  builder = Builder(config, str(tmp_path))
  ds = builder.load_split("train", "test")
  batches = list(builder.eval_batches("train", ds))
  images = np.concatenate([b["image"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  assert images.shape[1:] == (16, 16, 3) and mask.sum() == len(expected["test"])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert sorted(labels.tolist()) == sorted(label for label, _, _ in expected["test"])


def test_aircraft_crops_the_banner(tmp_path_factory):
  data_dir, expected = _build(tmp_path_factory, "fgvc_aircraft",
                              fake_archives.aircraft)
  assert datasets.get_dataset("fgvc_aircraft").splits == ("trainval", "test")
  for split in ("trainval", "test"):
    raw = _raw("fgvc_aircraft", split, data_dir)
    records = _records("fgvc_aircraft", split, data_dir)
    assert len(records) == len(expected[split])
    by_id = {_text(r["id"]): (r, p)
             for r, p in zip(raw, records)}
    for label, image_id, full in expected[split]:
      record, read = by_id[image_id]
      assert read["label"] == label
      assert read["image"].shape == (full.shape[0] - 20, full.shape[1], 3)
      _assert_same_pixels(read["image"], full[:-20], exact=False)
  info = prepare.BUILDERS.get("fgvc_aircraft")(data_dir=data_dir).info
  names = info.features["label"].names
  assert names == fake_archives.AIRCRAFT_VARIANTS


def test_sop_keeps_class_and_super_class(tmp_path_factory):
  data_dir, expected = _build(tmp_path_factory, "stanford_online_products",
                              fake_archives.sop)
  for split in ("train", "test"):
    raw = _raw("stanford_online_products", split, data_dir)
    records = _records("stanford_online_products", split, data_dir)
    assert len(records) == len(expected[split])
    got = sorted((int(r["class_id"]), int(r["super_class_id/num"]),
                  int(r["super_class_id"])) for r in raw)
    assert got == sorted((c, s, s) for c, s, _ in expected[split])
    want = sorted((c, p.tobytes()) for c, _, p in expected[split])
    assert sorted((r["label"], r["image"].tobytes()) for r in records) == want
  kept = pipeline.load_split("stanford_online_products", "test", data_dir,
                             classes=[22633])
  assert len(kept) == 2 and all(kept[i]["label"] == 22633 for i in range(2))


# ImageNet.


@pytest.fixture(scope="module")
def imagenet_archives(tmp_path_factory):
  truth = imagenet.validation_synsets()
  cmc = set(imagenet.CMC_IMAGENET100)
  in_cmc = [n for n in range(1, len(truth) + 1) if truth[n - 1] in cmc][:2]
  out = [n for n in range(1, 40) if truth[n - 1] not in cmc][:2]
  manual = str(tmp_path_factory.mktemp("imagenet_manual"))
  synsets = ["n01440764", imagenet.CMC_IMAGENET100[0], imagenet.CMC_IMAGENET100[5]]
  return manual, fake_archives.imagenet(manual, synsets, sorted(in_cmc + out)), truth


def _prepare_from(manual: str, name: str, data_dir: str) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    prepare.prepare(name, manual, data_dir)


def test_imagenet2012_labels_follow_tfds(imagenet_archives, tmp_path):
  manual, expected, truth = imagenet_archives
  _prepare_from(manual, "imagenet2012", str(tmp_path))
  synsets = imagenet.synsets()
  assert len(synsets) == 1000 and synsets == sorted(synsets)
  train = {_text(r["file_name"]): r
           for r in _raw("imagenet2012", "train", str(tmp_path))}
  assert len(train) == 6
  for synset, name, pixels in expected["train"]:
    record = train[name]
    assert record["label"] == synsets.index(synset)
    _assert_same_pixels(np.asarray(record["image"]), pixels, exact=True)
  val = _records("imagenet2012", "validation", str(tmp_path))
  assert sorted(r["label"] for r in val) == sorted(
      synsets.index(truth[n - 1]) for n, _, _ in expected["validation"])
  assert all(r["image"].shape[-1] == 3 for r in val)  # grey ones made RGB


def test_imagenet100_32_is_the_cmc_subset_box_downsampled(imagenet_archives, tmp_path):
  manual, expected, truth = imagenet_archives
  _prepare_from(manual, "imagenet100_32", str(tmp_path))
  classes = sorted(imagenet.CMC_IMAGENET100)
  assert len(set(classes)) == 100
  train = _records("imagenet100_32", "train", str(tmp_path))
  want = [(s, p) for s, _, p in expected["train"] if s in classes]
  assert len(train) == len(want) == 4
  for synset, pixels in want:
    box = pixels.reshape(32, 2, 32, 3, 3).astype(np.float64).mean(axis=(1, 3))
    match = [r for r in train if np.abs(r["image"] - box).max() <= 1.0]
    assert len(match) == 1 and match[0]["label"] == classes.index(synset)
  val = _records("imagenet100_32", "validation", str(tmp_path))
  assert sorted(r["label"] for r in val) == sorted(
      classes.index(truth[n - 1]) for n, _, _ in expected["validation"]
      if truth[n - 1] in classes)
  assert len(val) == 2


# Bad input: one line naming the file or member.


def test_missing_archive_names_file_url_and_dir(tmp_path, capsys):
  with pytest.raises(ArchiveError) as info:
    prepare.prepare("caltech_birds2011", str(tmp_path), str(tmp_path / "data"))
  message = str(info.value)
  assert "\n" not in message
  assert message == (f"Missing CUB_200_2011.tgz for dataset 'caltech_birds2011': "
                     "download it from https://data.caltech.edu/records/65de6-vp158/"
                     f"files/CUB_200_2011.tgz and put it in {tmp_path}/")
  assert prepare.main(["cars196", f"--manual_dir={tmp_path}"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: Missing car_ims.tgz for dataset 'cars196': ")
  assert "\n" not in err and "car_ims.tgz and put it in" in err
  (tmp_path / "Stanford_Online_Products.zip").write_bytes(b"x")
  assert prepare.main(["stanford_online_products", f"--manual_dir={tmp_path}",
                       f"--data_dir={tmp_path / 'data'}"]) == 1
  assert capsys.readouterr().err.splitlines() == [
      f"warning: {tmp_path}/Stanford_Online_Products.zip: size 1 bytes differs from "
      "the official Stanford_Online_Products.zip (3083860082 bytes).",
      f"error: Corrupt archive {tmp_path}/Stanford_Online_Products.zip: File is not "
      "a zip file"]


def test_prepare_command_says_where_the_files_went(cars, tmp_path, capsys):
  data_dir, _ = cars
  manual = str(tmp_path / "manual")
  os.makedirs(manual)
  fake_archives.cars(manual)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert prepare.main(["cars196", f"--manual_dir={manual}",
                         f"--data_dir={data_dir}"]) == 0
  out = capsys.readouterr().out.strip()
  assert out == (f"[data] cars196 2.1.0 is in {data_dir}/cars196/2.1.0 "
                 "(test 3, train 3)")


def test_unknown_dataset_lists_the_builders(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown preparable dataset 'cub' "
                     r"\(config key NAME\); valid choices: caltech_birds2011, "
                     r"cars196, cifar10, cifar100, fgvc_aircraft, imagenet100_32"):
    prepare.prepare("cub", str(tmp_path))


def test_truncated_archive_names_the_file(tmp_path):
  fake_archives.cars(str(tmp_path))
  path = tmp_path / "car_ims.tgz"
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) // 2])  # inside a member
  with pytest.raises(ArchiveError, match=r"^Corrupt or truncated archive "
                     f"{re.escape(str(path))}: "):
    _prepare_from(str(tmp_path), "cars196", str(tmp_path / "data"))
  path.write_bytes(whole[:-300])  # at a member boundary: tar sees an early end
  with pytest.raises(ArchiveError, match=f"^Archive {re.escape(str(path))} has no "
                     r"member car_ims/0000\d\d\.jpg \(truncated, or not the official"):
    _prepare_from(str(tmp_path), "cars196", str(tmp_path / "data"))
  path.write_bytes(b"not a tar at all")
  with pytest.raises(ArchiveError, match=f"archive {re.escape(str(path))}"):
    list(archives.iter_tar(str(path)))


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_corrupt_image_member_is_named(tmp_path):
  fake_archives.sop(str(tmp_path))
  zip_path = tmp_path / "Stanford_Online_Products.zip"
  with zipfile.ZipFile(zip_path, "a") as archive:
    archive.writestr("Stanford_Online_Products/kind1_final/1_1.JPG", b"\xff\xd8junk")
  with pytest.raises(ArchiveError) as info:
    _prepare_from(str(tmp_path), "stanford_online_products", str(tmp_path / "d"))
  message = str(info.value)
  assert "\n" not in message and message.startswith(
      f"Corrupt image {zip_path}:Stanford_Online_Products/kind1_final/1_1.JPG: ")


def _replace_member(path: str, member: str, data: bytes) -> None:
  members = dict(archives.iter_tar(path))
  assert member in members
  fake_archives.write_tar(path, {**members, member: data})


def test_corrupt_image_in_a_tar_is_named(tmp_path):
  expected = fake_archives.cub(str(tmp_path))
  path = str(tmp_path / "CUB_200_2011.tgz")
  member = expected["test"][0][1]
  _replace_member(path, member, b"\xff\xd8\xff\xe0 truncated jpeg")
  with pytest.raises(ArchiveError, match=f"^Corrupt image {re.escape(path)}:"
                     f"{re.escape(member)}: "):
    _prepare_from(str(tmp_path), "caltech_birds2011", str(tmp_path / "d"))


def test_corrupt_image_in_a_nested_imagenet_tar_is_named(tmp_path):
  fake_archives.imagenet(str(tmp_path), ["n01440764"], [1])
  path = str(tmp_path / "ILSVRC2012_img_train.tar")
  inner = fake_archives.write_tar(str(tmp_path / "inner.tar"),
                                  {"n01440764_10.JPEG": b"not a jpeg"})
  with open(inner, "rb") as f:
    _replace_member(path, "n01440764.tar", f.read())
  with pytest.raises(ArchiveError, match=f"^Corrupt image {re.escape(path)}:"
                     r"n01440764\.tar:n01440764_10\.JPEG: "):
    _prepare_from(str(tmp_path), "imagenet2012", str(tmp_path / "d"))


def test_corrupt_annotation_is_named(tmp_path):
  (tmp_path / "cars_annos.mat").write_bytes(gzip.compress(b"garbage"))
  fake_archives.write_tar(str(tmp_path / "car_ims.tgz"), {})
  with pytest.raises(ArchiveError, match=r"^Unreadable annotation file .*cars_annos\.mat"):
    _prepare_from(str(tmp_path), "cars196", str(tmp_path / "d"))


def test_size_or_checksum_mismatch_warns_naming_file(tmp_path):
  path = tmp_path / "a.bin"
  path.write_bytes(b"abc")
  with pytest.warns(UserWarning, match=r"a\.bin: size 3 bytes differs from the "
                    r"official a\.bin \(4 bytes\)"):
    archives.verify(str(path), archives.Archive("a.bin", "u", size=4))
  with pytest.warns(UserWarning, match=r"a\.bin: SHA-256 differs"):
    archives.verify(str(path), archives.Archive("a.bin", "u", 3, "0" * 64))
  sha = archives.sha256_of(str(path))
  assert sha == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    archives.verify(str(path), archives.Archive("a.bin", "u", 3, sha))


def test_unprepared_dataset_names_the_prepare_command(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    pipeline.load_split("cars196", "train", str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert (f"`python -m fanas_jax.data.prepare cars196 --manual_dir=DIR_OF_ARCHIVES "
          f"--data_dir={tmp_path}`") in message
