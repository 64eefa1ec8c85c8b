"""Fine-tuning: what it starts from, what moves, what is refused before compute."""
import json
import os
import subprocess
import sys

from flax import serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fanas_jax.configs import quickstart
from fanas_jax import finetune, optim
from fanas_jax.config_checks import validate
from fanas_jax.genotype import Genotype, named_genotype
from fanas_jax.model import make_model
from fanas_jax.objectives import make_objective
from fanas_jax.registry import ConfigError
from fanas_jax.steps import TrainState, init_variables, make_train_step
from fanas_jax.train import FINAL_VARIABLES, load_final_variables
from tests.conftest import ROOT
from tests.small_genotype import SMALL

SHAPE = (1, 8, 8, 1)
ORIGINAL = named_genotype("original")


def _model(num_classes=10, **options):
  return make_model(ORIGINAL.layer_ops(), 16, "classifier", num_classes=num_classes,
                    zero_init_residual=True, **options)


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _perturbed(variables, seed):
  """Trained-looking weights: every leaf moved, so a fresh init cannot pass for them."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [np.asarray(l + 0.1 * jax.random.normal(k, l.shape))
                                   for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
  """final_variables.msgpack of a 5-class network, as the train stage writes it."""
  variables = _perturbed(_numpy(init_variables(_model(5), jax.random.key(0), SHAPE)), 1)
  path = tmp_path_factory.mktemp("pre") / FINAL_VARIABLES
  path.write_bytes(serialization.to_bytes(variables))
  return str(path), variables


def test_the_weights_name_their_genotype_and_width(pretrained_file):
  path, variables = pretrained_file
  pre = finetune.load_pretrained(path, "")
  assert pre.genotype == ORIGINAL and pre.width == 16 and pre.where == path
  assert jax.tree.all(jax.tree.map(np.array_equal, pre.variables, variables))
  # A directory holding the file reads the same.
  assert finetune.load_pretrained(os.path.dirname(path), "").genotype == ORIGINAL


def test_the_backbone_starts_exactly_pretrained_and_the_head_is_new(pretrained_file):
  path, variables = pretrained_file
  model = _model(10)
  fresh = init_variables(model, jax.random.key(7), SHAPE)
  start = finetune.start_from(finetune.load_pretrained(path, ""))(fresh)
  assert jax.tree.all(jax.tree.map(np.array_equal, _numpy(start["params"]["backbone"]),
                                   variables["params"]["backbone"]))
  assert jax.tree.all(jax.tree.map(np.array_equal, _numpy(start["batch_stats"]["backbone"]),
                                   variables["batch_stats"]["backbone"]))
  head = start["params"]["task_head"]["Dense_0"]
  assert head["kernel"].shape == (64, 10)   # sized for the new task, not the old 5
  np.testing.assert_array_equal(head["kernel"], fresh["params"]["task_head"]["Dense_0"]["kernel"])


def _steps(model, params, batch_stats, tx, steps):
  objective = make_objective("supervised", ml_collections.ConfigDict(dict(
      image_size=8, num_classes=10, label_smoothing=0.0)))
  step = jax.jit(make_train_step(model, objective, tx))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=batch_stats, opt_state=tx.init(params))
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = {"image": rng.normal(size=(8,) + SHAPE[1:]).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    state, _ = step(state, batch, jax.random.key(3))
  return state


def _recipe(**overrides):
  cfg = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, grad_clip=5.0, epochs=2,
             warmup_epochs=0, warmup_from=1.0, lr_min_factor=1.0, head_lr_mult=10.0)
  return ml_collections.ConfigDict(dict(cfg, **overrides))


def test_frozen_parts_and_bn_statistics_do_not_move_and_the_head_steps_at_its_multiple(
    pretrained_file):
  """One real step of the fine-tuning optimizer with the stem and stage 1 frozen and
  BN statistics frozen, against the step by hand."""
  path, _ = pretrained_file
  model = _model(10, frozen_bn=True)
  variables = finetune.start_from(finetune.load_pretrained(path, ""))(
      init_variables(model, jax.random.key(7), SHAPE))
  params = variables["params"]
  labels = finetune.param_labels(params, ("stem", "stage1"))
  assert labels["backbone"]["stem"]["query"]["kernel"] == optim.FROZEN
  assert labels["backbone"]["stage1_layer2_local5_h4"]["conv_in"]["kernel"] == optim.FROZEN
  assert labels["backbone"]["stage2_pre_conv"]["kernel"] == optim.BACKBONE
  assert labels["task_head"]["Dense_0"]["bias"] == optim.HEAD
  cfg = _recipe()
  tx = optim.finetune_optimizer(cfg, 1, labels)
  one = _steps(model, params, variables["batch_stats"], tx, steps=1)
  for name, sub in params["backbone"].items():
    same = jax.tree.all(jax.tree.map(np.array_equal, _numpy(one.params["backbone"][name]),
                                     _numpy(sub)))
    assert same == (name == "stem" or name.startswith("stage1_")), name
  assert jax.tree.all(jax.tree.map(np.array_equal, _numpy(one.batch_stats),
                                   _numpy(variables["batch_stats"])))

  # The step by hand: the clipped gradient of the trainable parameters only, plus decay.
  grads = jax.jit(jax.grad(lambda p: _loss(model, p, variables["batch_stats"])))(params)
  trainable = jax.tree.map(lambda g, l: g if l != optim.FROZEN else jnp.zeros_like(g),
                           grads, labels)
  scale = jnp.minimum(1.0, cfg.grad_clip / optax.tree.norm(trainable))
  for group, mult in ((("task_head", "Dense_0", "kernel"), cfg.head_lr_mult),
                      (("backbone", "stage2_pre_conv", "kernel"), 1.0)):
    g = _at(trainable, group) * scale + cfg.weight_decay * _at(params, group)
    np.testing.assert_allclose(_at(one.params, group) - _at(params, group),
                               -cfg.lr * mult * g, rtol=2e-4, atol=1e-7)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def _loss(model, params, batch_stats):
  """The loss of the first batch of `_steps` (dropout is 0)."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8,) + SHAPE[1:]).astype(np.float32)
  label = rng.integers(0, 10, 8).astype(np.int32)
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, image,
                          train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()


