"""train.init='supernet': the derived network starts from the chosen ops' supernet
weights of the search's last checkpoint; the rest starts fresh; mismatches refused."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fanas_jax.configs import quickstart
from fanas_jax import experiment, inherit
from fanas_jax.checkpoint import StageCheckpointer
from fanas_jax.config_checks import validate
from fanas_jax.genotype import SearchSpace, named_genotype
from fanas_jax.model import make_model
from fanas_jax.ops.layers import ORIGINAL_OPS
from fanas_jax.registry import ConfigError
from fanas_jax.steps import SearchState, init_variables
from fanas_jax.train import load_final_variables
from tests import small_genotype
from tests.test_model import _random_variables

SHAPE = (1, 8, 8, 1)
ORIGINAL = named_genotype("original")


def _supernet(candidates=tuple(ORIGINAL_OPS), num_classes=10, layers=3):
  space = SearchSpace.uniform(candidates, layers)
  model = make_model(space.layer_ops(), 16, "classifier", num_classes=num_classes)
  alphas = {k: jnp.zeros(v) for k, v in space.alpha_shapes().items()}
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(SHAPE), alphas)
  return _random_variables(shapes, 3), alphas


def _save_search(workdir, variables, alphas, step=12, genotype=ORIGINAL):
  """A search phase's checkpoint as the search stage leaves it, and its result."""
  stage_dir = os.path.join(workdir, "search_phase2")
  ckpt = StageCheckpointer(os.path.join(stage_dir, "checkpoints"))
  ckpt.save(step, SearchState(step=jnp.int32(step), params=variables["params"],
                              batch_stats=variables["batch_stats"], alphas=alphas,
                              w_opt_state={}, a_opt_state={}), {"position": step})
  ckpt.close()
  with open(os.path.join(stage_dir, "result.json"), "w") as f:
    json.dump({"genotype": genotype.to_dict()}, f)
  return stage_dir


def _leaves(tree):
  return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("search"))
  variables, alphas = _supernet()
  _save_search(workdir, variables, alphas)
  return workdir, variables


def test_at_step_0_the_chosen_ops_are_the_supernets_and_the_rest_is_fresh(search_run):
  workdir, supernet = search_run
  where = inherit.latest_checkpoint(os.path.join(workdir, "search_phase2"))
  assert where.endswith(os.path.join("checkpoints", "12"))
  derived = make_model(ORIGINAL.layer_ops(), 16, "classifier", num_classes=7)
  fresh = init_variables(derived, jax.random.key(5), SHAPE)
  start = inherit.start_from_supernet(inherit.read_supernet(where), where)(fresh)
  assert jax.tree.structure(start) == jax.tree.structure(fresh)
  for collection in ("params", "batch_stats"):
    old = _leaves(supernet[collection]["backbone"])
    for path, got in _leaves(start[collection]["backbone"]).items():
      name = jax.tree_util.keystr(path)
      if path in old:
        np.testing.assert_array_equal(got, old[path], err_msg=name)
      else:  # Only the affine scale and bias of the stage preprocess BN.
        assert "_pre_bn" in name and name.endswith(("['scale']", "['bias']")), name
        np.testing.assert_array_equal(got, _leaves(fresh[collection]["backbone"])[path])
  for s, ops in enumerate(ORIGINAL.stages):
    for l, op in enumerate(ops):
      name = f"stage{s + 1}_layer{l + 1}_{op}"
      assert jax.tree.all(jax.tree.map(np.array_equal, start["params"]["backbone"][name],
                                       supernet["params"]["backbone"][name])), name
  assert jax.tree.all(jax.tree.map(np.array_equal, start["params"]["task_head"],
                                   fresh["params"]["task_head"]))
  scale = start["params"]["backbone"]["stage1_pre_bn"]["scale"]
  assert np.array_equal(scale, np.ones_like(scale))
  # The copy is of the supernet, not of a fresh init that happens to agree.
  stem = lambda v: jax.tree.leaves(v["params"]["backbone"]["stem"])[0]
  assert not np.array_equal(stem(start), stem(fresh))


def test_a_width_an_op_or_a_source_that_does_not_fit_is_refused(search_run, tmp_path):
  workdir, _ = search_run
  where = inherit.latest_checkpoint(os.path.join(workdir, "search_phase2"))
  wide = make_model(ORIGINAL.layer_ops(), 32, "classifier", num_classes=7)
  fresh = jax.eval_shape(wide.init, jax.random.key(0), jnp.zeros(SHAPE))
  with pytest.raises(ConfigError, match=r"train.init='supernet': params/backbone\[.*\] is "
                     r"\(.*\) in the supernet in .*train.width must be the search's "
                     "model.width"):
    inherit.start_from_supernet(inherit.read_supernet(where), where)(fresh)
  variables, alphas = _supernet(candidates=("local3_h4", "local5_h4"))
  other = _save_search(str(tmp_path / "narrow"), variables, alphas)
  where = inherit.latest_checkpoint(other)
  derived = make_model(ORIGINAL.layer_ops(), 16, "classifier", num_classes=7)
  fresh = jax.eval_shape(derived.init, jax.random.key(0), jnp.zeros(SHAPE))
  with pytest.raises(ConfigError, match=r"has no params/backbone\['stage1_layer1_local7_h4'\]"
                     r".*among its candidates"):
    inherit.start_from_supernet(inherit.read_supernet(where), where)(fresh)
  with pytest.raises(ConfigError, match="holds no checkpoint of the supernet"):
    inherit.latest_checkpoint(str(tmp_path / "nothing"))


def _config(**train_keys):
  config = quickstart.get_config("tiny")
  config.stages = "train"
  config.train.update(dict({"genotype": "original"}, **train_keys))
  return config


def test_config_check_refuses_an_unknown_init_a_width_and_a_missing_search(tmp_path):
  with pytest.raises(ConfigError, match="train.init='warm' is not one of: scratch, supernet"):
    validate(_config(init="warm"))
  config = _config(init="supernet")
  config.train.width = 2 * config.model.width
  with pytest.raises(ConfigError, match=rf"train.width={config.train.width} must equal "
                     rf"model.width={config.model.width}"):
    validate(config)
  with pytest.raises(ConfigError, match="stage train needs supernet weights from "
                     "search_phase2 or search_phase1"):
    validate(_config(init="supernet", width=quickstart.get_config("tiny").model.width),
             str(tmp_path / "empty"))


@pytest.mark.slow
def test_a_run_from_the_supernet_says_so_in_its_result_log_and_summary(tmp_path, capsys):
  # One layer per stage: what is under test is the run's start and report, not the size.
  variables, alphas = _supernet(layers=1)
  _save_search(str(tmp_path), variables, alphas, genotype=small_genotype.SMALL)
  config = _config(init="supernet", width=16, epochs=1,
                   genotype=small_genotype.write(tmp_path / "genotype"))
  result = experiment.run(config, str(tmp_path))["train"]
  assert result["init"] == "supernet"
  assert result["init_from"].endswith(os.path.join("search_phase2", "checkpoints", "12"))
  log = "".join(capsys.readouterr())
  assert "init: the chosen ops' supernet weights of search_phase2" in log
  summary = open(tmp_path / "summary.md").read()
  assert "trained from the supernet weights of " in summary
  assert "(train.init='supernet')" in summary
  trained = load_final_variables(str(tmp_path), "train")
  assert trained["params"]["task_head"]["Dense_0"]["kernel"].shape[-1] == 10
