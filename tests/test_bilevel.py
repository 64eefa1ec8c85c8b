"""The search step's modes (first order, second order, Gumbel single path) and warm-up.

The second-order hypergradient is checked against central finite differences in
float64 on a tiny smooth mixture model run through the same step code; the Gumbel
mode on a small real supernet; the invariants (which data and which parameters each
optimizer touches) in every mode.
"""
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fanas_jax.configs import default, quickstart
from fanas_jax import optim
from fanas_jax.config_checks import ConfigError, validate
from fanas_jax.genotype import SearchSpace
from fanas_jax.model import gumbel_path, make_model
from fanas_jax.objectives import Objective, make_objective
from fanas_jax.steps import SearchState, init_alphas, make_search_step
from tests.test_model import _random_variables

KEY = jax.random.key(7)


def _equal(a, b) -> bool:
  """Bit-identical pytrees."""
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def _jit_once(fn):
  """jax.jit of fn that fails if fn is traced again (which would mean a recompile).

  (chex.assert_max_traces keys on the source and call stack, which a loop or a
  parametrized test shares between different steps.)"""
  traces = []

  def traced_once(*args):
    traces.append(None)
    assert len(traces) == 1, "the step was traced again"
    return fn(*args)

  return jax.jit(traced_once)


def _spy(tx: optax.GradientTransformation, seen: list) -> optax.GradientTransformation:
  """tx, recording the tree structures of the (updates, params) it is handed."""
  def update(updates, state, params=None):
    seen.append((jax.tree.structure(updates), jax.tree.structure(params)))
    return tx.update(updates, state, params)
  return optax.GradientTransformation(tx.init, update)


def _with_lr(opt_state, value: float):
  """The injected learning rate set to `value`, same dtype, so nothing recompiles."""
  lr = optax.tree.get(opt_state, "learning_rate")
  return optax.tree.set(opt_state, learning_rate=jnp.full_like(lr, value))


class TinyMixture(nn.Module):
  """Two layers, each a softmax mixture of three smooth ops followed by BN, and a
  dense read-out. Smooth everywhere (no ReLU kinks), so finite differences are
  accurate; small enough to compile in seconds and to run in float64."""

  @nn.compact
  def __call__(self, x, alphas, train=False):
    for l, alpha in enumerate(alphas["mix"]):
      outs = [nn.Conv(4, (3, 3), name=f"layer{l}_conv3")(x),
              jnp.tanh(nn.Conv(4, (1, 1), name=f"layer{l}_conv1")(x)),
              nn.Dense(4, name=f"layer{l}_dense")(jnp.sin(x))]
      x = sum(w * o for w, o in zip(jax.nn.softmax(alpha), outs))
      x = jnp.tanh(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                name=f"layer{l}_bn")(x))
    return nn.Dense(1, name="out")(jnp.mean(x, axis=(1, 2)))


REGRESSION = Objective(head="none",
                       make_inputs=lambda batch, key: (batch["image"], batch["target"]),
                       loss=lambda out, target: (jnp.mean((out - target) ** 2), {}))


def _tiny(dtype):
  """(model, variables, alphas, weight batch, architecture batch) in dtype."""
  rng = np.random.default_rng(0)
  batch = lambda: {"image": jnp.asarray(rng.normal(size=(4, 6, 6, 2)), dtype),
                   "target": jnp.asarray(rng.normal(size=(4, 1)), dtype)}
  w_batch, a_batch = batch(), batch()
  alphas = {"mix": jnp.asarray(rng.normal(size=(2, 3)), dtype)}
  model = TinyMixture()
  variables = jax.tree.map(lambda v: v.astype(dtype),
                           model.init(jax.random.key(0), w_batch["image"], alphas))
  return model, variables, alphas, w_batch, a_batch


def _state(variables, alphas, w_tx, a_tx) -> SearchState:
  params = variables["params"]
  return SearchState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"], alphas=alphas,
                     w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(alphas))


def _other(batch, key="image"):
  return dict(batch, **{key: batch[key] + 1.0})


# ---------------------------------------------------------------- second order


