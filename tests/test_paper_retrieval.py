"""configs/paper/retrieval.py: the benchmarks' protocols, and each :tiny variant end to
end from ImageNet-shaped weights on archives fabricated in the official layouts
(CUB, Cars, SOP), prepared by the real builders and read by the real pipeline."""
import os
import warnings

from flax import serialization
import jax
import numpy as np
import pytest

from fanas_jax.configs.paper import retrieval as paper_retrieval
from fanas_jax import experiment
from fanas_jax.config_checks import validate
from fanas_jax.data import pipeline, prepare
from fanas_jax.finetune import FREEZABLE
from fanas_jax.genotype import named_genotype
from fanas_jax.model import make_model
from fanas_jax.registry import ConfigError
from fanas_jax.steps import init_variables
from fanas_jax.train import FINAL_VARIABLES, load_final_variables
from tests import fake_archives


def test_the_protocols_and_the_variants():
  cub = paper_retrieval.get_config()
  r = cub.retrieval
  assert (cub.dataset, cub.stages, cub.image_size, cub.model.stem) == (
      "caltech_birds2011", "retrieval", 224, "conv")
  assert r.train_classes == tuple(range(100)) and r.test_classes == tuple(range(100, 200))
  assert (r.split, r.eval_split, r.recall_ks, r.embed_dim, r.loss) == (
      "train+test", "train+test", (1, 2, 4, 8), 512, "proxy_anchor")
  assert (r.pa_alpha, r.pa_margin, r.freeze_bn, r.eval_resize_size) == (32.0, 0.1, True, 256)
  cars = paper_retrieval.get_config("cars").retrieval
  assert cars.train_classes == tuple(range(98)) and cars.test_classes == tuple(range(98, 196))
  sop = paper_retrieval.get_config("sop")
  assert sop.dataset == "stanford_online_products"
  assert (sop.retrieval.split, sop.retrieval.eval_split) == ("train", "test")
  assert len(sop.retrieval.train_classes) == 11318 and len(sop.retrieval.test_classes) == 11316
  assert sop.retrieval.recall_ks == (1, 10, 100, 1000) and not sop.retrieval.freeze_bn
  assert paper_retrieval.get_config("cars,multi_similarity").retrieval.loss == (
      "multi_similarity")
  with pytest.raises(ValueError, match="Unknown retrieval variant 'dogs'; valid choices: "
                     "cub, cars, sop, multi_similarity, tiny"):
    paper_retrieval.get_config("dogs")
  with pytest.raises(ValueError, match="choose one benchmark of cub, cars, sop"):
    paper_retrieval.get_config("cub,sop")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The three benchmarks' fabricated archives, prepared; and ImageNet-shaped weights
  (conv stem, RGB, 1000 classes), moved off their init so no fresh init matches."""
  root = tmp_path_factory.mktemp("paper_retrieval")
  manual, data_dir = root / "manual", root / "data"
  manual.mkdir()
  expected = {"cub": fake_archives.cub(str(manual)), "cars": fake_archives.cars(str(manual)),
              "sop": fake_archives.sop(str(manual))}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The tiny archives are not the official ones.
    for dataset in paper_retrieval.DATASETS.values():
      prepare.prepare(dataset, str(manual), str(data_dir))
  source = make_model(named_genotype("original").layer_ops(), 16, "classifier",
                      stem="conv", num_classes=1000)
  rng = np.random.default_rng(0)
  pretrained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.01, x.shape).astype(
      np.float32), init_variables(source, jax.random.key(0), (1, 32, 32, 3)))
  path = root / FINAL_VARIABLES
  path.write_bytes(serialization.to_bytes(pretrained))
  return str(data_dir), str(path), pretrained, expected


def _config(benchmark, data, **keys):
  data_dir, path, _, _ = data
  config = paper_retrieval.get_config(f"{benchmark},tiny")
  config.data_dir = data_dir
  config.retrieval.pretrained = path
  config.retrieval.update(keys)
  return config


def _test_images(benchmark, expected, config):
  """How many fabricated images fall in the benchmark's test classes."""
  test_classes = set(config.retrieval.test_classes)
  return sum(label in test_classes for images in expected[benchmark].values()
             for label, *_ in images)


