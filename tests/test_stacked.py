"""The stacked supernet layer against the per-op mixture it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fanas_jax import inherit, steps
from fanas_jax.model import gumbel_path, make_model
from fanas_jax.objectives import make_objective
from fanas_jax.ops.attention import inner_window_bias, local_attention
from fanas_jax.ops.layers import ORIGINAL_OPS
from fanas_jax.ops.stacked import op_order
from tests.test_model import perturb

CANDIDATES = ORIGINAL_OPS + ("axial_h4",)
# One layer per stage, two of them mixtures (stride 1 at width 16; stride 2 with 16 -> 32
# channels), keeps the compile small; every candidate and both bottleneck shapes appear.
LAYER_OPS = ((CANDIDATES,), (CANDIDATES,), (("local3_h4",),), (("nonlocal",),),
             (("local5_h8",),))
# Fewer candidates for the sampled-path test, which runs the same per-op branches under
# both implementations, and for the second-order one: still a head count with mixed
# windows (3x3 inside 7x7), a second head count, and both ops that run alone (axial,
# non-local).
FEWER = ("local3_h4", "local7_h4", "local5_h8", "axial_h4", "nonlocal")
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
N = len(CANDIDATES)


def _models(layer_ops=LAYER_OPS, impls=("per_op", "stacked")):
  return [make_model(layer_ops, 16, "classifier", num_classes=10, supernet_impl=impl,
                     zero_init_residual=True) for impl in impls]


def _fewer(variables, fewer=FEWER):
  """(layer ops, variables, alphas) of the network whose mixtures hold only `fewer`:
  the full network's variables of those ops, and their columns of the alphas."""
  layer_ops = tuple(tuple(fewer if ops == CANDIDATES else ops for ops in stage)
                    for stage in LAYER_OPS)
  columns = jnp.asarray([CANDIDATES.index(op) for op in fewer])
  alphas = {k: a[:, columns] for k, a in _alphas().items()}
  shapes = jax.eval_shape(_models(layer_ops)[0].init, jax.random.key(1), X, alphas)
  sub = lambda src, like: {k: sub(src[k], v) if isinstance(v, dict) else src[k]
                           for k, v in like.items()}
  return layer_ops, {c: sub(variables[c], shapes[c]) for c in shapes}, alphas


def _alphas(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  return {f"stage{s + 1}": 0.5 * jax.random.normal(keys[s], (len(LAYER_OPS[s]), N))
          for s in range(5)}


def _rel_diff(want, got):
  """Norm-wise relative difference over the whole tree, ||got - want|| / ||want||.

  Per leaf, each also within 1e-3 of its own scale (a floor of 1e-3 of the
  largest leaf keeps gradients that are exactly 0 in exact arithmetic, such as the
  non-local phi bias's, from dividing noise by noise): a wrong leaf fails that, while
  rounding alone moves single small leaves of this train-mode network by ~3e-5
  (as much as a 1e-7 relative change of its input does).
  """
  want, got = jax.tree.leaves(want), jax.tree.leaves(got)
  scale = max(float(jnp.max(jnp.abs(a))) for a in want)
  for a, b in zip(want, got):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-3 * max(float(jnp.max(jnp.abs(a))),
                                                         1e-3 * scale)
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(want, got))
  return (diff / sum(float(jnp.sum(a ** 2)) for a in want)) ** 0.5


@pytest.fixture(scope="module")
def variables():
  per_op, stacked = _models()
  init = steps.init_variables(per_op, jax.random.key(1), X.shape, _alphas())
  # Both implementations build the same variable tree (initialisation runs the
  # per-op bottlenecks under both, so the values are the same code's).
  shapes = jax.eval_shape(stacked.init, jax.random.key(1), X, _alphas())
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
          == jax.tree.map(lambda a: (a.shape, a.dtype), init))
  # Noise of 0.02, not test_model's 0.1: at 0.1 this train-mode net over 2 images is
  # so sensitive that float32 rounding alone puts the per-op alpha gradient 0.9-2.7e-5
  # from its float64 value (seeds 3-5, jax 0.10.2), the bound compared at below. At
  # 0.02 that is 0.6-1.1e-6 and the two implementations agree to 1-2e-6 on jax 0.10.2
  # and 0.12.0.1, while every alpha gradient stays large (max 0.18-0.34); measured with
  # three layers per stage, and 0.6-1.5e-6 apart with this network's one on jax 0.10.2
  # (local attention dense on its small maps; 1.1-1.7e-6 in halo blocks).
  return perturb(init, 3, scale=0.02)


