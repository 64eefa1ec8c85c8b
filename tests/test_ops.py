"""Tests for the attention ops, checked against independent references."""
from __future__ import annotations

import functools

import flax
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from fanas_jax.ops import (BORDERS, AttentionStem, AxialAttention, Bottleneck,
                           ConvStem, LocalAttention, NonLocal, OPS, ORIGINAL_OPS,
                           OpOptions, STEMS, local_attention)
from fanas_jax.ops.attention import default_block_size

IMPLS = ("blocked", "scan", "dense")


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_local_attention(q, k, v, window, num_heads, rel_row=None,
                              rel_col=None, value_mix=None, border="mask"):
  """Brute force in float64: explicit loops over pixels, heads and offsets.

  border='mask': window positions outside the map are left out of the softmax;
  'zero_pad': they are zero keys and values that stay in it.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, height, width, channels = q.shape
  head_dim = channels // num_heads
  value_dim = v.shape[-1] // num_heads
  half = window // 2
  out = np.zeros((batch, height, width, v.shape[-1]))
  for y in range(height):
    for x in range(width):
      for n in range(num_heads):
        qs = slice(n * head_dim, (n + 1) * head_dim)
        vs = slice(n * value_dim, (n + 1) * value_dim)
        logits, values = [], []
        for dy in range(window):
          for dx in range(window):
            yy, xx = y + dy - half, x + dx - half
            inside = 0 <= yy < height and 0 <= xx < width
            if not inside and border == "mask":
              continue  # Outside the map: excluded from the softmax.
            key = k[:, yy, xx] if inside else np.zeros_like(k[:, 0, 0])
            if rel_row is not None:
              key = key + np.concatenate([rel_row[dy], rel_col[dx]])
            logits.append(
                np.sum(q[:, y, x, qs] * key[:, qs], -1) / np.sqrt(head_dim))
            value = v[:, yy, xx] if inside else np.zeros_like(v[:, 0, 0])
            if value_mix is not None:
              value = np.einsum("bmc,m->bc", value,
                                value_mix[dy * window + dx])
            values.append(value[:, vs])
        weights = _softmax(np.stack(logits, -1))
        out[:, y, x, vs] = np.einsum("bo,boc->bc", weights,
                                     np.stack(values, 1))
  return out


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_heads,channels,window,use_rel", [
    (1, 8, 3, True),
    (2, 8, 5, True),
    (4, 8, 3, False),
    (4, 8, 5, True),
    (3, 6, 3, True),  # Head 1 straddles the row/column halves.
])
def test_local_attention_matches_brute_force(num_heads, channels, window,
                                             use_rel, impl, border):
  rng = np.random.default_rng(0)
  q, k = _normal(rng, 2, 5, 7, channels), _normal(rng, 2, 5, 7, channels)
  v = _normal(rng, 2, 5, 7, 12)
  rel = {}
  if use_rel:
    rel = dict(rel_row=_normal(rng, window, channels // 2),
               rel_col=_normal(rng, window, channels // 2))
  out = local_attention(q, k, v, window=window, num_heads=num_heads, impl=impl,
                        border=border, **rel)
  expected = reference_local_attention(q, k, v, window, num_heads, **rel,
                                       border=border)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("height,width,window,block_size", [
    (12, 23, 5, None),  # Blocks of 6 (12); three blocks of 8 padded to 24 (23).
    (11, 9, 7, 2),      # A halo spanning several blocks; padded last block.
    (16, 8, 3, 4),      # Exact tiling; a single block along the width.
    (9, 10, 7, 9),      # Block larger than the width: one padded block.
    (5, 7, 5, 8),       # One padded block along both axes (by default: `dense`).
])
def test_blocked_layouts_match_brute_force(height, width, window, block_size,
                                           border):
  """Every halo layout (padding, multi-block halos, single blocks) is exact."""
  rng = np.random.default_rng(11)
  q, k, v = (_normal(rng, 1, height, width, 8) for _ in range(3))
  rel = dict(rel_row=_normal(rng, window, 4), rel_col=_normal(rng, window, 4))
  out = local_attention(q, k, v, window=window, num_heads=2, impl="blocked",
                        block_size=block_size, border=border, **rel)
  expected = reference_local_attention(q, k, v, window, 2, **rel, border=border)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_fused_block_attention_form_equals_the_einsum_form():
  """The cuDNN path's layout (padded values, dot_product_attention, slice back)
  checked through XLA's implementation of the same call."""
  from fanas_jax.ops.attention import _block_attention, _fused_block_attention
  rng = np.random.default_rng(14)
  q, k = _normal(rng, 3, 9, 2, 24), _normal(rng, 3, 25, 2, 24)
  v = _normal(rng, 3, 25, 2, 8)
  np.testing.assert_allclose(_fused_block_attention(q, k, v, "xla"),
                             _block_attention(q, k, v, "xla"), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="up to 128"):
    _block_attention(_normal(rng, 1, 4, 1, 136), _normal(rng, 1, 4, 1, 136), v[:1, :4, :1],
                     "cudnn")


