"""Flax modules for the searchable attention ops, the bottleneck and the stems.

Each op and stem is registered with its cost function (`OpSpec.cost`,
`StemSpec.cost`), so none exists without one. Initialisers are the authors'
(SPEC.md 1): q/k/v projections Kaiming-normal (fan_out, ReLU gain), relative
and stem embeddings N(0, 1), every other conv PyTorch's default.

Submodule names are fixed strings because weight inheritance from a supernet
to a derived network matches parameters by path.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fanas_jax.ops.attention import default_backend, local_attention
from fanas_jax.ops.costs import Cost, batch_norm_cost, conv_cost
from fanas_jax.registry import Registry

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default conv/linear weight init, kaiming_uniform(a=sqrt(5)):
# U(+-1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
TORCH_KERNEL_INIT: Initializer = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv/linear bias init: U(+-1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def kaiming_normal_fan_out(out_channels: int) -> Initializer:
  """kaiming_normal_(mode='fan_out', nonlinearity='relu') of a 1x1 conv."""
  return nn.initializers.normal(math.sqrt(2 / out_channels))


def torch_conv(features: int, in_channels: int, kernel: int = 1, *,
               use_bias: bool = False, dtype: Dtype = jnp.float32,
               name: str, **kwargs: Any) -> nn.Conv:
  """A conv initialised like PyTorch's nn.Conv2d (also the 1x1 linear layers)."""
  return nn.Conv(features, (kernel, kernel), use_bias=use_bias, dtype=dtype,
                 kernel_init=TORCH_KERNEL_INIT,
                 bias_init=torch_bias_init(kernel * kernel * in_channels),
                 name=name, **kwargs)