def _loss(model, variables, train, op_mask=None, path=None):
  def loss(params, alphas):
    out, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, X, alphas,
        train=train, op_mask=op_mask, path=path,
        mutable=["batch_stats"] if train else [])
    return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(out ** 2), updates
  return loss


def _op_mask():
  mask = {f"stage{s + 1}": jnp.ones((len(LAYER_OPS[s]), N), bool) for s in range(5)}
  mask["stage1"] = mask["stage1"].at[0, jnp.asarray([0, 6])].set(False)
  mask["stage2"] = mask["stage2"].at[0, jnp.asarray([2, 3, 7])].set(False)
  return mask


@pytest.mark.parametrize("impl", ["stacked", "stacked_window"])
@pytest.mark.parametrize("train", [True, False])
def test_stacked_equals_per_op_forward_and_gradients(variables, train, impl):
  """Training mode (batch statistics, their updates) with an op mask; evaluation
  mode (running statistics) without. Both stacked layouts: windows masked inside
  the largest one, and one attention per window."""
  op_mask = _op_mask() if train else None
  results = []
  for model in _models(impls=("per_op", impl)):
    grad = jax.value_and_grad(_loss(model, variables, train, op_mask), argnums=(0, 1),
                              has_aux=True)
    results.append(jax.jit(grad)(variables["params"], _alphas()))
  (want_loss, want_stats), want_grads = results[0]
  (got_loss, got_stats), got_grads = results[1]
  diffs = [_rel_diff(want_grads[i], got_grads[i]) for i in (0, 1)]
  print(f"relative difference: loss {abs(float(got_loss - want_loss) / want_loss):.2g}, "
        f"weight gradients {diffs[0]:.2g}, alpha gradients {diffs[1]:.2g}")
  assert abs(float(got_loss - want_loss)) <= 1e-5 * abs(float(want_loss))
  assert diffs[0] < 1e-5   # weights
  assert diffs[1] < 1e-5   # alphas
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads[1])) > 1e-4
  if not train:
    return
  # A masked op gets no gradient in either; the running statistics move, alike.
  assert float(jnp.abs(got_grads[1]["stage1"][0, 0])) == 0.0
  conv = got_grads[0]["backbone"]["stage1_layer1_local3_h4"]["conv_in"]["kernel"]
  assert float(jnp.abs(conv).max()) == 0.0
  assert jax.tree.structure(want_stats) == jax.tree.structure(got_stats)
  assert _rel_diff(want_stats, got_stats) < 1e-5
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       want_stats["batch_stats"], variables["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 1e-3


def _unrolled_alpha_grad(model, variables, alphas):
  """d/dalpha L(w - xi grad_w L(w, alpha), alpha), the virtual step of norm 0.01."""
  loss = _loss(model, variables, True)
  def outer(alphas):
    grads, _ = jax.grad(loss, has_aux=True)(variables["params"], alphas)
    xi = 0.01 / jax.lax.stop_gradient(optax.tree.norm(grads))
    virtual = jax.tree.map(lambda w, g: w - xi * g, variables["params"], grads)
    return loss(virtual, alphas)[0]
  return jax.jit(jax.grad(outer))(alphas)


@pytest.fixture(scope="module")
def second_order_per_op(variables):
  """(layer ops, variables, alphas, the per-op unrolled alpha gradient) on FEWER."""
  layer_ops, variables, alphas = _fewer(variables)
  per_op, = _models(layer_ops, ("per_op",))
  return layer_ops, variables, alphas, _unrolled_alpha_grad(per_op, variables, alphas)


@pytest.mark.parametrize("impl", ["stacked", "stacked_window"])
def test_stacked_equals_per_op_second_order_alpha_gradient(second_order_per_op, impl):
  """d/dalpha L(w - xi grad_w L(w, alpha), alpha): DARTS's unrolled gradient, with xi
  such that the virtual step has norm 0.01 (this perturbed net's gradients are large,
  and a long virtual step would compare chaos with chaos). FEWER candidates (every
  kind of group the stacked layer forms) keep the compile of the double pass short."""
  layer_ops, variables, alphas, want = second_order_per_op
  model, = _models(layer_ops, (impl,))
  diff = _rel_diff(want, _unrolled_alpha_grad(model, variables, alphas))
  print(f"relative difference of the second-order alpha gradients: {diff:.2g}")
  assert diff < 1e-5   # 1.9e-6 (both layouts) on jax 0.10.2


def test_sampled_path_is_the_same_under_both_implementations(variables):
  """Gumbel mode runs one op per layer; its gradient reaches alpha alike (FEWER
  candidates: each is a branch of the layer's conditional, compiled alike)."""
  layer_ops, variables, alphas = _fewer(variables)
  def path_loss(model, alphas):
    path = gumbel_path(alphas, jax.random.key(4), 1.0)
    return _loss(model, variables, True, path=path)(variables["params"], alphas)[0]
  want, got = (jax.jit(jax.grad(lambda a, m=m: path_loss(m, a)))(alphas)
               for m in _models(layer_ops))
  assert _rel_diff(want, got) < 1e-5


def _search_then_inherit(model, variables, alphas, layer_ops):
  """Two first-order search steps from `variables` and `alphas`, then the derived
  network of each layer's top op started from the result as train.init='supernet'
  does: (search state, derived layer ops, inherited variables)."""
  # Plain SGD on alpha too: its step is then its gradient (Adam's first steps are
  # about lr x sign(gradient), alike under any small difference).
  w_tx, a_tx = optax.sgd(0.01, momentum=0.9), optax.sgd(0.1)
  objective = make_objective("supervised", {})
  state = steps.SearchState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"], alphas=alphas,
                            w_opt_state=w_tx.init(variables["params"]),
                            a_opt_state=a_tx.init(alphas))
  step = jax.jit(steps.make_search_step(model, objective, w_tx, a_tx))
  images = jax.random.normal(jax.random.key(5), (2, 4) + X.shape[1:])
  labels = jnp.asarray([[1, 7, 3, 0], [4, 4, 9, 2]])
  for w_images, w_labels in ((images[0], labels[0]), (images[1], labels[1])):
    state, _ = step(state, {"image": w_images, "label": w_labels},
                    {"image": -w_images, "label": w_labels[::-1]}, jax.random.key(6))
  derived = tuple(
      tuple((ops[int(jnp.argmax(state.alphas[f"stage{s + 1}"][l]))],) if len(ops) > 1
            else ops for l, ops in enumerate(stage)) for s, stage in enumerate(layer_ops))
  fresh = steps.init_variables(
      make_model(derived, 16, "classifier", num_classes=10, zero_init_residual=True),
      jax.random.key(7), (1,) + X.shape[1:])
  supernet = {"params": state.params, "batch_stats": state.batch_stats}
  return state, derived, inherit.start_from_supernet(supernet, "a test")(fresh)