def test_default_block_sizes_tile_the_paper_maps():
  assert [default_block_size(n) for n in (32, 16, 8, 28, 14, 7, 56, 12, 23)] == [
      8, 8, 8, 7, 7, 7, 8, 6, 8]


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("num_heads", [2, 8])  # 8: one head per channel.
def test_value_mix_matches_brute_force(num_heads, border):
  rng = np.random.default_rng(1)
  q, k = _normal(rng, 2, 4, 6, 8), _normal(rng, 2, 4, 6, 8)
  v = _normal(rng, 2, 4, 6, 3, 8)
  mix = rng.random((9, 3)).astype(np.float32)
  out = local_attention(q, k, v, window=3, num_heads=num_heads, value_mix=mix,
                        impl="scan", border=border)
  expected = reference_local_attention(q, k, v, 3, num_heads, value_mix=mix,
                                       border=border)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("zero_rel", [False, True])
def test_whole_map_window_is_global_attention(zero_rel, impl):
  rng = np.random.default_rng(2)
  batch, height, width, heads = 2, 4, 6, 2
  window = 2 * max(height, width) - 1
  q, k = _normal(rng, batch, height, width, 8), _normal(rng, batch, height,
                                                        width, 8)
  v = _normal(rng, batch, height, width, 8)  # The reference needs Cv == C.
  rel = {}
  if zero_rel:
    rel = dict(rel_row=np.zeros((window, 4), np.float32),
               rel_col=np.zeros((window, 4), np.float32))
  out = local_attention(q, k, v, window=window, num_heads=heads, impl=impl,
                        border="mask", **rel)
  tokens = lambda a: a.reshape(batch, height * width, heads, -1)
  expected = jax.nn.dot_product_attention(tokens(q), tokens(k), tokens(v))
  np.testing.assert_allclose(out, expected.reshape(out.shape), atol=1e-5,
                             rtol=1e-5)