def test_frozen_bn_normalises_with_the_running_statistics(pretrained_file):
  path, _ = pretrained_file
  frozen, model = _model(10, frozen_bn=True), _model(10)
  variables = finetune.start_from(finetune.load_pretrained(path, ""))(
      init_variables(model, jax.random.key(7), SHAPE))
  x = np.random.default_rng(1).normal(size=(4,) + SHAPE[1:]).astype(np.float32)
  train_out, _ = jax.jit(lambda v: frozen.apply(v, x, train=True,
                                                 mutable=["batch_stats"]))(variables)
  np.testing.assert_array_equal(
      train_out, jax.jit(lambda v: model.apply(v, x, train=False))(variables))
  batch_out, _ = jax.jit(lambda v: model.apply(v, x, train=True,
                                              mutable=["batch_stats"]))(variables)
  assert not np.allclose(batch_out, train_out)


def test_an_orbax_checkpoint_step_reads_like_the_msgpack(pretrained_file, tmp_path):
  path, variables = pretrained_file
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / "18" / "state"), {"step": np.int32(18), "opt_state": {},
                                             **variables})
  ckpt.wait_until_finished()
  pre = finetune.load_pretrained(str(tmp_path / "18"), "")
  assert pre.genotype == ORIGINAL and pre.width == 16
  assert jax.tree.all(jax.tree.map(np.array_equal, pre.variables, variables))


def test_bad_sources_fail_in_one_line(pretrained_file, tmp_path):
  path, variables = pretrained_file
  (tmp_path / "junk.msgpack").write_bytes(b"\x00\x01 not msgpack")
  (tmp_path / "other.msgpack").write_bytes(serialization.to_bytes({"weights": {"w": 1}}))
  supernet = {"params": {"backbone": {"stage1_layer1_local3_h4": {}, "stage1_layer1_nonlocal": {}}},
              "batch_stats": {}}
  (tmp_path / "super.msgpack").write_bytes(serialization.to_bytes(supernet))
  cases = [(tmp_path / "missing", "no such file or checkpoint; give a stage of this workdir"),
           (tmp_path / "junk.msgpack", "is not a msgpack of variables"),
           (tmp_path / "other.msgpack", "holds no 'params' and 'batch_stats'"),
           (tmp_path / "super.msgpack", "holds a supernet (several ops per layer)")]
  for source, message in cases:
    with pytest.raises(ConfigError) as error:
      finetune.load_pretrained(str(source), "")
    assert "\n" not in str(error.value) and message in str(error.value), source


