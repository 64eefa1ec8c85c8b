"""Flax modules for the searchable attention ops, the bottleneck and the stems.

Submodule names are fixed strings because weight inheritance from a supernet
to a derived network matches parameters by path.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fanas_jax.ops.attention import default_backend, local_attention
from fanas_jax.registry import Registry

Dtype = Any


def batch_norm(train: bool, dtype: Dtype, axis_name: str | None,
               **kwargs: Any) -> nn.BatchNorm:
  """The one BatchNorm configuration used everywhere (PyTorch-like stats)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name, dtype=dtype, **kwargs)


class LocalAttention(nn.Module):
  """SASA local self-attention with learned relative position embeddings.

  `impl` picks the implementation of `local_attention` ('blocked' or 'scan');
  both compute the same function, so it never changes parameters or results
  beyond rounding.
  """
  channels: int
  window: int
  num_heads: int
  dtype: Dtype = jnp.float32
  impl: str = "blocked"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No train-dependent state; the argument keeps op calls uniform.
    dense = functools.partial(nn.Dense, self.channels, use_bias=False,
                              dtype=self.dtype)
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
                           rel_col=rel_col, impl=self.impl)


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


class NonLocal(nn.Module):
  """Embedded-Gaussian non-local block (Wang et al. 2018).

  The output BatchNorm's scale starts at zero, so the block starts as the
  identity and does not disturb the pretrained-like path it is inserted into.
  """
  channels: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    inner = max(self.channels // 2, 1)
    dense = functools.partial(nn.Dense, inner, use_bias=False, dtype=self.dtype)
    batch, height, width, _ = x.shape
    tokens = (batch, height * width, 1, inner)
    theta = dense(name="theta")(x).reshape(tokens)
    phi = dense(name="phi")(x).reshape(tokens)
    g = dense(name="g")(x).reshape(tokens)
    # Embedded Gaussian: softmax(theta . phi) with no 1/sqrt(d) temperature.
    y = jax.nn.dot_product_attention(theta, phi, g, scale=1.0)
    y = y.reshape(batch, height, width, inner)
    y = nn.Dense(self.channels, use_bias=False, dtype=self.dtype, name="out")(y)
    y = batch_norm(train, self.dtype, self.bn_axis_name,
                   scale_init=nn.initializers.zeros, name="bn")(y)
    return x + y


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """A searchable op.

  make(channels, options, name) builds a module mapping [B, H, W, channels]
  to the same shape, called as module(x, train); options are the network-wide
  `OpOptions`. post_norm says whether the bottleneck follows the op with
  BN + ReLU.
  """
  name: str
  make: Callable[[int, "OpOptions", str], nn.Module]
  post_norm: bool
  window: int | None
  is_global: bool
  num_heads: int = 1


@dataclasses.dataclass(frozen=True)
class OpOptions:
  """Network-wide settings every op is built with (hashable: a module field)."""
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  attention_impl: str = "blocked"


OPS: Registry[OpSpec] = Registry("attention op")


def _local_spec(window: int, num_heads: int) -> OpSpec:
  def make(channels: int, options: OpOptions, name: str) -> nn.Module:
    return LocalAttention(channels, window, num_heads, options.dtype,
                          options.attention_impl, name=name)
  return OpSpec(name=f"local{window}_h{num_heads}", make=make, post_norm=True,
                window=window, is_global=False, num_heads=num_heads)


def _nonlocal_spec() -> OpSpec:
  def make(channels: int, options: OpOptions, name: str) -> nn.Module:
    return NonLocal(channels, options.dtype, options.bn_axis_name, name=name)
  return OpSpec(name="nonlocal", make=make, post_norm=False, window=None,
                is_global=True)


def _axial_spec(num_heads: int) -> OpSpec:
  def make(channels: int, options: OpOptions, name: str) -> nn.Module:
    return AxialAttention(channels, num_heads, options.dtype, name=name)
  return OpSpec(name=f"axial_h{num_heads}", make=make, post_norm=True,
                window=None, is_global=False, num_heads=num_heads)


for _spec in (*(_local_spec(w, h) for h in (4, 8) for w in (3, 5, 7)),
              _nonlocal_spec(), *(_axial_spec(h) for h in (4, 8))):
  OPS.add(_spec.name, _spec)

ORIGINAL_OPS: tuple[str, ...] = ("local3_h4", "local5_h4", "local7_h4",
                                 "local3_h8", "local5_h8", "local7_h8",
                                 "nonlocal")


class Bottleneck(nn.Module):
  """ResNet bottleneck whose middle 3x3 conv is replaced by an attention op.

  Downsampling (stride 2) is a 2x2 average pool after the block, as in SASA,
  because the attention ops themselves are stride 1.
  """
  op: str
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  attention_impl: str = "blocked"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.stride not in (1, 2):
      raise ValueError(f"Bottleneck stride must be 1 or 2, got {self.stride}.")
    if self.stride == 2 and (x.shape[1] % 2 or x.shape[2] % 2):
      raise ValueError(
          f"Stride 2 needs even spatial dims, got {x.shape[1:3]}.")
    spec = OPS.get(self.op, key="op")
    inner = self.features // 2
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), use_bias=False,
                             dtype=self.dtype)
    norm = functools.partial(batch_norm, train, self.dtype, self.bn_axis_name)

    y = nn.relu(norm(name="bn_in")(conv(inner, name="conv_in")(x)))
    options = OpOptions(self.dtype, self.bn_axis_name, self.attention_impl)
    y = spec.make(inner, options, "op")(y, train)
    if spec.post_norm:
      y = nn.relu(norm(name="bn_op")(y))
    # Zero-initialised last BN scale ("zero-init residual", Goyal et al. 2017): each
    # block starts as its shortcut. Without it, BN after an attention op (an average
    # over the window, so of small variance) makes every residual branch amplify
    # gradients several-fold, and 15 such blocks explode at initialisation.
    y = norm(name="bn_out", scale_init=nn.initializers.zeros)(
        conv(self.features, name="conv_out")(y))
    if self.stride == 2:
      y = nn.avg_pool(y, (2, 2), strides=(2, 2))

    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, strides=(self.stride, self.stride),
                      name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class AttentionStem(nn.Module):
  """SASA attention stem: local attention whose values mix M projections.

  The mixing weights depend on the window offset, which gives the stem the
  spatial awareness a 3x3 conv stem would have; this is what lets a network
  be attention-only from the first layer.
  """
  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  window: int = 3
  num_mixtures: int = 4
  num_heads: int = 1
  reduction: ClassVar[int] = 1  # Input pixels per output pixel, per side.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=self.dtype)
    q = dense(self.features, name="query")(x)
    k = dense(self.features, name="key")(x)
    v = dense((self.num_mixtures, self.features), name="value")(x)
    dim = self.features
    # Initial mixing logits (row + col) . mix have unit variance.
    init = nn.initializers.normal((2 * dim)**-0.25)
    emb_row = self.param("emb_row", init, (self.window, dim))
    emb_col = self.param("emb_col", init, (self.window, dim))
    emb_mix = self.param("emb_mix", init, (self.num_mixtures, dim))
    logits = (emb_row[:, None, None, :] + emb_col[None, :, None, :]) @ emb_mix.T
    mix = jax.nn.softmax(logits.reshape(self.window**2, self.num_mixtures), -1)
    (mix,) = nn.dtypes.promote_dtype(mix, dtype=self.dtype)
    y = local_attention(q, k, v, window=self.window, num_heads=self.num_heads,
                        value_mix=mix, impl="scan")
    y = batch_norm(train, self.dtype, self.bn_axis_name, name="bn")(y)
    return nn.relu(y)


class ConvStem(nn.Module):
  """Three stride-2 3x3 convs (224 -> 28) so attention runs on small maps."""
  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  reduction: ClassVar[int] = 8  # Input pixels per output pixel, per side.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    widths = (self.features // 2, self.features // 2, self.features)
    for i, width in enumerate(widths, start=1):
      x = nn.Conv(width, (3, 3), strides=(2, 2), use_bias=False,
                  dtype=self.dtype, name=f"conv{i}")(x)
      x = batch_norm(train, self.dtype, self.bn_axis_name, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


# Each stem class is its own factory: Stem(features, dtype, bn_axis_name).
STEMS: Registry[type[nn.Module]] = Registry("stem")
STEMS.add("attention", AttentionStem)
STEMS.add("conv", ConvStem)