def test_whole_map_window_with_value_mix_matches_brute_force():
  rng = np.random.default_rng(3)
  q, k = _normal(rng, 1, 3, 5, 4), _normal(rng, 1, 3, 5, 4)
  v = _normal(rng, 1, 3, 5, 2, 4)
  mix = rng.random((81, 2)).astype(np.float32)
  out = local_attention(q, k, v, window=9, num_heads=1, value_mix=mix,
                        impl="scan", border="mask")
  expected = reference_local_attention(q, k, v, 9, 1, value_mix=mix)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_local_attention_module_is_translation_equivariant(impl):
  window, shift = 3, (1, 2)
  module = LocalAttention(channels=8, window=window, num_heads=4, impl=impl)
  x = jnp.asarray(_normal(np.random.default_rng(4), 1, 10, 12, 8))
  params = module.init(jax.random.key(0), x)
  out = module.apply(params, x)
  out_shifted = module.apply(params, jnp.roll(x, shift, axis=(1, 2)))
  half = window // 2
  # Pixels whose windows touch neither the border nor the roll's wrap seam.
  np.testing.assert_allclose(
      out_shifted[:, half + shift[0]:-half, half + shift[1]:-half],
      out[:, half:-half - shift[0], half:-half - shift[1]], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_count_changes_the_output(impl):
  rng = np.random.default_rng(5)
  q, k, v = (_normal(rng, 2, 6, 6, 16) for _ in range(3))
  rel = dict(rel_row=_normal(rng, 3, 8), rel_col=_normal(rng, 3, 8))
  four = local_attention(q, k, v, window=3, num_heads=4, impl=impl, **rel)
  eight = local_attention(q, k, v, window=3, num_heads=8, impl=impl, **rel)
  assert np.max(np.abs(four - eight)) > 1e-2


def test_local_attention_gradients_match_finite_differences():
  """Each function is jitted: check_grads evaluates it and its VJP at many points of
  one shape, so one compile each replaces hundreds of float64 op-by-op dispatches."""
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(rng.standard_normal((1, 3, 4, 4))) for _ in range(3))
    rel_row, rel_col = (jnp.asarray(rng.standard_normal((3, 2)))
                        for _ in range(2))
    fn = lambda *args, **kw: local_attention(*args, window=3, num_heads=2,
                                             **kw)
    for impl in IMPLS:
      for border in BORDERS:
        check_grads(jax.jit(lambda q, k, v, row, col: fn(
            q, k, v, rel_row=row, rel_col=col, impl=impl, border=border)),
                    (q, k, v, rel_row, rel_col), order=1, modes=["rev"])
    # A padded, multi-block halo layout.
    q5, k5, v5 = (jnp.asarray(rng.standard_normal((1, 5, 5, 4))) for _ in range(3))
    check_grads(jax.jit(lambda q, k, v, row, col: fn(q, k, v, rel_row=row, rel_col=col,
                                                     block_size=2)),
                (q5, k5, v5, rel_row, rel_col), order=1, modes=["rev"])
    mixed_v = jnp.asarray(rng.standard_normal((1, 3, 4, 2, 4)))
    mix = jnp.asarray(rng.random((9, 2)))
    check_grads(jax.jit(lambda v, mix: fn(q, k, v, value_mix=mix, impl="scan")),
                (mixed_v, mix), order=1, modes=["rev"])


