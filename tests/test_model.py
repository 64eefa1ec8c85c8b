"""The one network definition: supernet mixture vs derived network."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fanas_jax import steps
from fanas_jax.genotype import NAMED_GENOTYPES, Genotype, SearchSpace
from fanas_jax.model import make_model, stage_widths

CANDIDATES = ("local3_h4", "local5_h8", "nonlocal")
SPACE = SearchSpace.uniform(CANDIDATES)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))


def perturb(variables, seed, scale=0.1):
  """Zero-mean noise of std `scale` on every weight (zero-initialised BN scales would
  otherwise switch every residual branch off and make comparisons between ops trivial)
  and on the BN statistics (variances stay positive)."""
  def noisy(tree, seed, fn):
    leaves, treedef = jax.tree.flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        fn(path, a, scale * jax.random.normal(k, a.shape))
        for (path, a), k in zip(leaves, keys)])
  is_var = lambda path: jax.tree_util.keystr(path).endswith("['var']")
  return {"params": noisy(variables["params"], seed, lambda p, a, n: a + n),
          "batch_stats": noisy(variables["batch_stats"], seed + 1,
                               lambda p, a, n: a * jnp.exp(n) if is_var(p) else a + n)}


def _one_hot_alphas(genotype):
  """Alphas whose softmax is exactly one-hot in float32 (logit gap 1e4)."""
  return {f"stage{s + 1}": jnp.asarray(
      [[1e4 if op == chosen else 0.0 for op in CANDIDATES] for chosen in ops])
      for s, ops in enumerate(genotype)}


def test_stage_widths_double_at_reduce_stages():
  assert stage_widths(16) == [16, 32, 32, 64, 64]


def test_one_hot_supernet_equals_derived_network_with_its_weights():
  supernet = make_model(SPACE.layer_ops(), 16, "classifier", num_classes=10)
  alphas = {k: jnp.zeros(v) for k, v in SPACE.alpha_shapes().items()}
  variables = steps.init_variables(supernet, jax.random.key(1), X.shape, alphas)
  genotype = [["local5_h8", "local3_h4", "nonlocal"], ["local3_h4"] * 3,
              ["nonlocal", "local5_h8", "local5_h8"], ["local5_h8"] * 3,
              ["local3_h4", "nonlocal", "local3_h4"]]
  derived = make_model(tuple(tuple((op,) for op in ops) for ops in genotype), 16,
                       "classifier", num_classes=10)
  derived_init = steps.init_variables(derived, jax.random.key(1), X.shape)

  # Inherit: the derived net's param paths are the supernet's, except the stage
  # preprocess BN's scale and bias (not affine in the supernet: 1 and 0).
  def subtree(src, like):
    return {k: subtree(src.get(k, {}), v) if isinstance(v, dict) else src.get(k, v)
            for k, v in like.items()}
  sup_vars = perturb(variables, 5)
  inherited = {c: subtree(sup_vars[c], derived_init[c]) for c in derived_init}
  want = jax.jit(derived.apply)(inherited, X)
  got = jax.jit(supernet.apply)(sup_vars, X, _one_hot_alphas(genotype))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 1e-3


def test_supernet_output_depends_on_alphas_and_has_alpha_gradients():
  model = make_model(SPACE.layer_ops(), 16, "car_decoder", out_channels=1)
  alphas = {k: 0.5 * jax.random.normal(jax.random.key(i), v)
            for i, (k, v) in enumerate(SPACE.alpha_shapes().items())}
  variables = perturb(steps.init_variables(model, jax.random.key(2), X.shape, alphas), 3)
  out = jax.jit(model.apply)(variables, X, alphas)
  assert out.shape == X.shape
  grads = jax.jit(jax.grad(lambda a: jnp.sum(model.apply(variables, X, a) ** 2)))(alphas)
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def _random_variables(shapes, seed):
  """Numpy-random weights of the given shapes: far cheaper than compiling a big
  network's initialisers on CPU, and non-degenerate (no zero BN scales)."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['var']", "['scale']")):
      value = rng.uniform(0.5, 1.5, x.shape)
    elif name.endswith("['kernel']"):  # fan-in scaling keeps the signal alive
      value = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    else:
      value = 0.1 * rng.standard_normal(x.shape)
    return jnp.asarray(value, x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize("width,size,stem,classes", [
    (96, 32, "attention", 10),   # the CIFAR network
    (112, 224, "conv", 1000),    # the ImageNet network
])
def test_named_original_genotype_builds_and_runs(width, size, stem, classes):
  g = NAMED_GENOTYPES["original"]
  model = make_model(g.layer_ops(), width, "classifier", stem=stem, num_classes=classes)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert 0.3e6 < n < 2e7
  logits = jax.jit(model.apply)(_random_variables(shapes, 0), x)
  assert logits.shape == (2, classes) and np.all(np.isfinite(logits))


def test_op_mask_equals_the_supernet_without_the_masked_ops():
  """Masked candidates weigh exactly 0 and get no alpha gradient: the network is
  the smaller supernet of the live candidates, with the same weights."""
  kept = CANDIDATES[:2]
  full = make_model(SPACE.layer_ops(), 16, "classifier", num_classes=10)
  small = make_model(SearchSpace.uniform(kept).layer_ops(), 16, "classifier",
                     num_classes=10)
  alphas = {k: jax.random.normal(jax.random.key(i), v)
            for i, (k, v) in enumerate(SPACE.alpha_shapes().items())}
  variables = perturb(steps.init_variables(full, jax.random.key(4), X.shape, alphas), 6)
  small_shapes = jax.eval_shape(small.init, jax.random.key(4), X,
                                {k: a[:, :2] for k, a in alphas.items()})
  sub = lambda src, like: {k: sub(src[k], v) if isinstance(v, dict) else src[k]
                           for k, v in like.items()}
  small_vars = {c: sub(variables[c], small_shapes[c]) for c in small_shapes}
  mask = {k: jnp.asarray([[op in kept for op in CANDIDATES]] * 3) for k in alphas}

  masked = lambda a: full.apply(variables, X, a, op_mask=mask)
  want = jax.jit(small.apply)(small_vars, X, {k: a[:, :2] for k, a in alphas.items()})
  np.testing.assert_allclose(jax.jit(masked)(alphas), want, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda a: jnp.sum(masked(a) ** 2)))(alphas)
  for name, g in grads.items():
    assert np.all(g[:, 2] == 0) and np.abs(g[:, :2]).max() > 0, name


