"""The first-order bilevel step against an independent recomputation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fanas_jax import optim
from fanas_jax.genotype import SearchSpace
from fanas_jax.model import make_model
from fanas_jax.objectives import make_objective
from fanas_jax.search import select_epoch
from fanas_jax.steps import init_alphas, init_search_state, make_loss_fn, make_search_step
from fanas_jax.configs import default

# One layer per stage, mixtures in the first two (a stride-1 and a stride-2 mixture
# layer, a local and a global op), one op in the rest: the step's bookkeeping (which
# batch, which alphas, which update) is the same for any mixture, and each layer is
# one more bottleneck per candidate to compile, forward and backward, in both passes.
MIXED = ("local3_h4", "nonlocal")
SPACE = SearchSpace((MIXED, MIXED, ("nonlocal",), ("nonlocal",), ("nonlocal",)), layers=1)


@pytest.fixture(scope="module")
def setup():
  cfg = default.search_phase(objective="car", box_size=2, a_lr=0.05)
  obj_cfg = ml_collections.ConfigDict(dict(image_size=8, num_boxes=4, box_size=2))
  objective = make_objective("car", obj_cfg)
  model = make_model(SPACE.layer_ops(), 16, objective.head, out_channels=1)
  w_tx = optim.search_weight_optimizer(cfg, 10)
  a_tx = optim.alpha_optimizer(cfg)
  alphas = init_alphas(SPACE, jax.random.key(0), 1e-3)
  state = init_search_state(model, alphas, w_tx, a_tx, jax.random.key(1), (1, 8, 8, 1))
  step = jax.jit(make_search_step(model, objective, w_tx, a_tx))
  rng = np.random.default_rng(0)
  w_batch = {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
             "label": jnp.zeros(4, jnp.int32)}
  a_batch = {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
             "label": jnp.zeros(4, jnp.int32)}
  return model, objective, w_tx, a_tx, state, step, w_batch, a_batch


def test_step_equals_alpha_then_weight_update(setup):
  model, objective, w_tx, a_tx, state, step, w_batch, a_batch = setup
  key = jax.random.key(7)
  new_state, metrics = step(state, w_batch, a_batch, key)

  # Independent recomputation with the same keys: alpha gradient on the
  # architecture batch only, then the weight gradient at the NEW alphas on the
  # weight batch only.
  loss_fn = make_loss_fn(model, objective)
  k_arch, k_weight = jax.random.split(jax.random.fold_in(key, state.step))

  @jax.jit  # Both passes in one program: one compile.
  def reference(state):
    a_grads = jax.grad(lambda a: loss_fn(state.params, a, state.batch_stats, a_batch,
                                         k_arch)[0])(state.alphas)
    upd, _ = a_tx.update(a_grads, state.a_opt_state, state.alphas)
    alphas = optax.apply_updates(state.alphas, upd)
    w_grads = jax.grad(lambda p: loss_fn(p, alphas, state.batch_stats, w_batch,
                                         k_weight)[0])(state.params)
    upd, _ = w_tx.update(w_grads, state.w_opt_state, state.params)
    return alphas, optax.apply_updates(state.params, upd)

  alphas, params = reference(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.alphas, alphas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new_state.params, params)
  assert int(new_state.step) == 1
  assert np.isfinite(metrics["w_loss"]) and np.isfinite(metrics["a_loss"])


def test_each_step_sees_only_its_half(setup):
  _, _, _, _, state, step, w_batch, a_batch = setup
  key = jax.random.key(3)
  base, _ = step(state, w_batch, a_batch, key)
  other = {"image": w_batch["image"] + 1.0, "label": w_batch["label"]}
  # Changing the weight batch leaves the alpha update untouched...
  s1, _ = step(state, other, a_batch, key)
  jax.tree.map(np.testing.assert_array_equal, s1.alphas, base.alphas)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(s1.params), jax.tree.leaves(base.params)))
  # ...and changing the architecture batch changes the alphas.
  s2, _ = step(state, w_batch, {"image": a_batch["image"] * 2.0, "label": a_batch["label"]},
               key)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(s2.alphas), jax.tree.leaves(base.alphas)))


def test_select_epoch():
  history = [{"epoch": 1, "a_loss": 3.0}, {"epoch": 2, "a_loss": 1.0},
             {"epoch": 3, "a_loss": 2.0}]
  assert select_epoch(history, "last")["epoch"] == 3
  assert select_epoch(history, "best")["epoch"] == 2
  with pytest.raises(ValueError, match="best, last"):
    select_epoch(history, "first")
