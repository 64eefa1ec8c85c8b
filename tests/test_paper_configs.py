"""The paper's datasets and configs (configs/paper/*.py), run end to end at :tiny
sizes on fabricated data in the datasets' own TFDS format (tests/fake_tfds.py)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fanas_jax.configs import default
from fanas_jax.configs.paper import cifar_search, cifar_train, imagenet_train
from fanas_jax import config_checks, experiment
from fanas_jax.builders import Builder
from fanas_jax.data import datasets, pipeline
from fanas_jax.data.datasets import stage_dataset
from fanas_jax.genotype import DeriveLimits, Genotype, named_genotype
from tests import fake_tfds


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return fake_tfds.write(str(tmp_path_factory.mktemp("paper_tfds")))


# The fakes are the real datasets' format.


@pytest.mark.parametrize("fake", [fake_tfds.Cifar10, fake_tfds.Imagenet2012])
def test_fakes_have_the_real_tfds_name_version_and_features(fake, tmp_path):
  real = tfds.builder_cls(fake.name)
  assert fake.VERSION == real.VERSION
  mine = fake(data_dir=str(tmp_path)).info.features
  theirs = real(data_dir=str(tmp_path)).info.features
  assert set(mine.keys()) == set(theirs.keys())
  for key in theirs.keys():
    assert type(mine[key]) is type(theirs[key]), key
    assert mine[key].shape == theirs[key].shape
    assert mine[key].np_dtype == theirs[key].np_dtype
  assert mine["label"].num_classes == theirs["label"].num_classes
  assert mine["image"].encoding_format == theirs["image"].encoding_format


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012", "imagenet100_32"])
def test_registered_specs_read_the_fakes(data_dir, name):
  spec = datasets.get_dataset(name)
  train_split, test_split = spec.splits
  ds = pipeline.load_split(name, train_split, data_dir)
  assert len(ds) == fake_tfds.SIZES[name][0]
  record = ds[3]
  assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
  if spec.native_size:
    assert record["image"].shape[:2] == (spec.native_size,) * 2
  assert 0 <= record["label"] < spec.num_classes
  assert len(pipeline.load_split(name, test_split, data_dir)) == fake_tfds.SIZES[name][1]


def test_dataset_statistics():
  cifar = datasets.get_dataset("cifar10")
  assert cifar.mean == (0.49139968, 0.48215827, 0.44653124)
  assert cifar.std == (0.24703233, 0.24348505, 0.26158768)
  for name in ("imagenet2012", "imagenet100_32"):
    spec = datasets.get_dataset(name)
    assert (spec.mean, spec.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert (datasets.get_dataset("imagenet2012").num_classes,
          datasets.get_dataset("imagenet100_32").num_classes) == (1000, 100)


def test_unprepared_dataset_fails_in_one_line_naming_dir(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    pipeline.load_split("imagenet2012", "train", str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert re.search(r"Dataset 'imagenet2012' 5\.1\.0 is not prepared in .*imagenet2012/"
                   r"5\.1\.0: it must be prepared first", message)
  assert str(tmp_path) in message


def test_bad_split_of_a_registered_dataset_lists_the_splits(data_dir):
  with pytest.raises(ValueError, match=r"split='val' is not a split of dataset "
                     r"'imagenet2012'; valid splits: train, validation"):
    pipeline.load_split("imagenet2012", "val", data_dir)


def test_stage_dataset_falls_back_to_the_top_level_dataset():
  c = cifar_search.get_config()
  assert datasets.stage_dataset(c, "search_phase1") == "imagenet100_32"
  assert datasets.stage_dataset(c, "search_phase2") == "cifar10"
  assert datasets.stage_dataset(default.get_config(), "train") == "sklearn_digits"


@pytest.mark.parametrize("key,value,message", [
    ("search_phase1.dataset", "imagenet_typo",
     r"^Unknown dataset 'imagenet_typo' \(config key search_phase1\.dataset\); valid "
     r"choices: .*imagenet100_32"),
    ("search_phase2.split", "validation",
     r"^search_phase2\.split='validation' is not a split of dataset 'cifar10'"),
    ("search_phase1.resize", "fit", r"^search_phase1\.resize='fit' is not one of"),
])
def test_bad_stage_data_fails_before_compute(data_dir, key, value, message):
  c = cifar_search.get_config("tiny")
  c.data_dir = data_dir
  stage, field = key.split(".")
  c[stage][field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(c)


def test_unprepared_stage_dataset_fails_before_compute(tmp_path):
  c = cifar_search.get_config("tiny")
  c.data_dir = str(tmp_path)
  with pytest.raises(config_checks.ConfigError,
                     match=r"^Dataset 'imagenet100_32' 1\.0\.0 is not prepared in "):
    config_checks.validate(c)


def test_paper_recipes():
  search, train, imagenet = (cifar_search.get_config(), cifar_train.get_config(),
                             imagenet_train.get_config())
  p1, p2 = search.search_phase1, search.search_phase2
  assert (p1.resize, p1.resize_size, p1.flip, p1.crop_padding) == ("shorter_side", 40,
                                                                   True, 0)
  assert (p2.resize, p2.crop_padding, p2.flip) == ("stretch", 4, True)
  assert p1.w_lr_min == p2.w_lr_min == 0.0 and search.derive.rule == "constrained"
  t = train.train
  assert (t.width, t.epochs, t.batch_size, t.warmup_epochs, t.lr_min_factor, t.dropout,
          t.crop_padding, t.flip, t.genotype) == (96, 500, 56, 20, 1e-4, 0.5, 4, True,
                                                  "original")
  i = imagenet.train
  assert (imagenet.model.stem, imagenet.image_size, i.width, i.epochs, i.batch_size,
          i.weight_decay, i.label_smoothing, i.dropout, i.warmup_epochs,
          i.lr_min_factor) == ("conv", 224, 112, 200, 58, 3e-5, 0.1, 0.25, 0, 0.0)
  assert (i.random_resized_crop, i.flip, tuple(i.color_jitter), i.eval_resize,
          i.eval_resize_size) == (True, True, (0.4, 0.4, 0.4, 0.2), "shorter_side", 256)
  assert cifar_train.get_config("searched").stages == (
      "search_phase1,search_phase2,derive,train")
  with pytest.raises(ValueError, match="valid choices: original, searched, tiny"):
    cifar_train.get_config("big")


# End to end, :tiny.


class ReadingBuilder(Builder):
  """Records (dataset, split) of every split a stage loads."""
  seen: list[tuple[str, str]] = []

  def load_split(self, stage, split, *args, **kwargs):
    self.seen.append((stage_dataset(self.config, stage), split))
    return super().load_split(stage, split, *args, **kwargs)


@pytest.fixture
def reads():
  """(dataset, split) of every split the run loads."""
  ReadingBuilder.seen = []
  yield ReadingBuilder.seen


def _run(config, data_dir, workdir):
  config.data_dir = data_dir
  return experiment.run(config, str(workdir), builder=ReadingBuilder)


def test_cifar_search_tiny_runs_both_phases_on_their_datasets(data_dir, tmp_path, reads):
  results = _run(cifar_search.get_config("tiny"), data_dir, tmp_path)
  assert sorted(reads) == sorted([("imagenet100_32", "train"), ("cifar10", "train")])
  record = json.load(open(os.path.join(tmp_path, "genotype.json")))
  assert record["rule"] == "constrained" and record["from_stage"] == "search_phase2"
  genotype = Genotype.from_dict(record["genotype"])
  genotype.check_limits(DeriveLimits(1, 1))
  assert all(op in ("local3_h4", "nonlocal")
             for ops in genotype.stages for op in ops)
  assert results["derive"]["genotype"] == genotype.to_dict()
  assert np.isfinite(results["search_phase1"]["final_w_loss"])
  assert np.isfinite(results["search_phase2"]["final_a_loss"])


def test_cifar_train_tiny_trains_the_original_genotype(data_dir, tmp_path, reads):
  results = _run(cifar_train.get_config("tiny"), data_dir, tmp_path)
  assert sorted(reads) == sorted([("cifar10", "train"), ("cifar10", "test")])
  train = results["train"]
  assert train["genotype"] == named_genotype("original").to_dict()
  assert train["test_examples"] == fake_tfds.SIZES["cifar10"][1]
  assert 0.0 <= train["test_top1"] <= 1.0 and train["width"] == 16


def test_imagenet_train_tiny_trains_on_imagenet_format(data_dir, tmp_path, reads):
  results = _run(imagenet_train.get_config("tiny"), data_dir, tmp_path)
  assert sorted(reads) == sorted([("imagenet2012", "train"), ("imagenet2012", "validation")])
  train = results["train"]
  assert train["test_examples"] == fake_tfds.SIZES["imagenet2012"][1]
  assert 0.0 <= train["test_top1"] <= 1.0
  metrics = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  losses = [m["loss"] for m in metrics if "loss" in m]
  # Label smoothing 0.1 over 1000 classes: the loss at init is about log(1000).
  assert losses and all(np.isfinite(losses)) and 5.0 < losses[0] < 9.0