@pytest.mark.parametrize("optimizer", ["sgd", "search"])
def test_second_order_hypergradient_matches_finite_differences(optimizer):
  """grad_alpha L_arch(w'(alpha), alpha) with w' one virtual weight step on the weight
  batch, against central differences of that function written out here. 'sgd': the
  textbook w' = w - xi grad_w L_train(w, alpha); 'search': the search optimizer's
  step (momentum buffer, weight decay, active clipping). The running BN statistics
  come from the real weight pass alone."""
  with jax.enable_x64(True):
    model, variables, alphas, w_batch, a_batch = _tiny(jnp.float64)
    xi = 0.5
    if optimizer == "sgd":
      momentum, weight_decay, clip = 0.0, 0.0, np.inf
      w_tx = optax.sgd(xi)
    else:
      momentum, weight_decay, clip = 0.9, 0.1, 0.05
      w_tx = optim.search_weight_optimizer(default.search_phase(
          w_lr=xi, w_lr_min=xi, w_momentum=momentum, w_weight_decay=weight_decay,
          grad_clip=clip), 10)
    a_tx = optax.sgd(1.0)  # new alpha = alpha - hypergradient
    step = jax.jit(make_search_step(model, REGRESSION, w_tx, a_tx, "second_order"))
    # A first step fills the momentum buffer.
    state, _ = step(_state(variables, alphas, w_tx, a_tx), w_batch, a_batch, KEY)
    new, _ = step(state, w_batch, a_batch, KEY)
    flat, unravel = ravel_pytree(state.alphas)
    hypergrad = np.asarray(flat - ravel_pytree(new.alphas)[0])

    def loss(params, alphas, batch):
      out, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                           batch["image"], alphas, train=True, mutable=["batch_stats"])
      return jnp.mean((out - batch["target"]) ** 2)

    velocity = (optax.tree.get(state.w_opt_state, "trace") if momentum else
                jax.tree.map(jnp.zeros_like, state.params))

    def unrolled(alphas):
      grads = jax.grad(loss)(state.params, alphas, w_batch)
      norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
      scale = jnp.minimum(1.0, clip / norm)
      virtual = jax.tree.map(
          lambda w, g, v: w - xi * (scale * g + weight_decay * w + momentum * v),
          state.params, grads, velocity)
      return loss(virtual, alphas, a_batch)

    f = jax.jit(lambda a: unrolled(unravel(a)))
    h = 1e-5
    fd = np.array([(f(flat + h * e) - f(flat - h * e)) / (2 * h)
                   for e in np.eye(flat.size)])
    error = np.linalg.norm(hypergrad - fd) / np.linalg.norm(fd)
    assert error < 1e-3, error
    # The second-order term matters here, so a first-order gradient would fail.
    first, _ = ravel_pytree(
        jax.grad(lambda a: loss(state.params, a, a_batch))(state.alphas))
    assert np.linalg.norm(first - fd) > 0.05 * np.linalg.norm(fd)
    if optimizer == "search":
      grads = jax.grad(loss)(state.params, state.alphas, w_batch)
      assert optax.tree.norm(grads) > clip
      assert optax.tree.norm(velocity) > 0

    _, once = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          w_batch["image"], new.alphas, train=True,
                          mutable=["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                 new.batch_stats, once["batch_stats"])
    assert not _equal(new.batch_stats, state.batch_stats)


# ------------------------------------------------------------------- gumbel

# One layer per stage (as the tiny configs): a mixture of a local and a global op in each.
GUMBEL_SPACE = SearchSpace.uniform(("local3_h4", "nonlocal"), layers=1)
TAU_MAX, TAU_MIN, TOTAL_STEPS = 5.0, 0.5, 4


@pytest.fixture(scope="module")
def gumbel():
  """A small real supernet's gumbel step with one warm-up step, compiled once:
  state0 -(weights only)-> state1 -(alpha, then weights)-> state2."""
  cfg = default.search_phase(mode="gumbel", gumbel_tau_max=TAU_MAX,
                             gumbel_tau_min=TAU_MIN)
  objective = make_objective("car", ml_collections.ConfigDict(
      dict(image_size=8, num_boxes=4, box_size=2)))
  model = make_model(GUMBEL_SPACE.layer_ops(), 16, objective.head, out_channels=1)
  seen = {"w": [], "a": []}
  w_tx = _spy(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
              seen["w"])
  a_tx = _spy(optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.5), seen["a"])
  alphas = init_alphas(GUMBEL_SPACE, jax.random.key(0), 1e-3)
  state0 = _state(_supernet_variables(model, (1, 8, 8, 1), alphas), alphas, w_tx, a_tx)
  step = _jit_once(make_search_step(
      model, objective, w_tx, a_tx, "gumbel", warmup_steps=1,
      tau_schedule=optim.gumbel_temperature(cfg, TOTAL_STEPS)))
  rng = np.random.default_rng(0)
  batch = lambda: {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
                   "label": jnp.zeros(4, jnp.int32)}
  w_batch, a_batch = batch(), batch()
  state1, metrics0 = step(state0, w_batch, a_batch, KEY)
  state2, metrics1 = step(state1, w_batch, a_batch, KEY)
  return types.SimpleNamespace(step=step, states=(state0, state1, state2),
                               metrics=(metrics0, metrics1), w_batch=w_batch,
                               a_batch=a_batch, seen=seen)