# cars also freezes every part, so its whole backbone must come out as it went in.
RUN_KEYS = {"cub": {}, "cars": dict(freeze=FREEZABLE), "sop": {}}


@pytest.fixture(scope="module", params=sorted(RUN_KEYS))
def run(request, data, tmp_path_factory):
  benchmark = request.param
  config = _config(benchmark, data, **RUN_KEYS[benchmark])
  workdir = str(tmp_path_factory.mktemp(f"run_{benchmark}"))
  result = experiment.run(config, workdir)["retrieval"]
  return benchmark, config, workdir, result


def _same(a, b):
  return jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.slow
def test_tiny_runs_end_to_end_from_the_pretrained_backbone(run, data):
  benchmark, config, workdir, result = run
  _, path, pretrained, expected = data
  assert result["test_examples"] == _test_images(benchmark, expected, config) == 3
  assert set(result["recall"]) == {"1", "2"}
  assert 0.0 <= result["recall"]["1"] <= result["recall"]["2"] <= 1.0
  assert 0.0 <= result["map_at_r"] <= 1.0 and 0.0 <= result["nmi"] <= 1.0
  assert result["width"] == 16 and result["pretrained"] == path
  assert result["train_classes"] == list(config.retrieval.train_classes)
  tuned = load_final_variables(workdir, "retrieval")
  head = tuned["params"]["task_head"]
  assert head["proxies"].shape == (len(config.retrieval.train_classes), 512)
  assert head["Dense_0"]["kernel"].shape == (64, 512)
  backbone = lambda v, c: v[c]["backbone"]
  # Frozen BN statistics (cub, cars) stay the pretrained ones; sop's move.
  assert _same(backbone(tuned, "batch_stats"), backbone(pretrained, "batch_stats")) == (
      benchmark != "sop")
  # Frozen parts (cars: all of them) do not move; otherwise the backbone trains.
  assert _same(backbone(tuned, "params"), backbone(pretrained, "params")) == (
      benchmark == "cars")
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "## zero-shot retrieval" in summary and f"trained from {path}" in summary


@pytest.mark.slow
def test_sop_trains_on_its_train_file_and_queries_its_test_file(data):
  data_dir, _, _, expected = data
  config = _config("sop", data)
  r = config.retrieval
  train = pipeline.load_split(config.dataset, r.split, data_dir, classes=r.train_classes)
  test = pipeline.load_split(config.dataset, r.eval_split, data_dir, classes=r.test_classes)
  assert len(train) == len(expected["sop"]["train"]) and len(test) == len(
      expected["sop"]["test"])
  assert sorted(test[i]["label"] for i in range(len(test))) == sorted(
      label for label, _, _ in expected["sop"]["test"])


@pytest.mark.slow
def test_mismatches_are_refused_before_compute(data, tmp_path):
  with pytest.raises(ConfigError, match=r"retrieval.recall_ks=\(1, 2, 4\): K=4 is larger "
                     r"than the test gallery, split 'train\+test' of classes 100..199 "
                     "holding 3 images"):
    experiment.run(_config("cub", data, recall_ks=(1, 2, 4)), str(tmp_path / "k"))
  attention = _config("cars", data)
  attention.model.stem = "attention"
  with pytest.raises(ConfigError, match=r"retrieval.pretrained=.* does not fit the "
                     r"configured network: params/backbone\['stem'\]"):
    experiment.run(attention, str(tmp_path / "stem"))
  bad = [(dict(pretrained="retrieval"), "retrieval.pretrained='retrieval' names this stage"),
         (dict(genotype="nope.json"), "no such genotype file"),
         (dict(pretrained="", freeze_bn=True), "retrieval.freeze and retrieval.freeze_bn "
          "keep pretrained weights"),
         (dict(freeze=("stage9",)), "retrieval.freeze='stage9' is not one of"),
         (dict(recall_ks=(0, 1)), "retrieval.recall_ks=(0, 1) must be Ks >= 1")]
  for keys, message in bad:
    with pytest.raises(ConfigError) as error:
      validate(_config("cub", data, **keys), str(tmp_path / "w"))
    assert message in str(error.value), keys