def batch_norm(train: bool, dtype: Dtype, **kwargs: Any) -> nn.BatchNorm:
  """The one BatchNorm configuration used everywhere (PyTorch-like stats).

  Batch statistics are those of the global batch: under jit with a sharded
  batch XLA computes the mean over every device, so no axis name is needed.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, **kwargs)


@dataclasses.dataclass(frozen=True)
class OpOptions:
  """Network-wide settings every op is built with (hashable: a module field)."""
  dtype: Dtype = jnp.float32
  attention_impl: str = "blocked"
  border: str = "zero_pad"


class LocalAttention(nn.Module):
  """SASA local self-attention with learned relative position embeddings.

  `impl` picks the implementation of `local_attention` ('blocked' or 'scan');
  both compute the same function, so it never changes parameters or results
  beyond rounding. `border` is how the window treats the map's edges.
  """
  channels: int
  window: int
  num_heads: int
  dtype: Dtype = jnp.float32
  impl: str = "blocked"
  border: str = "zero_pad"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No train-dependent state; the argument keeps op calls uniform.
    dense = functools.partial(nn.Dense, self.channels, use_bias=False,
                              dtype=self.dtype,
                              kernel_init=kaiming_normal_fan_out(self.channels))
    q = dense(name="query")(x)
    k = dense(name="key")(x)
    v = dense(name="value")(x)
    shape = (self.window, self.channels // 2)
    rel_row = self.param("rel_row", nn.initializers.normal(1.0), shape)
    rel_col = self.param("rel_col", nn.initializers.normal(1.0), shape)
    rel_row, rel_col = nn.dtypes.promote_dtype(rel_row, rel_col,
                                               dtype=self.dtype)
    return local_attention(q, k, v, window=self.window,
                           num_heads=self.num_heads, rel_row=rel_row,
                           rel_col=rel_col, border=self.border, impl=self.impl)


def local_attention_cost(window: int) -> Callable[[int, int, int], Cost]:
  """SASA local attention over the nominal k x k window (padding included).

  Per pixel: q/k/v projections, k*k logits and k*k weighted values over all
  channels (head_dim * heads = channels, so the head count does not change MACs),
  and the relative-position logits as the code computes them: the query against a
  row table and a column table, each k x channels.
  """
  def cost(channels: int, height: int, width: int) -> Cost:
    projections = 3 * channels * channels
    params = projections + window * channels  # rel_row, rel_col: [k, channels/2].
    per_pixel = projections + 2 * window * window * channels + 2 * window * channels
    return Cost(params, height * width * per_pixel)
  return cost


class AxialAttention(nn.Module):
  """Axial attention: multi-head attention along each row, then each column.

  Two passes with their own query/key/value projections give every pixel a
  global receptive field at O(H*W*(H+W)) cost instead of O((H*W)^2).
  """
  channels: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    for axis, name in ((2, "row"), (1, "column")):
      x = self._attend(x, axis, name)
    return x

  def _attend(self, x: jax.Array, axis: int, name: str) -> jax.Array:
    """Attention along `axis` (2: within a row, 1: within a column)."""
    head_dim = self.channels // self.num_heads
    dense = functools.partial(nn.DenseGeneral, (self.num_heads, head_dim),
                              use_bias=False, dtype=self.dtype)
    q, k, v = (dense(name=f"{name}_{p}")(x) for p in ("query", "key", "value"))
    if axis == 1:  # Columns become the sequence axis.
      q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
    batch, outer, length = q.shape[:3]
    seq = lambda t: t.reshape(batch * outer, length, self.num_heads, head_dim)
    y = jax.nn.dot_product_attention(
        seq(q), seq(k), seq(v), implementation=_axial_backend(q.dtype, head_dim))
    y = y.reshape(batch, outer, length, self.channels)
    return y.swapaxes(1, 2) if axis == 1 else y


def _axial_backend(dtype: Dtype, head_dim: int) -> str:
  """cuDNN where it applies (GPU, 16-bit, head dims multiple of 8), else XLA."""
  if default_backend(dtype, head_dim) == "cudnn" and head_dim % 8 == 0:
    return "cudnn"
  return "xla"


def axial_attention_cost(channels: int, height: int, width: int) -> Cost:
  """Row then column attention: q/k/v per pass, each pixel attends along its row
  (W logits and values) and then its column (H)."""
  projections = 6 * channels * channels
  per_pixel = projections + 2 * channels * (height + width)
  return Cost(projections, height * width * per_pixel)


class NonLocal(nn.Module):
  """Embedded-Gaussian non-local block (Wang et al. 2018), as the authors have it.

  theta, phi and g are 1x1 convs with bias at the block's own width; the output
  1x1 conv (with bias) is followed by a BatchNorm whose scale and bias start at
  zero, so the block starts as the identity.
  """
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    inner = self.channels
    conv = functools.partial(torch_conv, use_bias=True, dtype=self.dtype)
    batch, height, width, _ = x.shape
    tokens = (batch, height * width, 1, inner)
    theta = conv(inner, self.channels, name="theta")(x).reshape(tokens)
    phi = conv(inner, self.channels, name="phi")(x).reshape(tokens)
    g = conv(inner, self.channels, name="g")(x).reshape(tokens)
    # Embedded Gaussian: softmax(theta . phi) with no 1/sqrt(d) temperature.
    y = jax.nn.dot_product_attention(theta, phi, g, scale=1.0)
    y = y.reshape(batch, height, width, inner)
    y = conv(self.channels, inner, name="out")(y)
    y = batch_norm(train, self.dtype, scale_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, name="bn")(y)
    return x + y


def nonlocal_cost(channels: int, height: int, width: int) -> Cost:
  """theta/phi/g and out 1x1 convs with bias, (H*W)^2 logits and weighted values,
  the output BN."""
  tokens = height * width
  projections = Cost()
  for _ in range(4):  # theta, phi, g and out, all channels -> channels.
    projections += conv_cost(channels, channels, tokens, bias=True)
  attention = Cost(macs=2 * tokens * tokens * channels)
  return projections + attention + batch_norm_cost(channels)


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """A searchable op.

  make(channels, options, name, **fields) builds a module mapping [B, H, W, channels]
  to the same shape, called as module(x, train); options are the network-wide
  `OpOptions`, fields further flax Module fields (parent=None: a detached module). cost(channels, height, width) is the op's `Cost` on such a map.
  post_norm says whether the bottleneck follows the op with BN + ReLU.
  """
  name: str
  make: Callable[..., nn.Module]
  cost: Callable[[int, int, int], Cost]
  post_norm: bool
  window: int | None
  is_global: bool
  num_heads: int = 1


OPS: Registry[OpSpec] = Registry("attention op")


def _local_spec(window: int, num_heads: int) -> OpSpec:
  def make(channels: int, options: OpOptions, name: str, **fields: Any) -> nn.Module:
    return LocalAttention(channels, window, num_heads, options.dtype,
                          options.attention_impl, options.border, name=name, **fields)
  return OpSpec(name=f"local{window}_h{num_heads}", make=make,
                cost=local_attention_cost(window), post_norm=True,
                window=window, is_global=False, num_heads=num_heads)


def _nonlocal_spec() -> OpSpec:
  def make(channels: int, options: OpOptions, name: str, **fields: Any) -> nn.Module:
    return NonLocal(channels, options.dtype, name=name, **fields)
  return OpSpec(name="nonlocal", make=make, cost=nonlocal_cost, post_norm=False,
                window=None, is_global=True)


def _axial_spec(num_heads: int) -> OpSpec:
  def make(channels: int, options: OpOptions, name: str, **fields: Any) -> nn.Module:
    return AxialAttention(channels, num_heads, options.dtype, name=name, **fields)
  return OpSpec(name=f"axial_h{num_heads}", make=make, cost=axial_attention_cost,
                post_norm=True, window=None, is_global=False, num_heads=num_heads)


for _spec in (*(_local_spec(w, h) for h in (4, 8) for w in (3, 5, 7)),
              _nonlocal_spec(), *(_axial_spec(h) for h in (4, 8))):
  OPS.add(_spec.name, _spec)

ORIGINAL_OPS: tuple[str, ...] = ("local3_h4", "local5_h4", "local7_h4",
                                 "local3_h8", "local5_h8", "local7_h8",
                                 "nonlocal")


class Bottleneck(nn.Module):
  """ResNet bottleneck whose middle 3x3 conv is replaced by an attention op.

  Downsampling (stride 2) is a 2x2 average pool after the block, as in SASA,
  because the attention ops themselves are stride 1. The authors' block ends in
  op2(y) + shortcut; `relu_after_add` adds a ReLU after the sum (ResNet's form)
  and `zero_init_residual` starts the last BN's scale at 0 (Goyal et al. 2017),
  so each block starts as its shortcut.
  """
  op: str
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  attention_impl: str = "blocked"
  border: str = "zero_pad"
  relu_after_add: bool = False
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.stride not in (1, 2):
      raise ValueError(f"Bottleneck stride must be 1 or 2, got {self.stride}.")
    if self.stride == 2 and (x.shape[1] % 2 or x.shape[2] % 2):
      raise ValueError(
          f"Stride 2 needs even spatial dims, got {x.shape[1:3]}.")
    spec = OPS.get(self.op, key="op")
    inner = self.features // 2
    conv = functools.partial(torch_conv, dtype=self.dtype)
    norm = functools.partial(batch_norm, train, self.dtype)

    y = nn.relu(norm(name="bn_in")(conv(inner, x.shape[-1], name="conv_in")(x)))
    options = OpOptions(self.dtype, self.attention_impl, self.border)
    y = spec.make(inner, options, "op")(y, train)
    if spec.post_norm:
      y = nn.relu(norm(name="bn_op")(y))
    last_scale = (nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)
    y = norm(name="bn_out", scale_init=last_scale)(
        conv(self.features, inner, name="conv_out")(y))
    if self.stride == 2:
      y = nn.avg_pool(y, (2, 2), strides=(2, 2))

    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, x.shape[-1],
                      strides=(self.stride, self.stride), name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut)
    y = y + shortcut
    return nn.relu(y) if self.relu_after_add else y


class AttentionStem(nn.Module):
  """SASA attention stem: local attention whose values mix M projections.

  The mixing weights depend on the window offset, which gives the stem the
  spatial awareness a 3x3 conv stem would have; this is what lets a network
  be attention-only from the first layer. As in the authors' stem every channel
  is its own head (logit_c = q_c k_c); `num_heads` groups channels instead.
  """
  features: int
  dtype: Dtype = jnp.float32
  window: int = 3
  num_mixtures: int = 4
  num_heads: int | None = None  # None: one head per channel.
  border: str = "zero_pad"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=self.dtype,
                              kernel_init=kaiming_normal_fan_out(self.features))
    q = dense(self.features, name="query")(x)
    k = dense(self.features, name="key")(x)
    # M separate 1x1 convs in the authors' code, each with fan_out = features.
    v = dense((self.num_mixtures, self.features), name="value")(x)
    dim, normal = self.features, nn.initializers.normal(1.0)
    emb_row = self.param("emb_row", normal, (self.window, dim))
    emb_col = self.param("emb_col", normal, (self.window, dim))
    emb_mix = self.param("emb_mix", normal, (self.num_mixtures, dim))
    logits = (emb_row[:, None, None, :] + emb_col[None, :, None, :]) @ emb_mix.T
    mix = jax.nn.softmax(logits.reshape(self.window**2, self.num_mixtures), -1)
    (mix,) = nn.dtypes.promote_dtype(mix, dtype=self.dtype)
    y = local_attention(q, k, v, window=self.window,
                        num_heads=self.num_heads or self.features,
                        value_mix=mix, border=self.border, impl="scan")
    y = batch_norm(train, self.dtype, name="bn")(y)
    return nn.relu(y)


def attention_stem_cost(in_channels: int, features: int, height: int,
                        width: int) -> tuple[Cost, tuple[int, int]]:
  """SASA stem: q, k and M value projections, window logits, per-offset value mixing.

  The [k*k, M] mixing weights come from the embeddings once per forward pass,
  not per pixel; they are counted once.
  """
  k, mixtures = AttentionStem.window, AttentionStem.num_mixtures
  projections = conv_cost(in_channels, (2 + mixtures) * features, height * width)
  embeddings = Cost((2 * k + mixtures) * features, k * k * features * mixtures)
  attention = Cost(macs=height * width * k * k * features * (2 + mixtures))
  return projections + embeddings + attention + batch_norm_cost(features), (height, width)


def conv_stem_widths(features: int) -> tuple[int, int, int]:
  """The authors' widths: 3 -> C/2 -> C -> C."""
  return (features // 2, features, features)


class ConvStem(nn.Module):
  """Three stride-2 3x3 convs (224 -> 28) so attention runs on small maps.

  BN after each conv, ReLU after the first two (the first stage's preprocess
  starts with a ReLU).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    widths = conv_stem_widths(self.features)
    for i, width in enumerate(widths, start=1):
      x = torch_conv(width, x.shape[-1], 3, strides=(2, 2), dtype=self.dtype,
                     name=f"conv{i}")(x)
      x = batch_norm(train, self.dtype, name=f"bn{i}")(x)
      if i < len(widths):
        x = nn.relu(x)
    return x


def conv_stem_cost(in_channels: int, features: int, height: int,
                   width: int) -> tuple[Cost, tuple[int, int]]:
  """Three 3x3 stride-2 'SAME' convs (C/2, C, C), each followed by BN."""
  cost = Cost()
  for out_channels in conv_stem_widths(features):
    height, width = -(-height // 2), -(-width // 2)
    cost += (conv_cost(in_channels, out_channels, height * width, kernel=3)
             + batch_norm_cost(out_channels))
    in_channels = out_channels
  return cost, (height, width)


@dataclasses.dataclass(frozen=True)
class StemSpec:
  """A stem: make(features, options, name) -> module(x, train) on the image;
  cost(in_channels, features, height, width) -> (Cost, output (height, width));
  reduction: input pixels per output pixel, per side."""
  make: Callable[[int, OpOptions, str], nn.Module]
  cost: Callable[[int, int, int, int], tuple[Cost, tuple[int, int]]]
  reduction: int


STEMS: Registry[StemSpec] = Registry("stem")
STEMS.add("attention", StemSpec(
    make=lambda features, options, name: AttentionStem(
        features, options.dtype, border=options.border, name=name),
    cost=attention_stem_cost, reduction=1))
STEMS.add("conv", StemSpec(
    make=lambda features, options, name: ConvStem(features, options.dtype, name=name),
    cost=conv_stem_cost, reduction=8))