def _pass_paths(alphas_arch, alphas_weight, step, tau):
  """The paths the step's alpha and weight passes sample (its key derivation)."""
  k_arch, k_weight = jax.random.split(jax.random.fold_in(KEY, step))
  return (gumbel_path(alphas_arch, jax.random.split(k_arch)[0], tau),
          gumbel_path(alphas_weight, jax.random.split(k_weight)[0], tau))


def _sampled_ops(path):
  """{stage: [op of each layer]} of a one-hot path."""
  ops = GUMBEL_SPACE.candidates[0]
  return {stage: [ops[i] for i in np.argmax(np.asarray(p), -1)]
          for stage, p in path.items()}


def _layer_trees(tree, stage, layer):
  """{op: subtree} of one layer's candidates."""
  return {op: tree["backbone"][f"{stage}_layer{layer + 1}_{op}"]
          for op in GUMBEL_SPACE.candidates[0]}


def test_gumbel_step_runs_and_updates_only_the_sampled_ops(gumbel):
  """Each layer's sampled op (weight pass) gets new BN statistics and weights; the
  unsampled op's statistics are untouched and, with an empty momentum buffer, so
  are its weights (their gradient is exactly 0: the op did not run). The alpha and
  the weight pass draw independent samples."""
  state0, state1, state2 = gumbel.states
  for before, after, step in ((state0, state1, 0), (state1, state2, 1)):
    arch_path, weight_path = _pass_paths(before.alphas, after.alphas, step,
                                         gumbel.metrics[step]["tau"])
    if step == 1:  # Step 0 is a warm-up step: no alpha pass.
      assert _sampled_ops(arch_path) != _sampled_ops(weight_path)
    for stage, ops in _sampled_ops(weight_path).items():
      for layer, chosen in enumerate(ops):
        old, new = (_layer_trees(s.batch_stats, stage, layer) for s in (before, after))
        for op in old:
          assert _equal(old[op], new[op]) == (op != chosen), (stage, layer, op)
        if step == 0:
          old, new = (_layer_trees(s.params, stage, layer) for s in (before, after))
          for op in old:
            assert _equal(old[op], new[op]) == (op != chosen), (stage, layer, op)


def test_gumbel_alpha_gets_finite_nonzero_gradients_after_warmup(gumbel):
  state0, state1, state2 = gumbel.states
  metrics0, metrics1 = gumbel.metrics
  assert float(metrics0["alpha_updated"]) == 0.0
  assert float(metrics1["alpha_updated"]) == 1.0
  assert _equal(state1.alphas, state0.alphas)
  assert _equal(state1.a_opt_state, state0.a_opt_state)
  assert not _equal(state1.params, state0.params)
  assert np.isfinite(metrics1["a_grad_norm"]) and metrics1["a_grad_norm"] > 0
  for name in state1.alphas:  # Adam moves every entry with a non-zero gradient.
    assert np.all(np.isfinite(state2.alphas[name]))
    assert np.all(state2.alphas[name] != state1.alphas[name]), name
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics1))


def test_gumbel_sample_is_fixed_by_the_key(gumbel):
  state1, state2 = gumbel.states[1:]
  again, _ = gumbel.step(state1, gumbel.w_batch, gumbel.a_batch, KEY)
  assert _equal(again, state2)
  other, _ = gumbel.step(state1, gumbel.w_batch, gumbel.a_batch, jax.random.key(8))
  assert not _equal(other.alphas, state2.alphas)

  alphas = state1.alphas
  same = [gumbel_path(alphas, jax.random.key(3), 1.0) for _ in range(2)]
  assert _equal(*same)
  other_path = gumbel_path(alphas, jax.random.key(4), 1.0)
  assert _sampled_ops(other_path) != _sampled_ops(same[0])