def test_a_stacked_supernet_searches_and_hands_on_the_per_op_derived_network(variables):
  """Search steps under stacked (the quickstart's layout) move weights, BN
  statistics and alphas as per_op does, derive the same ops, and inheritance copies
  the same derived network: both layouts keep one per-op variable tree. Three
  candidates (two windows of one head count, the 3x3 masked inside the 5x5, and
  non-local) keep the two search steps' compiles short."""
  layer_ops, variables, alphas = _fewer(variables, ("local3_h4", "local5_h4", "nonlocal"))
  results = [_search_then_inherit(model, variables, alphas, layer_ops)
             for model in _models(layer_ops, ("per_op", "stacked"))]
  (want_state, want_ops, want_vars), (got_state, got_ops, got_vars) = results
  start = {"params": variables["params"], "batch_stats": variables["batch_stats"],
           "alphas": alphas}
  moves = [[jax.tree.map(jnp.subtract, getattr(state, k), start[k])
            for state in (want_state, got_state)]
           for k in ("params", "batch_stats", "alphas")]
  # Norm-wise over each tree: a move is a difference of float32 values, so a leaf
  # that barely moves carries rounding of the values themselves (~1e-8).
  diffs = [float(optax.tree.norm(jax.tree.map(jnp.subtract, got, want))
                 / optax.tree.norm(want)) for want, got in moves]
  print(f"relative difference of what two search steps moved (params, statistics, "
        f"alphas): {', '.join(f'{d:.2g}' for d in diffs)}")
  assert max(diffs) < 1e-5
  assert all(max(float(jnp.abs(a).max()) for a in jax.tree.leaves(want)) > 1e-4
             for want, _ in moves)
  assert got_ops == want_ops
  assert _rel_diff(want_vars["params"]["backbone"], got_vars["params"]["backbone"]) < 1e-5
  assert _rel_diff(want_vars["batch_stats"], got_vars["batch_stats"]) < 1e-5
  chosen = f"stage1_layer1_{got_ops[0][0][0]}"
  for collection in ("params", "batch_stats"):
    got = got_vars[collection]["backbone"][chosen]
    assert jax.tree.all(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), got,
        getattr(got_state, collection)["backbone"][chosen]))


