"""The CPC objective: patches, causal context, InfoNCE, config check and search."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fanas_jax.configs import default, quickstart
from fanas_jax import config_checks, optim
from fanas_jax.cpc import CPCHead, extract_patches, info_nce
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import get_dataset
from fanas_jax.genotype import SearchSpace
from fanas_jax.model import make_model
from fanas_jax.objectives import make_objective
from fanas_jax.steps import init_alphas, init_search_state, init_variables, make_search_step


def _objective(image_size=8, patch_size=4, patch_stride=2, **cpc):
  options = default.search_phase().cpc
  options.update(dict(patch_size=patch_size, patch_stride=patch_stride, **cpc))
  return make_objective("cpc", ml_collections.ConfigDict(dict(image_size=image_size,
                                                              cpc=options)))


def _prediction_positions(images, rows, cols, offsets):
  """(k, image, context row, col) of each prediction, in the head's documented order."""
  return [(k, b, r, c) for k in offsets for b in range(images)
          for r in range(rows - k) for c in range(cols)]


def test_patches_match_numpy_slicing():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 10, 13, 3)).astype(np.float32)
  patches = np.asarray(extract_patches(jnp.asarray(images), 4, 3))
  assert patches.shape == (2, 3, 4, 4, 4, 3)  # (10-4)//3+1 rows, (13-4)//3+1 cols
  for r in range(3):
    for c in range(4):
      np.testing.assert_array_equal(patches[:, r, c],
                                    images[:, 3 * r:3 * r + 4, 3 * c:3 * c + 4])

  # The network input is every patch as an example, in (image, row, col) order.
  objective = _objective(image_size=8, patch_size=4, patch_stride=2)
  square = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  inputs, _ = objective.make_inputs({"image": jnp.asarray(square),
                                     "label": jnp.zeros(2, jnp.int32)}, jax.random.key(0))
  assert inputs.shape == (18, 4, 4, 1) == objective.input_shape((2, 8, 8, 1))
  for b in range(2):
    for r in range(3):
      for c in range(3):
        np.testing.assert_array_equal(inputs[b * 9 + r * 3 + c],
                                      square[b, 2 * r:2 * r + 4, 2 * c:2 * c + 4])


def _info_nce_reference(pred, z, target):
  """Per prediction: the positive against every other patch of every image, by loops."""
  scale = 1.0 / np.sqrt(z.shape[1])
  losses, hits = [], []
  for i, t in enumerate(target):
    positive = pred[i] @ z[t] * scale
    negatives = [pred[i] @ z[j] * scale for j in range(len(z)) if j != t]
    scores = np.array([positive] + negatives, np.float64)
    losses.append(-positive + np.log(np.sum(np.exp(scores - scores.max()))) + scores.max())
    hits.append(positive > max(negatives))
  return np.mean(losses), np.mean(hits)


def test_info_nce_matches_numpy_reference():
  rng = np.random.default_rng(1)
  images, positions, dim = 3, 6, 8
  z = rng.normal(size=(images * positions, dim)).astype(np.float32)
  target = rng.integers(0, len(z), size=20)
  # Half the predictions are noisy copies of their target, so accuracy is not trivial.
  pred = rng.normal(size=(20, dim)).astype(np.float32)
  pred[:10] = 3 * z[target[:10]] + 0.1 * pred[:10]
  loss, accuracy = info_nce(jnp.asarray(pred), jnp.asarray(z), jnp.asarray(target))
  ref_loss, ref_accuracy = _info_nce_reference(pred, z, target)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(accuracy, ref_accuracy)
  assert 0.0 < ref_accuracy < 1.0

  # Negatives from the other images count: dropping them lowers the loss.
  own = target < positions
  alone, _ = info_nce(jnp.asarray(pred[own]), jnp.asarray(z[:positions]),
                      jnp.asarray(target[own]))
  with_others, _ = info_nce(jnp.asarray(pred[own]), jnp.asarray(z), jnp.asarray(target[own]))
  assert float(alone) < float(with_others)


def _changed_predictions(predict, x, images, rows, cols, offsets):
  """[prediction, image, row]: whether perturbing that image's row changes the prediction."""
  base = np.asarray(predict(x))
  noise = np.random.default_rng(2).normal(size=x.shape[1:]).astype(np.float32)
  changed = np.zeros((len(base), images, rows), bool)
  for b in range(images):
    for row in range(rows):
      start = (b * rows + row) * cols
      moved = np.asarray(predict(x.at[start:start + cols].add(noise)))
      diff = np.abs(moved - base).max(axis=1)
      # Either exactly unchanged (to 1e-6) or clearly changed: nothing in between.
      assert np.all((diff <= 1e-6) | (diff > 1e-4)), diff
      changed[:, b, row] = diff > 1e-4
  return changed


def _expected_dependence(images, rows, cols, offsets):
  """A prediction for target row r + k may see only rows <= r of its own image."""
  positions = _prediction_positions(images, rows, cols, offsets)
  expected = np.zeros((len(positions), images, rows), bool)
  for i, (_, b, r, _) in enumerate(positions):
    expected[i, b, :r + 1] = True
  return expected