def test_gumbel_temperature_runs_linearly_from_max_to_min(gumbel):
  state1 = gumbel.states[1]
  assert gumbel.metrics[0]["tau"] == np.float32(TAU_MAX)
  _, last = gumbel.step(state1.replace(step=jnp.asarray(TOTAL_STEPS - 1, jnp.int32)),
                        gumbel.w_batch, gumbel.a_batch, KEY)
  assert last["tau"] == np.float32(TAU_MIN)
  schedule = optim.gumbel_temperature(default.search_phase(
      gumbel_tau_max=TAU_MAX, gumbel_tau_min=TAU_MIN), TOTAL_STEPS)
  np.testing.assert_allclose([schedule(t) for t in range(TOTAL_STEPS + 2)],
                             [5.0, 3.5, 2.0, 0.5, 0.5, 0.5], rtol=1e-6)


def test_gumbel_path_is_one_hot_with_the_soft_gradient():
  """Value: exactly one-hot. Gradient: that of gumbel_softmax(alpha, tau) with the
  same noise (straight-through). Samples: distributed as softmax(alpha) whatever tau
  (the Gumbel-max trick)."""
  alphas = {"stage1": jnp.asarray([[0.5, -1.0, 0.2], [2.0, 0.0, 0.0]]),
            "stage2": jnp.asarray([[0.0, 1.0, 0.3]])}
  key, tau = jax.random.key(5), 0.7
  path = gumbel_path(alphas, key, tau)
  weights = {k: jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape)
             for k, v in alphas.items()}
  for p in path.values():
    assert set(np.unique(np.asarray(p))) == {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(p).sum(-1), 1.0)

  def soft(alphas):
    return {name: jax.nn.softmax((a + jax.random.gumbel(jax.random.fold_in(key, i),
                                                        a.shape)) / tau, axis=-1)
            for i, (name, a) in enumerate(sorted(alphas.items()))}

  objective = lambda paths: sum(jnp.sum(paths[k] * weights[k]) for k in paths)
  got = jax.grad(lambda a: objective(gumbel_path(a, key, tau)))(alphas)
  want = jax.grad(lambda a: objective(soft(a)))(alphas)
  for name in alphas:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert np.abs(got[name]).max() > 0

  keys = jax.random.split(jax.random.key(6), 4000)
  for t in (1.0, 0.1):
    samples = jax.vmap(lambda k: gumbel_path(alphas, k, t)["stage1"])(keys)
    freq = np.asarray(samples).mean(0)
    expected = np.asarray(jax.nn.softmax(alphas["stage1"], -1))
    assert np.abs(freq - expected).max() < 4 * np.sqrt(0.25 / len(keys))


