"""The one network definition: supernet mixture vs derived network."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fanas_jax.genotype import NAMED_GENOTYPES, SearchSpace
from fanas_jax.model import make_model, stage_widths

CANDIDATES = ("local3_h4", "local5_h8", "nonlocal")
SPACE = SearchSpace.uniform(CANDIDATES)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))


def perturb(variables, seed):
  """Zero-mean noise on every weight (zero-initialised BN scales would otherwise switch
  every residual branch off and make comparisons between ops trivial) and on the BN
  statistics (variances stay positive)."""
  def noisy(tree, seed, fn):
    leaves, treedef = jax.tree.flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        fn(path, a, 0.1 * jax.random.normal(k, a.shape)) for (path, a), k in zip(leaves, keys)])
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
  variables = supernet.init(jax.random.key(1), X, alphas)
  genotype = [["local5_h8", "local3_h4", "nonlocal"], ["local3_h4"] * 3,
              ["nonlocal", "local5_h8", "local5_h8"], ["local5_h8"] * 3,
              ["local3_h4", "nonlocal", "local3_h4"]]
  derived = make_model(tuple(tuple((op,) for op in ops) for ops in genotype), 16,
                       "classifier", num_classes=10)
  derived_shapes = jax.eval_shape(derived.init, jax.random.key(1), X)

  # Inherit: the derived net's param paths are a subset of the supernet's.
  def subtree(src, like):
    return {k: subtree(src[k], v) if isinstance(v, dict) else src[k]
            for k, v in like.items()}
  sup_vars = perturb(variables, 5)
  inherited = {c: subtree(sup_vars[c], derived_shapes[c]) for c in derived_shapes}
  want = derived.apply(inherited, X)
  got = supernet.apply(sup_vars, X, _one_hot_alphas(genotype))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 1e-3


def test_supernet_output_depends_on_alphas_and_has_alpha_gradients():
  model = make_model(SPACE.layer_ops(), 16, "car_decoder", out_channels=1)
  alphas = {k: 0.5 * jax.random.normal(jax.random.key(i), v)
            for i, (k, v) in enumerate(SPACE.alpha_shapes().items())}
  variables = perturb(model.init(jax.random.key(2), X, alphas), 3)
  out = model.apply(variables, X, alphas)
  assert out.shape == X.shape
  grads = jax.grad(lambda a: jnp.sum(model.apply(variables, X, a) ** 2))(alphas)
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def test_named_original_genotype_builds_at_cifar_width():
  g = NAMED_GENOTYPES["original"]
  model = make_model(g.layer_ops(), 96, "classifier", num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert 0.3e6 < n < 5e6
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))), shapes)
  assert logits.shape == (2, 10)


def test_supernet_without_alphas_is_an_error():
  model = make_model(SPACE.layer_ops(), 16, "classifier", num_classes=10)
  with pytest.raises(ValueError, match="needs alphas"):
    model.init(jax.random.key(0), X)