def test_blocked_and_scan_attention_give_the_same_supernet():
  alphas = {k: jax.random.normal(jax.random.key(i), v)
            for i, (k, v) in enumerate(SPACE.alpha_shapes().items())}
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  models = [make_model(SPACE.layer_ops(), 16, "classifier", num_classes=10,
                       attention_impl=impl) for impl in ("blocked", "scan")]
  variables = perturb(steps.init_variables(models[0], jax.random.key(3), x.shape, alphas),
                      7)
  blocked, scan = (jax.jit(m.apply)(variables, x, alphas) for m in models)
  np.testing.assert_allclose(blocked, scan, rtol=1e-4, atol=1e-5)


def test_bfloat16_network_is_finite_and_close_to_float32():
  """bf16 compute with f32 params: logits within 1e-2 relative (L2) of float32
  (inference with fixed BN statistics; per-op errors are in test_ops)."""
  g = NAMED_GENOTYPES["original"]
  x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  f32, bf16 = (make_model(g.layer_ops(), 32, "classifier", num_classes=10, dtype=dt)
               for dt in (jnp.float32, jnp.bfloat16))
  shapes = jax.eval_shape(f32.init, jax.random.key(0), x)
  variables = _random_variables(shapes, 1)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
      jax.eval_shape(bf16.init, jax.random.key(0), x)))
  want = np.asarray(jax.jit(f32.apply)(variables, x))
  got = np.asarray(jax.jit(bf16.apply)(variables, x))
  assert np.all(np.isfinite(got))
  # The logits must depend on the input, or closeness would be trivial.
  assert np.abs(want - want.mean(0)).max() > 0.01 * np.abs(want).max()
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert error < 1e-2, error


def test_supernet_without_alphas_is_an_error():
  model = make_model(SPACE.layer_ops(), 16, "classifier", num_classes=10)
  with pytest.raises(ValueError, match="needs alphas"):
    model.init(jax.random.key(0), X)


@pytest.mark.parametrize("impl", ["per_op", "stacked_window"])
def test_init_variables_are_bitwise_those_of_flax_init(impl):
  """init_variables runs only the initializers (the network's init, dead code
  eliminated): the same variables, bitwise, as flax's lazy_init."""
  space = SearchSpace.uniform(("local3_h4", "local5_h4", "nonlocal"), layers=1)
  supernet = make_model(space.layer_ops(), 16, "classifier", num_classes=10,
                        supernet_impl=impl, attention_impl="blocked")
  alphas = {k: jnp.zeros(v) for k, v in space.alpha_shapes().items()}
  genotype = Genotype((("local3_h4",), ("local5_h8",), ("nonlocal",), ("local7_h4",),
                       ("local3_h8",)))
  derived = make_model(genotype.layer_ops(), 16, "classifier", num_classes=10)
  rng, x = jax.random.key(3), jnp.zeros((1, 8, 8, 1))
  for model, extra in ((supernet, (alphas,)), (derived, ())):
    got = steps.init_variables(model, rng, x.shape, *extra)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, *extra))
    want = model.lazy_init(rng, *shapes)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.dtype == b.dtype and np.array_equal(a, b)


def test_init_variables_refuses_a_variable_computed_from_the_input():
  class FromInput(nn.Module):
    @nn.compact
    def __call__(self, x):
      return self.variable("batch_stats", "mean", lambda: x.mean(0)).value

  with pytest.raises(ValueError, match="depends on the network's input or alphas"):
    steps.init_variables(FromInput(), jax.random.key(0), (2, 3))