def _intermediate_sizes(fn, *args) -> list[int]:
  """Element counts of every value in fn's jaxpr, nested jaxprs included."""
  sizes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sizes


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_neighbourhood_tensor_is_never_materialised(impl, border):
  # 12x12 tiles into 2x2 blocks of 6, each attending to its 10x10 halo region.
  batch, height, width, channels, window, heads = 2, 12, 12, 64, 5, 2
  rng = np.random.default_rng(7)
  q, k, v = (_normal(rng, batch, height, width, channels) for _ in range(3))
  rel = _normal(rng, window, channels // 2)
  # Anything holding half of the (B, H, W, k*k, C) neighbourhood, in any
  # layout (e.g. scan-stacked [k*k, B, H, W, C] residuals), is flagged. The
  # legitimate per-head logits (scan: k*k per pixel; blocked: 10*10 per pixel)
  # and the blocked halo keys ((10/6)^2 * 2 heads * 56 channels per pixel) fit.
  limit = batch * height * width * window**2 * channels // 2

  def loss(q, k, v, rel):
    return local_attention(q, k, v, window=window, num_heads=heads,
                           rel_row=rel, rel_col=rel, impl=impl,
                           border=border).sum()

  assert max(_intermediate_sizes(loss, q, k, v, rel)) < limit
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  assert max(_intermediate_sizes(grad, q, k, v, rel)) < limit

  def gathered_keys(k):  # Positive control: the layout the check must catch.
    padded = jnp.pad(k, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return jnp.stack([padded[:, dy:dy + height, dx:dx + width]
                      for dy in range(window) for dx in range(window)], 3)

  assert max(_intermediate_sizes(gathered_keys, k)) >= limit


def test_local_attention_rejects_bad_shapes():
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="odd"):
    local_attention(x, x, x, window=4, num_heads=2)
  with pytest.raises(ValueError, match="heads"):
    local_attention(x, x, x, window=3, num_heads=3)
  with pytest.raises(ValueError, match="together"):
    local_attention(x, x, x, window=3, num_heads=2, rel_row=jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="blocked, scan"):
    local_attention(x, x, x, window=3, num_heads=2, impl="gather")
  with pytest.raises(ValueError, match="impl='scan'"):
    local_attention(x, x, x[..., None, :], window=3, num_heads=2,
                    value_mix=jnp.ones((9, 1)))
  with pytest.raises(ValueError, match="xla, cudnn"):
    local_attention(x, x, x, window=3, num_heads=2, backend="triton")
  with pytest.raises(ValueError, match="zero_pad, mask"):
    local_attention(x, x, x, window=3, num_heads=2, border="reflect")


def test_nonlocal_starts_as_identity_then_matches_embedded_gaussian():
  """theta/phi/g/out are 1x1 convs with bias at the input width; BN after out
  starts at scale 0 and bias 0; softmax over all H*W without 1/sqrt(d)."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(_normal(rng, 2, 3, 4, 8))
  module = NonLocal(channels=8)
  variables = module.init(jax.random.key(0), x)
  np.testing.assert_array_equal(module.apply(variables, x), x)
  params = flax.core.unfreeze(variables["params"])
  assert {n: p["kernel"].shape for n, p in params.items() if n != "bn"} == {
      n: (1, 1, 8, 8) for n in ("theta", "phi", "g", "out")}
  assert all(params[n]["bias"].shape == (8,) for n in ("theta", "phi", "g", "out"))
  assert np.all(params["bn"]["scale"] == 0) and np.all(params["bn"]["bias"] == 0)

  params["bn"]["scale"] = jnp.ones_like(params["bn"]["scale"])
  params["bn"]["bias"] = jnp.full_like(params["bn"]["bias"], 0.3)
  out = module.apply({**variables, "params": params}, x)

  def conv(name, a):
    p = params[name]
    return a @ np.asarray(p["kernel"], np.float64)[0, 0] + np.asarray(p["bias"])
  tokens = np.asarray(x, np.float64).reshape(2, 12, 8)
  theta, phi, g = (conv(n, tokens) for n in ("theta", "phi", "g"))
  attn = _softmax(np.einsum("bic,bjc->bij", theta, phi))  # No 1/sqrt(d).
  # Eval-mode BN at init statistics (mean 0, var 1) only divides by sqrt(1+eps).
  y = conv("out", attn @ g) / np.sqrt(1 + 1e-5) + 0.3
  np.testing.assert_allclose(out, (tokens + y).reshape(x.shape), atol=1e-4,
                             rtol=1e-4)


def _reference_axial(x, kernels, num_heads):
  """Row attention then column attention, in float64 numpy with explicit heads."""
  x = np.asarray(x, np.float64)
  for axis, name in ((2, "row"), (1, "column")):
    q, k, v = (np.einsum("bhwc,cnd->bhwnd", x, np.asarray(kernels[name][p], np.float64))
               for p in ("query", "key", "value"))
    if axis == 2:
      logits = np.einsum("bhind,bhjnd->bhnij", q, k) / np.sqrt(q.shape[-1])
      y = np.einsum("bhnij,bhjnd->bhind", _softmax(logits), v)
    else:
      logits = np.einsum("biwnd,bjwnd->bwnij", q, k) / np.sqrt(q.shape[-1])
      y = np.einsum("bwnij,bjwnd->biwnd", _softmax(logits), v)
    x = y.reshape(x.shape)
  return x


@pytest.mark.parametrize("num_heads", [2, 4])
def test_axial_attention_matches_row_then_column_reference(num_heads):
  x = jnp.asarray(_normal(np.random.default_rng(12), 2, 5, 6, 8))
  module = AxialAttention(channels=8, num_heads=num_heads)
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]
  kernels = {name: {p: params[f"{name}_{p}"]["kernel"]
                    for p in ("query", "key", "value")}
             for name in ("row", "column")}
  np.testing.assert_allclose(module.apply(variables, x),
                             _reference_axial(x, kernels, num_heads),
                             atol=1e-5, rtol=1e-5)


def test_registry_lists_original_ops_and_reports_valid_choices():
  assert ORIGINAL_OPS == ("local3_h4", "local5_h4", "local7_h4", "local3_h8",
                          "local5_h8", "local7_h8", "nonlocal")
  assert sorted(OPS.names()) == sorted(ORIGINAL_OPS + ("axial_h4", "axial_h8"))
  for name in ORIGINAL_OPS:
    spec = OPS.get(name)
    assert spec.name == name
    assert spec.is_global == (name == "nonlocal")
    assert spec.post_norm == (not spec.is_global)
    assert spec.window == (None if spec.is_global else int(name[5]))
  with pytest.raises(ValueError) as error:
    OPS.get("local9_h4", key="op")
  assert all(name in str(error.value) for name in ORIGINAL_OPS)
  with pytest.raises(ValueError, match="valid choices"):
    Bottleneck("conv3x3", 16).init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)),
                                   train=False)


def _paths(tree) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _shared_paths(post_norm: bool, shortcut: bool) -> set[str]:
  layers = ["conv_in", "bn_in", "conv_out", "bn_out"]
  layers += ["bn_op"] * post_norm + ["shortcut_conv", "shortcut_bn"] * shortcut
  return {f"{layer}/{leaf}" for layer in layers
          for leaf in (("kernel",) if "conv" in layer else ("scale", "bias"))}


@pytest.mark.parametrize("op", ORIGINAL_OPS + ("axial_h4", "axial_h8"))
def test_bottleneck_shapes_and_param_paths(op):
  spec = OPS.get(op)
  for in_channels, features, stride in [(16, 16, 1), (16, 32, 1), (16, 32, 2),
                                        (32, 32, 2)]:
    x = jnp.ones((2, 8, 8, in_channels))
    block = Bottleneck(op, features, stride)
    variables = jax.eval_shape(functools.partial(block.init, train=False),
                               jax.random.key(0), x)
    out = jax.eval_shape(functools.partial(block.apply, train=False),
                         variables, x)
    assert out.shape == (2, 8 // stride, 8 // stride, features)
    paths = _paths(variables["params"])
    shortcut = stride == 2 or in_channels != features
    shared = {p for p in paths if not p.startswith("op/")}
    assert shared == _shared_paths(spec.post_norm, shortcut)
    if spec.is_global:
      expected_op = {f"op/{n}/{leaf}" for n in ("theta", "phi", "g", "out")
                     for leaf in ("kernel", "bias")} | {"op/bn/scale", "op/bn/bias"}
      assert paths["op/theta/kernel"] == (1, 1, features // 2, features // 2)
    elif op.startswith("axial"):
      expected_op = {f"op/{axis}_{p}/kernel" for axis in ("row", "column")
                     for p in ("query", "key", "value")}
      assert paths["op/row_query/kernel"] == (
          features // 2, spec.num_heads, features // 2 // spec.num_heads)
    else:
      expected_op = {"op/query/kernel", "op/key/kernel", "op/value/kernel",
                     "op/rel_row", "op/rel_col"}
      assert paths["op/rel_row"] == (spec.window, features // 4)
    assert set(paths) - shared == expected_op


def test_bottleneck_shared_params_identical_across_ops():
  x = jnp.ones((2, 8, 8, 16))
  shapes = {}
  for op in ORIGINAL_OPS:
    init = functools.partial(Bottleneck(op, 32, 2).init, train=False)
    variables = jax.eval_shape(init, jax.random.key(0), x)
    shapes[op] = {p: s for p, s in _paths(variables["params"]).items()
                  if not p.startswith(("op/", "bn_op/"))}
  assert all(s == shapes["local3_h4"] for s in shapes.values())


@pytest.mark.parametrize("op", ["local3_h8", "nonlocal"])
def test_bottleneck_train_updates_every_batch_stat(op):
  x = jnp.asarray(_normal(np.random.default_rng(9), 2, 6, 6, 16))
  block = Bottleneck(op, 16, 1)
  variables = block.init(jax.random.key(0), x, train=False)
  out, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
  assert np.all(np.isfinite(out))
  before = _flat_values(variables["batch_stats"])
  after = _flat_values(updates["batch_stats"])
  assert before.keys() == after.keys() and len(before) == 6  # 3 BN layers.
  for path in before:
    assert not np.allclose(before[path], after[path]), path


def _flat_values(tree) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {path: np.asarray(leaf) for path, leaf in flat.items()}


@pytest.mark.parametrize("op", ["local5_h4", "nonlocal"])
def test_bottleneck_bfloat16_computes_in_bf16_with_f32_params(op):
  x = jnp.ones((2, 8, 8, 16), jnp.bfloat16)
  block = Bottleneck(op, 16, 2, dtype=jnp.bfloat16)
  variables = block.init(jax.random.key(0), x, train=False)
  out = block.apply(variables, x, train=False)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4, 16)
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("op", sorted(OPS.names()))
def test_each_op_in_bfloat16_is_close_to_float32(op):
  """Relative L2 error under 1e-2, weights made non-trivial (BN scales of 1)."""
  x = jnp.asarray(_normal(np.random.default_rng(13), 2, 8, 8, 32))
  module = OPS.get(op).make(32, OpOptions(), "op")
  variables = module.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.ones_like(a) if "scale" in jax.tree_util.keystr(p) else a,
      variables)
  want = np.asarray(module.apply(variables, x))
  bf16 = OPS.get(op).make(32, OpOptions(dtype=jnp.bfloat16), "op")
  got = np.asarray(bf16.apply(variables, x.astype(jnp.bfloat16)), np.float32)
  assert np.all(np.isfinite(got))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.parametrize("in_channels,num_heads", [(3, 1), (1, 2)])
def test_attention_stem_shape(in_channels, num_heads):
  x = jnp.asarray(_normal(np.random.default_rng(10), 2, 6, 6, in_channels))
  spec = STEMS.get("attention")
  stem = spec.make(16, OpOptions(), "stem").clone(num_heads=num_heads)
  variables = stem.init(jax.random.key(0), x, train=False)
  out = stem.apply(variables, x, train=False)
  assert out.shape == (2, 6, 6, 16) and spec.reduction == 1
  assert np.all(np.asarray(out) >= 0) and np.any(np.asarray(out) > 0)
  assert variables["params"]["value"]["kernel"].shape == (in_channels, 4, 16)


def test_conv_stem_shape():
  spec = STEMS.get("conv")
  stem = spec.make(16, OpOptions(), "stem")
  assert isinstance(stem, ConvStem) and spec.reduction == 8
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.eval_shape(functools.partial(stem.init, train=False),
                             jax.random.key(0), x)
  out = jax.eval_shape(functools.partial(stem.apply, train=False), variables,
                       x)
  assert out.shape == (2, 32 // spec.reduction, 32 // spec.reduction, 16)
  # The authors' widths 3 -> C/2 -> C -> C.
  assert [variables["params"][f"conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [
      (3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 16)]
  assert STEMS.names() == ["attention", "conv"]
  assert isinstance(STEMS.get("attention").make(8, OpOptions(), "stem"), AttentionStem)


@pytest.mark.parametrize("options, message", [
    (dict(border="reflect"), "Unknown local attention border 'reflect'; valid: zero_pad, mask"),
    (dict(impl="gather"), "Unknown local attention implementation 'gather'; valid: blocked, scan, dense"),
    (dict(block_size=0), "block_size must be positive, got 0"),
    (dict(offset_bias=jnp.zeros(5)), r"offset_bias must be \[3\]"),
])
def test_bad_local_attention_options_are_errors_that_name_the_choices(options, message):
  q = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match=message):
    local_attention(q, q, q, window=3, num_heads=2, **options)


def test_value_mix_needs_the_scan_implementation():
  q = jnp.zeros((1, 4, 4, 8))
  v = jnp.zeros((1, 4, 4, 2, 8))
  with pytest.raises(ValueError, match=r"value_mix \(the attention stem\) needs impl='scan'"):
    local_attention(q, q, v, window=3, num_heads=2, value_mix=jnp.zeros((9, 2)))