def _supernet_variables(model, input_shape, alphas):
  """Random, non-degenerate supernet variables (no zero BN scales that would switch
  residual branches off), without the minutes of a jitted init."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return _random_variables(jax.eval_shape(model.init, jax.random.key(0), x, alphas), 0)


def _supernet_and_path():
  model = make_model(GUMBEL_SPACE.layer_ops(), 16, "classifier", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  alphas = {k: jax.random.normal(jax.random.key(i), v)
            for i, (k, v) in enumerate(GUMBEL_SPACE.alpha_shapes().items())}
  return model, x, alphas, gumbel_path(alphas, jax.random.key(9), 1.0)


def test_sampled_supernet_equals_the_derived_network_exactly():
  """Op by op (jit disabled, so both run the same primitives), the single-path
  supernet's output and BN updates are bit-identical to those of the derived network
  of the sampled ops with the supernet's weights; unsampled ops' statistics stay."""
  model, x, alphas, path = _supernet_and_path()
  variables = _supernet_variables(model, x.shape, alphas)
  chosen = _sampled_ops(path)
  layer_ops = tuple(tuple((op,) for op in chosen[f"stage{s + 1}"]) for s in range(5))
  derived = make_model(layer_ops, 16, "classifier", num_classes=10)
  shapes = jax.eval_shape(derived.init, jax.random.key(1), x)
  # The derived net's stage preprocess BN is affine; the supernet's is not (1 and 0).
  fresh = lambda name, like: (jnp.ones if name == "scale" else jnp.zeros)(like.shape)
  sub = lambda src, like: {k: sub(src.get(k, {}), v) if isinstance(v, dict)
                           else src[k] if k in src else fresh(k, v)
                           for k, v in like.items()}
  inherited = {c: sub(variables[c], shapes[c]) for c in shapes}
  with jax.disable_jit():
    got, got_vars = model.apply(variables, x, None, train=True, path=path,
                                mutable=["batch_stats"])
    want, want_vars = derived.apply(inherited, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(got, want)
  assert np.abs(np.asarray(want)).max() > 1e-3
  assert _equal(sub(got_vars["batch_stats"], shapes["batch_stats"]),
                want_vars["batch_stats"])
  for stage, ops in chosen.items():
    for layer, op in enumerate(ops):
      for other in set(GUMBEL_SPACE.candidates[0]) - {op}:
        name = f"{stage}_layer{layer + 1}_{other}"
        assert _equal(got_vars["batch_stats"]["backbone"][name],
                      variables["batch_stats"]["backbone"][name]), name


def test_single_path_program_branches_once_per_layer():
  """The compiled single-path network holds one conditional per mixed layer (XLA runs
  one branch of each) and costs less than the mixture, which runs every op. Both
  forms have the same variables (initialising with a path creates every op)."""
  model, x, alphas, path = _supernet_and_path()
  variables = jax.eval_shape(model.init, jax.random.key(0), x, alphas)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(lambda: model.init(jax.random.key(0), x, None, path=path)))
  forward = lambda v, a, p: model.apply(v, x, a, path=p)
  sampled = jax.jit(lambda v, p: forward(v, None, p)).lower(variables, path).compile()
  mixture = jax.jit(lambda v, a: forward(v, a, None)).lower(variables, alphas).compile()
  layers = sum(len(ops) for ops in GUMBEL_SPACE.layer_ops())
  assert len(re.findall(r"\bconditional\(", sampled.as_text())) == layers == 5
  assert len(re.findall(r"\bconditional\(", mixture.as_text())) == 0
  assert sampled.cost_analysis()["flops"] < 0.9 * mixture.cost_analysis()["flops"]


# -------------------------------------------- invariants, in every mode


@pytest.fixture(scope="module")
def tiny_steps():
  """Per mode: a tiny model's step, compiled once, with learning rates injected into the
  optimizer states (tests switch an optimizer off without recompiling) and spies."""
  model, variables, alphas, w_batch, a_batch = _tiny(jnp.float32)
  steps = {}
  for mode in ("first_order", "second_order"):
    seen = {"w": [], "a": []}
    w_tx = _spy(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9),
                seen["w"])
    a_tx = _spy(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5), seen["a"])
    step = _jit_once(make_search_step(model, REGRESSION, w_tx, a_tx, mode))
    steps[mode] = types.SimpleNamespace(
        step=step, state=_state(variables, alphas, w_tx, a_tx), seen=seen,
        w_batch=w_batch, a_batch=a_batch)
  return steps


def _mode(request, mode):
  """(step, a state whose step runs the alpha pass, batches, spies) of a mode."""
  if mode == "gumbel":
    g = request.getfixturevalue("gumbel")
    return types.SimpleNamespace(step=g.step, state=g.states[1], seen=g.seen,
                                 w_batch=g.w_batch, a_batch=g.a_batch)
  return request.getfixturevalue("tiny_steps")[mode]


@pytest.mark.parametrize("mode", ["first_order", "second_order", "gumbel"])
def test_each_optimizer_updates_only_its_own_parameters(request, mode):
  """Each optimizer is only ever handed its own tree, and switching one off (learning
  rate 0) freezes exactly its parameters."""
  m = _mode(request, mode)
  state = m.state
  no_alpha, _ = m.step(state.replace(a_opt_state=_with_lr(state.a_opt_state, 0.0)),
                       m.w_batch, m.a_batch, KEY)
  assert _equal(no_alpha.alphas, state.alphas)
  assert not _equal(no_alpha.params, state.params)
  no_weight, _ = m.step(state.replace(w_opt_state=_with_lr(state.w_opt_state, 0.0)),
                        m.w_batch, m.a_batch, KEY)
  assert _equal(no_weight.params, state.params)
  assert not _equal(no_weight.alphas, state.alphas)

  params, alphas = jax.tree.structure(state.params), jax.tree.structure(state.alphas)
  assert m.seen["a"] and set(m.seen["a"]) == {(alphas, alphas)}
  assert m.seen["w"] and set(m.seen["w"]) == {(params, params)}
  if mode == "second_order":  # The virtual step is the weight optimizer's step too.
    assert len(m.seen["w"]) == 2


@pytest.mark.parametrize("mode", ["first_order", "second_order", "gumbel"])
def test_weight_step_sees_only_the_weight_batch(request, mode):
  """With alpha frozen, the architecture batch cannot reach the weights or BN
  statistics; the weight batch does."""
  m = _mode(request, mode)
  frozen = m.state.replace(a_opt_state=_with_lr(m.state.a_opt_state, 0.0))
  base, _ = m.step(frozen, m.w_batch, m.a_batch, KEY)
  other_a, _ = m.step(frozen, m.w_batch, _other(m.a_batch), KEY)
  assert _equal((base.params, base.batch_stats), (other_a.params, other_a.batch_stats))
  other_w, _ = m.step(frozen, _other(m.w_batch), m.a_batch, KEY)
  assert not _equal(base.params, other_w.params)


@pytest.mark.parametrize("mode", ["first_order", "gumbel"])
def test_alpha_step_sees_only_the_architecture_batch(request, mode):
  m = _mode(request, mode)
  base, _ = m.step(m.state, m.w_batch, m.a_batch, KEY)
  other_w, _ = m.step(m.state, _other(m.w_batch), m.a_batch, KEY)
  assert _equal(base.alphas, other_w.alphas)
  other_a, _ = m.step(m.state, m.w_batch, _other(m.a_batch), KEY)
  assert not _equal(base.alphas, other_a.alphas)


def test_second_order_alpha_sees_the_weight_batch_through_the_virtual_step(tiny_steps):
  """The virtual step is taken on the weight batch, so another weight batch moves alpha
  differently. With xi = 0 (weight learning rate 0), w' = w: alpha is then blind to
  the weight batch and equals the first-order alpha."""
  m = tiny_steps["second_order"]
  base, _ = m.step(m.state, m.w_batch, m.a_batch, KEY)
  other, _ = m.step(m.state, _other(m.w_batch), m.a_batch, KEY)
  assert not _equal(base.alphas, other.alphas)

  still = m.state.replace(w_opt_state=_with_lr(m.state.w_opt_state, 0.0))
  base, _ = m.step(still, m.w_batch, m.a_batch, KEY)
  other, _ = m.step(still, _other(m.w_batch), m.a_batch, KEY)
  assert _equal(base.alphas, other.alphas)
  first = tiny_steps["first_order"]
  first_order, _ = first.step(first.state, m.w_batch, m.a_batch, KEY)
  np.testing.assert_allclose(base.alphas["mix"], first_order.alphas["mix"], rtol=1e-6)
  assert not _equal(base.alphas, m.state.alphas)


# ------------------------------------------------------------------ warm-up


@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_warmup_trains_weights_only_then_alpha(mode):
  """Two warm-up steps leave alpha and its (Adam) optimizer state bit-identical while
  the weights train; the third step is the ordinary step. One compiled program."""
  model, variables, alphas, w_batch, a_batch = _tiny(jnp.float32)
  w_tx = optax.sgd(0.1, momentum=0.9)
  a_tx = optim.alpha_optimizer(default.search_phase(a_lr=0.05))
  warm = _jit_once(make_search_step(model, REGRESSION, w_tx, a_tx, mode, warmup_steps=2))
  plain = jax.jit(make_search_step(model, REGRESSION, w_tx, a_tx, mode))
  state = _state(variables, alphas, w_tx, a_tx)
  states, metrics = [state], []
  for _ in range(3):
    state, m = warm(state, w_batch, a_batch, KEY)
    states.append(state)
    metrics.append(m)
  for s, m in zip(states[1:3], metrics[:2]):
    assert _equal(s.alphas, alphas) and _equal(s.a_opt_state, a_tx.init(alphas))
    assert float(m["alpha_updated"]) == 0.0
  assert not _equal(states[1].params, states[0].params)
  assert not _equal(states[2].params, states[1].params)
  assert float(metrics[2]["alpha_updated"]) == 1.0
  assert np.all(states[3].alphas["mix"] != alphas["mix"])
  want, _ = plain(states[2], w_batch, a_batch, KEY)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               states[3], want)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("key,value,message", [
    ("mode", "third_order", "search_phase1.mode='third_order' is not one of"),
    ("warmup_epochs", 3, "search_phase1.warmup_epochs=3 must be in 0..2"),
    ("gumbel_tau_min", 0.0, "search_phase1.gumbel_tau_min=0.0 must be positive"),
    ("gumbel_tau_max", 0.05, "search_phase1.gumbel_tau_max=0.05 must be at least"),
    ("alpha_reference_steps", -1, "search_phase1.alpha_reference_steps=-1 must be 0"),
    ("alpha_lr_scale_max", 0.5, "search_phase1.alpha_lr_scale_max=0.5 must be at least 1"),
])
def test_config_checks_name_the_bad_key(key, value, message):
  config = quickstart.get_config()
  config.stages = "search_phase1"
  config.search_phase1.mode = "gumbel"
  validate(config)
  config.search_phase1[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(config)
