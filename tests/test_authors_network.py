"""The authors' network, module by module, against independent numpy references.

Each registered module runs with its own initialised parameters; the references
rebuild its output from those parameters the way the authors' PyTorch code does
(zero-pad the map, then project; unfold windows; align_corners interpolation).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fanas_jax.configs import default
from fanas_jax.genotype import NAMED_GENOTYPES, SearchSpace
from fanas_jax.model import (CARDecoder, ClassifierHead, align_corners_matrix,
                             check_config, make_model, model_options,
                             resize_align_corners)
from fanas_jax.ops import (BORDERS, AttentionStem, Bottleneck, ConvStem,
                           LocalAttention)

BN_EVAL = 1 / np.sqrt(1 + 1e-5)  # Eval-mode BN at its initial statistics.


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _windows(a: np.ndarray, window: int) -> np.ndarray:
  """[B, H+k-1, W+k-1, ...] padded map -> [B, H, W, k, k, ...] (PyTorch's unfold)."""
  height, width = a.shape[1] - window + 1, a.shape[2] - window + 1
  return np.stack([np.stack([a[:, dy:dy + height, dx:dx + width]
                             for dx in range(window)], 3)
                   for dy in range(window)], 3)


def _inside(height: int, width: int, window: int) -> np.ndarray:
  """[1, H, W, k, k] whether each window position lies inside the map."""
  ones = np.pad(np.ones((1, height, width)), [(0, 0)] + [(window // 2,) * 2] * 2)
  return _windows(ones, window) > 0


def numpy_local_attention_module(params, x, window: int, num_heads: int,
                                 border: str) -> np.ndarray:
  """The authors' AttentionConv with multi-head logits, in float64.

  Zero-pad the input map, project keys and values of the padded map (bias-free,
  so padded keys and values are 0), add rel_row to the first half of the key
  channels by row offset and rel_col to the second half by column offset.
  """
  x = np.asarray(x, np.float64)
  p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else
       {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
  batch, height, width, _ = x.shape
  half = window // 2
  padded = np.pad(x, [(0, 0), (half, half), (half, half), (0, 0)])
  q = x @ p["query"]["kernel"]
  k = _windows(padded @ p["key"]["kernel"], window)  # [B, H, W, ky, kx, C]
  v = _windows(padded @ p["value"]["kernel"], window)
  channels = q.shape[-1]
  rel = np.concatenate([
      np.broadcast_to(p["rel_row"][:, None, :], (window, window, channels // 2)),
      np.broadcast_to(p["rel_col"][None, :, :], (window, window, channels // 2))], -1)
  k = k + rel
  d = channels // num_heads
  heads = lambda a: a.reshape(a.shape[:-1] + (num_heads, d))
  logits = np.einsum("bhwnd,bhwyxnd->bhwnyx", heads(q), heads(k)) / np.sqrt(d)
  if border == "mask":
    inside = _inside(height, width, window)[:, :, :, None]
    logits = np.where(inside, logits, -np.inf)
  weights = _softmax(logits.reshape(logits.shape[:4] + (-1,)), -1)
  weights = weights.reshape(logits.shape)
  out = np.einsum("bhwnyx,bhwyxnd->bhwnd", weights, heads(v))
  return out.reshape(batch, height, width, channels)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("impl", ["blocked", "scan"])
@pytest.mark.parametrize("window,num_heads,size", [(3, 2, (5, 6)), (7, 4, (6, 5))])
def test_local_attention_module_matches_zero_padding_reference(window, num_heads,
                                                               size, impl, border):
  """The whole map, borders included (a 7x7 window on a 6x5 map is all border)."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 8))
  module = LocalAttention(8, window, num_heads, impl=impl, border=border)
  variables = module.init(jax.random.key(1), x)
  params = variables["params"]
  assert not np.allclose(params["rel_row"], params["rel_col"])
  want = numpy_local_attention_module(params, x, window, num_heads, border)
  np.testing.assert_allclose(module.apply(variables, x), want, atol=2e-5, rtol=1e-4)


def test_zero_padding_and_masking_differ_only_near_the_border():
  x = jax.random.normal(jax.random.key(2), (1, 7, 7, 8))
  modules = [LocalAttention(8, 3, 2, border=b) for b in ("zero_pad", "mask")]
  variables = modules[0].init(jax.random.key(3), x)
  pad, mask = (np.asarray(m.apply(variables, x)) for m in modules)
  np.testing.assert_allclose(pad[:, 1:-1, 1:-1], mask[:, 1:-1, 1:-1], atol=1e-6)
  for edge in (pad[:, 0] - mask[:, 0], pad[:, :, -1] - mask[:, :, -1]):
    assert np.abs(edge).min() > 0


def numpy_attention_stem(params, x, border: str, window: int = 3) -> np.ndarray:
  """The authors' AttentionStem: per-channel logits q_c k_c over the zero-padded
  window; each offset's value mixes the M value projections by softmax over M of
  emb_mix . (emb_row[dy] + emb_col[dx]); then BN (eval, initial stats) and ReLU."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), flax.core.unfreeze(params))
  x = np.asarray(x, np.float64)
  _, height, width, _ = x.shape
  half = window // 2
  padded = np.pad(x, [(0, 0), (half, half), (half, half), (0, 0)])
  q = x @ p["query"]["kernel"]
  k = _windows(padded @ p["key"]["kernel"], window)  # [B, H, W, ky, kx, C]
  v = _windows(np.einsum("bhwi,imc->bhwmc", padded, p["value"]["kernel"]), window)
  mix_logits = np.einsum("mc,yxc->yxm", p["emb_mix"],
                         p["emb_row"][:, None] + p["emb_col"][None, :])
  mix = _softmax(mix_logits, -1)  # [ky, kx, M]
  values = np.einsum("yxm,bhwyxmc->bhwyxc", mix, v)
  logits = q[:, :, :, None, None, :] * k  # One head per channel.
  if border == "mask":
    logits = np.where(_inside(height, width, window)[..., None], logits, -np.inf)
  weights = _softmax(logits.reshape(logits.shape[:3] + (-1, logits.shape[-1])), 3)
  out = np.sum(weights * values.reshape(weights.shape), axis=3)
  out = out * BN_EVAL * p["bn"]["scale"] + p["bn"]["bias"]
  return np.maximum(out, 0)


@pytest.mark.parametrize("border", BORDERS)
def test_attention_stem_module_matches_reference(border):
  x = jax.random.normal(jax.random.key(4), (2, 5, 6, 3))
  stem = AttentionStem(8, border=border)
  variables = stem.init(jax.random.key(5), x, train=False)
  want = numpy_attention_stem(variables["params"], x, border)
  assert np.mean(want > 0) > 0.2
  np.testing.assert_allclose(stem.apply(variables, x, train=False), want,
                             atol=1e-5, rtol=1e-4)


def _intermediate(inter, name):
  return np.asarray(inter[name]["__call__"][0])


@pytest.mark.parametrize("op,in_channels,stride", [("local3_h4", 16, 1),
                                                  ("nonlocal", 16, 2)])
def test_bottleneck_output_is_branch_plus_shortcut_without_relu(op, in_channels,
                                                                stride):
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, in_channels))
  block = Bottleneck(op, 16, stride)
  variables = block.init(jax.random.key(7), x, train=False)
  out, state = block.apply(variables, x, train=False, capture_intermediates=True)
  inter = state["intermediates"]
  branch = _intermediate(inter, "bn_out")
  if stride == 2:
    branch = branch.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
    shortcut = _intermediate(inter, "shortcut_bn")
  else:
    shortcut = np.asarray(x)
  np.testing.assert_allclose(out, branch + shortcut, atol=1e-5, rtol=1e-5)
  assert np.mean(np.asarray(out) < 0) > 0.2  # No ReLU after the add.
  relu_block = Bottleneck(op, 16, stride, relu_after_add=True)
  np.testing.assert_allclose(relu_block.apply(variables, x, train=False),
                             np.maximum(out, 0), atol=1e-6)


def _leaves(tree) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def _check_kaiming_normal(w: np.ndarray, out_channels: int, name: str) -> None:
  """Mean and std within 4 standard errors of N(0, 2 / out_channels)."""
  std, n = np.sqrt(2 / out_channels), w.size
  assert abs(w.mean()) < 4 * std / np.sqrt(n), name
  assert abs(w.std() / std - 1) < 4 / np.sqrt(2 * n), (name, w.std(), std)
  if n > 5000:  # Normal, not uniform (whose max/std is 1.7).
    assert np.abs(w).max() > 3 * std, name


def _check_torch_uniform(w: np.ndarray, fan_in: int, name: str) -> None:
  bound = 1 / np.sqrt(fan_in)
  assert np.abs(w).max() <= bound, name
  assert np.abs(w).max() > 0.97 * bound, name
  if w.size > 1000:
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.05, (name, w.std(), bound)
    assert abs(w.mean()) < 0.05 * bound, name


def _check_bn(leaves, prefix, scale: float) -> None:
  np.testing.assert_array_equal(leaves[f"{prefix}/scale"], scale)
  np.testing.assert_array_equal(leaves[f"{prefix}/bias"], 0.0)


@pytest.mark.parametrize("zero_init_residual", [False, True])
def test_bottleneck_initialisation_on_the_cifar_network_shapes(zero_init_residual):
  """Stage-2 widths of the C=96 network: bottleneck F=192, op width c=96."""
  f, c = 192, 96
  x = jnp.ones((1, 4, 4, f))
  p = _leaves(Bottleneck("local7_h4", f, 2, zero_init_residual=zero_init_residual)
              .init(jax.random.key(8), x, train=False)["params"])
  for name in ("query", "key", "value"):
    _check_kaiming_normal(p[f"op/{name}/kernel"], c, name)
  rel = np.concatenate([p["op/rel_row"].ravel(), p["op/rel_col"].ravel()])
  assert rel.size == 7 * c and abs(rel.std() - 1) < 0.15 and abs(rel.mean()) < 0.15
  _check_torch_uniform(p["conv_in/kernel"], f, "conv_in")
  _check_torch_uniform(p["conv_out/kernel"], c, "conv_out")
  _check_torch_uniform(p["shortcut_conv/kernel"], f, "shortcut_conv")
  for bn in ("bn_in", "bn_op", "shortcut_bn"):
    _check_bn(p, bn, 1.0)
  _check_bn(p, "bn_out", 0.0 if zero_init_residual else 1.0)


def test_nonlocal_initialisation_on_the_cifar_network_shapes():
  """Stage 5 of the C=96 network: F=384, op width c=192."""
  f, c = 384, 192
  p = _leaves(Bottleneck("nonlocal", f).init(jax.random.key(9), jnp.ones((1, 2, 2, f)),
                                              train=False)["params"])
  for name in ("theta", "phi", "g", "out"):
    assert p[f"op/{name}/kernel"].shape == (1, 1, c, c)
    _check_torch_uniform(p[f"op/{name}/kernel"], c, name)
    _check_torch_uniform(p[f"op/{name}/bias"], c, f"{name} bias")
  _check_bn(p, "op/bn", 0.0)
  _check_bn(p, "bn_out", 1.0)


def test_stem_and_head_initialisation():
  stem = _leaves(AttentionStem(96).init(jax.random.key(10), jnp.ones((1, 4, 4, 3)),
                                        train=False)["params"])
  for name in ("query", "key", "value"):
    _check_kaiming_normal(stem[f"{name}/kernel"], 96, name)
  emb = np.concatenate([stem[f"emb_{n}"].ravel() for n in ("row", "col", "mix")])
  assert emb.size == 10 * 96 and abs(emb.std() - 1) < 0.1 and abs(emb.mean()) < 0.1
  _check_bn(stem, "bn", 1.0)
  conv = _leaves(ConvStem(112).init(jax.random.key(11), jnp.ones((1, 8, 8, 3)),
                                    train=False)["params"])
  for i, fan_in in ((1, 27), (2, 9 * 56), (3, 9 * 112)):
    _check_torch_uniform(conv[f"conv{i}/kernel"], fan_in, f"conv{i}")
    _check_bn(conv, f"bn{i}", 1.0)
  head = _leaves(ClassifierHead(1000).init(jax.random.key(12),
                                           {"stage5": jnp.ones((1, 2, 2, 448))}))
  _check_torch_uniform(head["params/Dense_0/kernel"], 448, "classifier")
  _check_torch_uniform(head["params/Dense_0/bias"], 448, "classifier bias")


def torch_bilinear_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """PyTorch's upsample_bilinear2d(align_corners=True), pixel by pixel."""
  _, in_h, in_w, _ = x.shape
  def source(i, in_size, out_size):
    s = i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    lo = int(np.floor(s))
    return lo, min(lo + 1, in_size - 1), s - lo
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    y0, y1, ly = source(i, in_h, out_h)
    for j in range(out_w):
      x0, x1, lx = source(j, in_w, out_w)
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


@pytest.mark.parametrize("in_size,out_size", [((8, 8), (16, 16)), ((16, 16), (32, 32)),
                                              ((5, 3), (7, 9)), ((1, 4), (3, 1))])
def test_resize_align_corners_matches_pytorch_formula(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((2, *in_size, 3))
  want = torch_bilinear_align_corners(x, *out_size)
  got = resize_align_corners(jnp.asarray(x, jnp.float32), *out_size)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(align_corners_matrix(in_size[0], out_size[0]).sum(1), 1.0)
  if in_size == (8, 8):  # Half-pixel resizing (jax.image.resize) is another function.
    half_pixel = jax.image.resize(x, (2, *out_size, 3), "bilinear")
    assert np.abs(np.asarray(half_pixel) - want).max() > 0.05


def _conv_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """A stride-1 'SAME' conv in numpy: zero-pad, sum over the kernel taps."""
  k = kernel.shape[0]
  padded = np.pad(x, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)])
  h, w = x.shape[1:3]
  return sum(padded[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
             for dy in range(k) for dx in range(k))


def test_car_decoder_matches_reference_without_relu_after_fusion():
  rng = np.random.default_rng(1)
  features = {"stage2": rng.standard_normal((2, 8, 8, 12)),
              "stage5": rng.standard_normal((2, 4, 4, 20))}
  decoder = CARDecoder(3)
  variables = decoder.init(jax.random.key(13), features)
  p = _leaves(variables["params"])
  low = features["stage2"] @ p["low_conv/kernel"][0, 0] * BN_EVAL
  high = torch_bilinear_align_corners(features["stage5"], 8, 8)
  fused = _conv_same(np.concatenate([low, high], -1), p["fuse_conv/kernel"]) * BN_EVAL
  assert np.mean(fused < 0) > 0.2  # A ReLU here would change the output.
  out = fused @ p["out_conv/kernel"][0, 0] + p["out_conv/bias"]
  want = torch_bilinear_align_corners(out, 16, 16)
  np.testing.assert_allclose(decoder.apply(variables, features), want, atol=1e-4,
                             rtol=1e-4)


def test_stage_preprocess_bn_is_affine_only_in_the_derived_net():
  x = jnp.ones((1, 8, 8, 1))
  space = SearchSpace.uniform(("local3_h4", "nonlocal"))
  supernet = make_model(space.layer_ops(), 16, "classifier", num_classes=3)
  alphas = {k: jnp.zeros(v) for k, v in space.alpha_shapes().items()}
  derived = make_model(NAMED_GENOTYPES["original"].layer_ops(), 16, "classifier",
                       num_classes=3)
  sup = jax.eval_shape(lambda: supernet.init(jax.random.key(0), x, alphas))
  der = jax.eval_shape(lambda: derived.init(jax.random.key(0), x))
  for s in range(1, 6):
    name = f"stage{s}_pre_bn"
    assert name not in sup["params"]["backbone"]
    assert set(sup["batch_stats"]["backbone"][name]) == {"mean", "var"}
    assert set(der["params"]["backbone"][name]) == {"scale", "bias"}


def test_model_options_carry_every_option_to_the_network():
  config = default.get_config().model
  config.update(border="mask", relu_after_add=True, zero_init_residual=True,
                attention_impl="scan")
  model = make_model(NAMED_GENOTYPES["original"].layer_ops(), 16, "classifier",
                     num_classes=3, **model_options(config))
  assert (model.border, model.relu_after_add, model.zero_init_residual,
          model.attention_impl) == ("mask", True, True, "scan")


def test_default_config_is_the_authors_network():
  config = default.get_config().model
  check_config(config)
  assert (config.border, config.relu_after_add, config.zero_init_residual) == (
      "zero_pad", False, False)


@pytest.mark.parametrize("key,value,valid", [
    ("stem", "patch", "attention, conv"),
    ("dtype", "float16", "float32, bfloat16"),
    ("attention_impl", "gather", "blocked, scan"),
    ("border", "reflect", "zero_pad, mask"),
    ("relu_after_add", "yes", "True or False"),
    ("zero_init_residual", 1, "True or False"),
])
def test_check_config_names_the_key_and_the_valid_choices(key, value, valid):
  config = default.get_config().model.to_dict()  # A dict: ConfigDict checks types.
  config[key] = value
  with pytest.raises(ValueError) as error:
    check_config(config)
  message = str(error.value)
  assert "\n" not in message and f"model.{key}={value!r}" in message
  assert valid in message