def test_op_order_groups_local_ops_by_heads_then_the_rest():
  ops = ("nonlocal", "local7_h8", "axial_h4", "local3_h4", "local5_h8", "local5_h4")
  assert [ops[i] for i in op_order(ops)] == [
      "local3_h4", "local5_h4", "local5_h8", "local7_h8", "axial_h4", "nonlocal"]


# A 9x7 map fits one default block, where `blocked` runs `dense`; block_size=4 keeps
# the halo form.
@pytest.mark.parametrize("impl,block_size", [("blocked", 4), ("dense", None),
                                             ("scan", None)])
@pytest.mark.parametrize("border", ["zero_pad", "mask"])
@pytest.mark.parametrize("inner", [3, 5])
def test_offset_bias_narrows_a_window_exactly(impl, block_size, border, inner):
  keys = jax.random.split(jax.random.key(inner), 5)
  q, k, v = (jax.random.normal(key, (2, 9, 7, 16)) for key in keys[:3])
  rel_row, rel_col = (jax.random.normal(key, (inner, 8)) for key in keys[3:])
  pad = lambda t: jnp.pad(t, (((7 - inner) // 2,) * 2, (0, 0)))
  options = dict(num_heads=4, border=border, impl=impl, block_size=block_size)
  want = local_attention(q, k, v, window=inner, rel_row=rel_row, rel_col=rel_col,
                         **options)
  got = local_attention(q, k, v, window=7, rel_row=pad(rel_row), rel_col=pad(rel_col),
                        offset_bias=jnp.asarray(inner_window_bias(7, inner)), **options)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_offset_bias_and_inner_window_are_errors():
  q = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="offset_bias must be"):
    local_attention(q, q, q, window=5, num_heads=2, offset_bias=jnp.zeros(3))
  with pytest.raises(ValueError, match="inner window"):
    inner_window_bias(5, 7)


def test_unknown_supernet_impl_is_refused():
  from fanas_jax.model import check_config
  from fanas_jax.configs import default
  cfg = default.get_config().model
  cfg.supernet_impl = "fused"
  with pytest.raises(ValueError, match="model.supernet_impl='fused'.*per_op, stacked"):
    check_config(cfg)
