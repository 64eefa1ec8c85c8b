"""configs/paper/finegrained.py: the recipe, its variants, and its :tiny variant end to
end on a CUB archive fabricated in the official layout, prepared by the real builder."""
import os
import warnings

from flax import serialization
import jax
import numpy as np
import pytest

from fanas_jax.configs.paper import finegrained
from fanas_jax import config_checks, experiment
from fanas_jax.data import prepare
from fanas_jax.genotype import named_genotype
from fanas_jax.model import make_model
from fanas_jax.steps import init_variables
from fanas_jax.train import FINAL_VARIABLES, load_final_variables
from tests import fake_archives


def test_the_recipe_and_its_variants():
  c = finegrained.get_config()
  assert (c.dataset, c.stages, c.image_size, c.model.stem) == (
      "caltech_birds2011", "finetune", 224, "conv")
  f = c.finetune
  assert (f.split, f.eval_split, f.epochs, f.batch_size, f.lr, f.head_lr_mult) == (
      "train", "test", 100, 32, 0.01, 10.0)
  assert f.random_resized_crop and f.flip and f.eval_resize == "shorter_side"
  assert f.eval_resize_size == 256
  big = finegrained.get_config("aircraft,448")
  assert (big.dataset, big.finetune.split, big.image_size, big.finetune.eval_resize_size) == (
      "fgvc_aircraft", "trainval", 448, 512)
  assert finegrained.get_config("cars").dataset == "cars196"
  with pytest.raises(ValueError, match="choose one dataset of cub, cars, aircraft"):
    finegrained.get_config("cub,cars")
  with pytest.raises(config_checks.ConfigError, match="finetune.pretrained is empty"):
    config_checks.validate(finegrained.get_config("tiny"))


@pytest.mark.slow
def test_tiny_fine_tunes_imagenet_shaped_weights_on_cub(tmp_path):
  manual, data_dir = tmp_path / "manual", tmp_path / "data"
  manual.mkdir()
  expected = fake_archives.cub(str(manual))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The tiny archive is not the official one.
    prepare.prepare("caltech_birds2011", str(manual), str(data_dir))
  # An ImageNet-shaped network (conv stem, RGB, 1000 classes) stands in for the weights.
  source = make_model(named_genotype("original").layer_ops(), 16, "classifier",
                      stem="conv", num_classes=1000)
  pretrained = jax.tree.map(np.asarray, init_variables(source, jax.random.key(0),
                                                       (1, 32, 32, 3)))
  path = tmp_path / FINAL_VARIABLES
  path.write_bytes(serialization.to_bytes(pretrained))

  config = finegrained.get_config("tiny")
  config.data_dir = str(data_dir)
  config.finetune.pretrained = str(path)
  result = experiment.run(config, str(tmp_path / "run"))["finetune"]
  assert result["test_examples"] == len(expected["test"])
  assert result["width"] == 16 and result["pretrained"] == str(path)
  assert 0.0 <= result["test_top1"] <= 1.0
  tuned = load_final_variables(str(tmp_path / "run"), "finetune")
  assert tuned["params"]["task_head"]["Dense_0"]["kernel"].shape == (64, 200)
  assert os.path.exists(tmp_path / "run" / "summary.md")