def test_context_is_causal_over_rows():
  images, rows, cols, dim, offsets = 2, 4, 3, 8, (1, 2)
  head = CPCHead((rows, cols), dim, context_layers=2, context_heads=2, offsets=offsets)
  features = jax.random.normal(jax.random.key(0), (images * rows * cols, 2, 2, 5))
  params = head.init(jax.random.key(1), {"stage5": features})
  out = head.apply(params, {"stage5": features})

  positions = _prediction_positions(images, rows, cols, offsets)
  expected_target = [b * rows * cols + (r + k) * cols + c for k, b, r, c in positions]
  np.testing.assert_array_equal(out["target_index"], expected_target)
  assert out["predictions"].shape == (len(positions), dim)
  assert out["z"].shape == (images * rows * cols, dim)

  predict = jax.jit(lambda f: head.apply(params, {"stage5": f})["predictions"])
  changed = _changed_predictions(predict, features, images, rows, cols, offsets)
  np.testing.assert_array_equal(changed, _expected_dependence(images, rows, cols, offsets))


def test_network_on_patches_is_causal_over_rows():
  """Through the whole network, from the input patches (running batch statistics:
  in training mode batch norm shares batch moments across all patches)."""
  objective = _objective(image_size=12, patch_size=4, patch_stride=4,
                         embed_dim=8, context_heads=2)
  model = make_model(SearchSpace.uniform(("local3_h4",), layers=1).layer_ops(), 16, "cpc",
                     **objective.head_config)
  images = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
  patches, _ = objective.make_inputs({"image": images}, jax.random.key(1))
  variables = init_variables(model, jax.random.key(2), patches.shape)
  predict = jax.jit(lambda x: model.apply(variables, x)["predictions"])
  changed = _changed_predictions(predict, patches, 2, 3, 3, (1, 2))
  np.testing.assert_array_equal(changed, _expected_dependence(2, 3, 3, (1, 2)))


def test_config_check_names_the_patch_key():
  config = quickstart.get_config("tiny")
  config.stages = "search_phase1"
  config.search_phase1.objective = "cpc"
  config_checks.validate(config)  # 4x4 patches, stride 2: a 3x3 grid

  config.search_phase1.cpc.patch_size = 6
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("search_phase1.cpc.patch_size=6 cannot pass through")
  assert "multiple of 4" in message

  config.search_phase1.cpc.patch_size = 8  # fits the network, but leaves one patch row
  with pytest.raises(config_checks.ConfigError, match=r"search_phase1\.cpc\.offsets="):
    config_checks.validate(config)
  config.model.stem = "conv"  # 8 pixels per stem output: patches must be multiples of 32
  with pytest.raises(config_checks.ConfigError, match="multiple of 32"):
    config_checks.validate(config)


SEARCH_STEPS = 40


@pytest.fixture(scope="module")
def digits_search():
  """A tiny two-op supernet searching with CPC on the real digits, batch 32, with the
  quickstart's zero-initialised residual branches (the authors' init starts this small
  network far from chance). One layer per stage, mixtures in the first two (stride 1
  and 2), one op in the rest: the search trains the same way, with fewer bottlenecks to
  compile."""
  cfg = default.search_phase(objective="cpc")
  objective = _objective()
  mixed = ("local3_h4", "nonlocal")
  space = SearchSpace((mixed, mixed, ("local3_h4",), ("local3_h4",), ("local3_h4",)),
                      layers=1)
  model = make_model(space.layer_ops(), 16, objective.head, zero_init_residual=True,
                     **objective.head_config)
  w_tx = optim.search_weight_optimizer(cfg, SEARCH_STEPS)
  a_tx = optim.alpha_optimizer(cfg)
  state = init_search_state(model, init_alphas(space, jax.random.key(0), 1e-3), w_tx, a_tx,
                            jax.random.key(1), objective.input_shape((1, 8, 8, 1)))
  step = jax.jit(chex.assert_max_traces(make_search_step(model, objective, w_tx, a_tx),
                                        n=1))
  spec = get_dataset("sklearn_digits")
  w_half, a_half = pipeline.split_halves(pipeline.load_split("sklearn_digits", "train"), 0)
  batches = lambda half, seed: pipeline.train_iterator(
      half, batch_size=32, seed=seed,
      preprocess=pipeline.Preprocess(8, spec.mean, spec.std, flip=True))
  return state, step, batches(w_half, 0), batches(a_half, 1)


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_bilevel_step_updates_alphas_and_weights(digits_search):
  state, step, w_batches, a_batches = digits_search
  new_state, metrics = step(state, next(w_batches), next(a_batches), jax.random.key(2))
  assert np.isfinite(metrics["w_loss"]) and np.isfinite(metrics["a_loss"])
  # At initialisation the loss is near chance over the 32 * 9 patches.
  assert abs(float(metrics["w_loss"]) - np.log(32 * 9)) < 1.0
  assert _changed(new_state.alphas, state.alphas)
  for part in ("backbone", "task_head"):
    assert _changed(new_state.params[part], state.params[part]), part
  assert float(metrics["a_grad_norm"]) > 0 and float(metrics["w_grad_norm"]) > 0


def test_short_search_lowers_the_loss(digits_search):
  state, step, w_batches, a_batches = digits_search
  losses = []
  for _ in range(SEARCH_STEPS):
    state, metrics = step(state, next(w_batches), next(a_batches), jax.random.key(3))
    losses.append(float(metrics["w_loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