def test_a_genotype_or_network_that_does_not_fit_the_weights_is_refused(pretrained_file,
                                                                       tmp_path):
  path, _ = pretrained_file
  pre = finetune.load_pretrained(path, "")
  finetune.check_genotype("original", pre)
  finetune.check_genotype("pretrained", pre)
  other = ORIGINAL.to_dict()
  other["stage3"] = ["local3_h8", "local5_h8", "local5_h8"]
  (tmp_path / "g.json").write_text(json.dumps({"genotype": other}))
  with pytest.raises(ConfigError, match=r"is not the architecture of the weights in .*: "
                     r"stage3 layer 2 is local5_h8 in the genotype, local3_h4 in the weights"):
    finetune.check_genotype(str(tmp_path / "g.json"), pre)
  conv_stem = make_model(ORIGINAL.layer_ops(), 16, "classifier", num_classes=10,
                         stem="conv")
  with pytest.raises(ConfigError, match=r"does not fit the configured network: "
                     r"params/backbone\['stem'\]"):
    finetune.check_shapes(conv_stem, pre, (1, 64, 64, 1))


def _config(**finetune_keys):
  config = quickstart.get_config("tiny")
  config.stages = "finetune"
  config.finetune.update(finetune_keys)
  return config


def test_config_check_refuses_bad_options_and_sources_before_compute(pretrained_file,
                                                                      tmp_path):
  path, _ = pretrained_file
  validate(_config(pretrained=path, freeze=("stem", "stage3"), genotype="original"))
  bad = [(dict(pretrained=path, freeze=("stage6",)),
          "finetune.freeze='stage6' is not one of: stage1, stage2, stage3, stage4, stage5, stem"),
         (dict(pretrained=path, head_lr_mult=0.0), "finetune.head_lr_mult=0.0 must be positive"),
         (dict(pretrained=str(tmp_path / "nothing")), "no such file or checkpoint"),
         (dict(pretrained=path, genotype="nope.json"), "no such genotype file")]
  for keys, message in bad:
    with pytest.raises(ConfigError) as error:
      validate(_config(**keys), str(tmp_path / "w"))
    assert message in str(error.value), keys
  with pytest.raises(ConfigError, match="stage finetune needs trained weights from train"):
    validate(_config(), str(tmp_path / "w"))


@pytest.mark.slow
def test_train_a_genotype_file_then_fine_tune_it_through_the_command_line(tmp_path):
  """train reads a genotype.json from elsewhere; finetune starts from its weights with
  the stem and stage 1 frozen and BN statistics frozen."""
  genotype_file = tmp_path / "shared" / "genotype.json"
  genotype_file.parent.mkdir()
  genotype_file.write_text(json.dumps({"genotype": SMALL.to_dict(), "rule": "shared"}))
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fanas_jax.main", "--config=configs/quickstart.py:tiny",
         f"--workdir={workdir}", "--config.stages=train,finetune",
         f"--config.train.genotype={genotype_file}", "--config.finetune.freeze=('stem','stage1')",
         "--config.finetune.freeze_bn=True"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  trained = json.load(open(workdir / "train" / "result.json"))
  assert Genotype.from_dict(trained["genotype"]) == SMALL
  result = json.load(open(workdir / "finetune" / "result.json"))
  assert result["pretrained"] == str(workdir / "train") and result["frozen"] == ["stem", "stage1"]
  assert 0.0 <= result["test_top1"] <= 1.0 and result["test_examples"] == 359
  before, after = (load_final_variables(str(workdir), s) for s in ("train", "finetune"))
  for name, sub in before["params"]["backbone"].items():
    same = jax.tree.all(jax.tree.map(np.array_equal, after["params"]["backbone"][name], sub))
    assert same == (name == "stem" or name.startswith("stage1_")), name
  assert jax.tree.all(jax.tree.map(np.array_equal, after["batch_stats"], before["batch_stats"]))
  assert "## fine-tuning" in open(workdir / "summary.md").read()
