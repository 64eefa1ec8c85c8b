"""One network definition for the supernet and the derived network.

`Backbone` builds the five-stage network of SPEC.md 1 from `layer_ops`
([stage][layer] -> candidate op names). A layer with several candidates is a
DARTS-style mixture weighted by softmax(alpha); a layer with one candidate is that
op alone, so a derived network is the static special case and compiles no dead
branches. Architecture parameters (alphas) are passed in explicitly, never stored
in 'params', so weight and architecture gradients are two clean argnums. Instead of
the mixture, a supernet can run a sampled single path (`gumbel_path`): each layer
then executes only its sampled op, for memory-bounded search.

Parameter paths are `backbone/stage{s}_layer{l}_{op}/...` in both forms, which is
what makes inheriting the chosen ops' supernet weights a plain subtree copy. The
one exception, as in the authors' search code: the supernet's stage preprocess
BatchNorm is not affine, so the derived net's preprocess scale and bias have no
supernet counterpart (they start at 1 and 0).

Options (`config.model`, see `check_config`) select where the network differs from
the authors' on purpose; the paper's configs leave them at the authors' values.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax.genotype import STAGE_KINDS, stage_name
from fanas_jax.ops.attention import BORDERS, IMPLEMENTATIONS
from fanas_jax.ops.layers import (STEMS, TORCH_KERNEL_INIT, Bottleneck, OpOptions,
                                  batch_norm, torch_bias_init, torch_conv)
from fanas_jax.ops.stacked import LayerSpec, mixture_layer
from fanas_jax.registry import Registry

LayerOps = Sequence[Sequence[Sequence[str]]]


def stage_widths(width: int) -> list[int]:
  """Reduce stages double the width: C, 2C, 2C, 4C, 4C for the default layout."""
  widths, w = [], width
  for kind in STAGE_KINDS:
    if kind == "reduce":
      w *= 2
    widths.append(w)
  return widths


def is_supernet(layer_ops: LayerOps) -> bool:
  """Whether some layer has several candidates (then every layer is a mixture or
  a sampled path, and the stage preprocess BN is not affine)."""
  return any(len(ops) > 1 for stage in layer_ops for ops in stage)


def mixture_weights(alpha: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax over each layer's candidates; alpha: [layers, n_ops].

  mask (same shape, bool) switches candidates off: they get weight exactly 0
  and no gradient, and the rest renormalise. Every layer needs one live op.
  """
  alpha = alpha.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(alpha, axis=-1)
  return jax.nn.softmax(jnp.where(mask, alpha, -jnp.inf), axis=-1, where=mask)


def gumbel_path(alphas: Mapping[str, jax.Array], key: jax.Array,
                tau: jax.Array | float) -> dict[str, jax.Array]:
  """One sampled op per layer (GDAS): the hard one-hot of gumbel_softmax(alpha, tau).

  The value is exactly one-hot and the gradient is that of the soft sample
  (straight-through), so alpha still learns while each layer runs one op.
  Returns per-stage [layers, n_ops], the `path` argument of Backbone.
  """
  path = {}
  for i, (name, alpha) in enumerate(sorted(alphas.items())):
    alpha = alpha.astype(jnp.float32)
    noise = jax.random.gumbel(jax.random.fold_in(key, i), alpha.shape, jnp.float32)
    soft = jax.nn.softmax((alpha + noise) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), alpha.shape[-1], dtype=soft.dtype)
    # soft - stop_gradient(soft) is exactly 0, so the value stays exactly one-hot.
    path[name] = hard + (soft - jax.lax.stop_gradient(soft))
  return path


# Bottleneck(x, train) that saves only its input for the backward pass (train static).
_RematBottleneck = nn.remat(Bottleneck, static_argnums=(2,))


class Backbone(nn.Module):
  """Stem + five stages; returns the features every head may need."""
  layer_ops: Any  # tuple [stage][layer] -> tuple of op names
  width: int
  stem: str = "attention"
  dtype: Any = jnp.float32
  attention_impl: str = "blocked"
  border: str = "zero_pad"
  relu_after_add: bool = False
  zero_init_residual: bool = False
  supernet_impl: str = "per_op"

  @nn.compact
  def __call__(self, x: jax.Array, alphas: Mapping[str, jax.Array] | None = None,
               train: bool = False, op_mask: Mapping[str, jax.Array] | None = None,
               path: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """op_mask: optional per-stage [layers, n_ops] bool; masked candidates are
    still computed but weighted 0 (remove them from layer_ops to skip them).

    path: optional per-stage [layers, n_ops] one-hot weights (`gumbel_path`) that
    replace the mixture: each layer runs only the op at its row's argmax, scaled by
    that weight (1 in value; it carries the straight-through gradient to alpha).
    """
    if path is not None and op_mask is not None:
      raise ValueError("op_mask masks the softmax mixture; a sampled path has no mask.")
    x = x.astype(self.dtype)
    op_options = OpOptions(self.dtype, self.attention_impl, self.border)
    x = STEMS.get(self.stem, key="model.stem").make(self.width, op_options, "stem")(x, train)
    affine = not is_supernet(self.layer_ops)
    features = {}
    for s, (kind, width) in enumerate(zip(STAGE_KINDS, stage_widths(self.width))):
      name = stage_name(s)
      # Stage preprocessing: ReLU -> 1x1 conv -> BN.
      x = nn.relu(x)
      x = torch_conv(width, x.shape[-1], dtype=self.dtype, name=f"{name}_pre_conv")(x)
      x = batch_norm(train, self.dtype, use_scale=affine, use_bias=affine,
                     name=f"{name}_pre_bn")(x)
      for l in range(len(self.layer_ops[s])):
        stride = 2 if (kind == "reduce" and l == 0) else 1
        x = self._layer(s, l, width, stride, x, alphas, op_mask, path, train)
      features[name] = x
    return features

  def _layer(self, s: int, l: int, width: int, stride: int, x: jax.Array,
             alphas: Mapping[str, jax.Array] | None,
             op_mask: Mapping[str, jax.Array] | None,
             path: Mapping[str, jax.Array] | None, train: bool) -> jax.Array:
    """Layer l of stage s: its one op, or the mixture of its candidates (per op,
    stacked, or the sampled path's single op)."""
    ops, name = tuple(self.layer_ops[s][l]), stage_name(s)
    prefix = f"{name}_layer{l + 1}"
    options = dict(features=width, stride=stride, dtype=self.dtype,
                   attention_impl=self.attention_impl, border=self.border,
                   relu_after_add=self.relu_after_add,
                   zero_init_residual=self.zero_init_residual)
    if len(ops) == 1:
      return Bottleneck(ops[0], name=f"{prefix}_{ops[0]}", **options)(x, train)
    if path is not None:
      return self._sampled_layer(options, ops, prefix, x, path[name][l], train)
    if alphas is None:
      raise ValueError("A supernet (several candidates per layer) needs alphas "
                       "or a sampled path.")
    w = mixture_weights(alphas[name], None if op_mask is None else op_mask[name])[l]
    if self.supernet_impl != "per_op" and not self.is_initializing():
      layer = LayerSpec(ops, width, stride, OpOptions(self.dtype, self.attention_impl,
                                                      self.border), self.relu_after_add,
                        group_by_window=self.supernet_impl == "stacked_window")
      return self._stacked_layer(layer, prefix, x, w, train)
    outs = [Bottleneck(op, name=f"{prefix}_{op}", **options)(x, train) for op in ops]
    return sum(w[i].astype(o.dtype) * o for i, o in enumerate(outs))

  def _stacked_layer(self, layer: LayerSpec, prefix: str, x: jax.Array,
                     weights: jax.Array, train: bool) -> jax.Array:
    """The mixture of the per-op bottlenecks' variables, computed stacked
    (ops/stacked.py). Initialisation builds the per-op bottlenecks, so both
    implementations have one variable tree; here it is read and written by path."""
    names = [f"{prefix}_{op}" for op in layer.ops]
    params = [self.variables["params"][n] for n in names]
    stats = [self.variables.get("batch_stats", {}).get(n, {}) for n in names]
    y, new_stats = mixture_layer(x, weights, layer, params, stats, train)
    if train:
      for n, tree in zip(names, new_stats):
        self.put_variable("batch_stats", n, tree)
    return y

  def _sampled_layer(self, options: dict[str, Any], ops: Sequence[str], prefix: str,
                     x: jax.Array, weights: jax.Array, train: bool) -> jax.Array:
    """Runs only the op at argmax(weights), through nn.switch.

    The compiled program holds every candidate as a branch of one conditional and
    executes just the selected one, so unsampled ops cost no compute and their BN
    statistics stay as they were. The branches are rematerialised: differentiating a
    conditional saves the union of all branches' residuals (zeros for the untaken
    ones), so without remat every candidate's activations would still take memory;
    with it a branch saves only its input and the backward pass recomputes the
    sampled op alone. Initialisation runs every branch first, since all branches
    must see the same variables.
    """
    def branch(op):
      return lambda mdl, y: _RematBottleneck(op, name=f"{prefix}_{op}", parent=mdl,
                                             **options)(y, train)

    branches = [branch(op) for op in ops]
    if self.is_initializing():
      for fn in branches:
        fn(self, x)
    index = jnp.argmax(weights)
    y = nn.switch(index, branches, self, x)
    return weights[index].astype(y.dtype) * y


class ClassifierHead(nn.Module):
  """Global average pooling, dropout, dense classifier (PyTorch's nn.Linear init)."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = jnp.mean(features["stage5"].astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=TORCH_KERNEL_INIT,
                    bias_init=torch_bias_init(x.shape[-1]))(x)


class EmbeddingHead(nn.Module):
  """GAP, dense, L2 normalisation: the metric-learning embedding.

  With `num_proxies` > 0 the head also owns one learned proxy per training class
  (proxy-anchor loss) and returns {'embedding', 'proxies'}, both unit-norm.
  """
  embed_dim: int
  num_proxies: int = 0

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = jnp.mean(features["stage5"].astype(jnp.float32), axis=(1, 2))
    x = l2_normalize(nn.Dense(self.embed_dim)(x))
    if not self.num_proxies:
      return {"embedding": x}
    proxies = self.param("proxies", nn.initializers.normal(1.0),
                         (self.num_proxies, self.embed_dim))
    return {"embedding": x, "proxies": l2_normalize(proxies)}


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of 1-D linear interpolation with align_corners=True.

  Output i samples input position i * (in - 1) / (out - 1): the first and last
  samples sit exactly on the first and last inputs (PyTorch's align_corners=True;
  jax.image.resize uses half-pixel centres instead).
  """
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  position = np.arange(out_size) * scale
  low = np.minimum(np.floor(position).astype(int), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = position - low
  weights = np.zeros((out_size, in_size))
  np.add.at(weights, (np.arange(out_size), low), 1 - frac)
  np.add.at(weights, (np.arange(out_size), high), frac)
  return weights


def resize_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of [B, H, W, C] with align_corners=True: two small matmuls."""
  rows = jnp.asarray(align_corners_matrix(x.shape[1], height), x.dtype)
  cols = jnp.asarray(align_corners_matrix(x.shape[2], width), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols)


class CARDecoder(nn.Module):
  """Decoder of the context auto-regression pretext (only used while searching).

  A low-level feature (end of stage 2, 1/2 resolution) through 1x1 conv -> 16 + BN,
  the high-level feature (end of stage 5, 1/4 resolution) bilinearly upsampled to
  1/2, concatenated, 3x3 conv -> 32 + BN (no ReLU), 1x1 conv (with bias) -> image
  channels, bilinearly upsampled to the input resolution. Both upsamplings align
  corners, as the authors' do.
  """
  out_channels: int

  @nn.compact
  def __call__(self, features, train: bool = False):
    bn = functools.partial(batch_norm, train, jnp.float32)
    low = features["stage2"].astype(jnp.float32)
    high = features["stage5"].astype(jnp.float32)
    b, h, w, _ = low.shape
    low = bn(name="low_bn")(torch_conv(16, low.shape[-1], name="low_conv")(low))
    high = resize_align_corners(high, h, w)
    x = jnp.concatenate([low, high], axis=-1)
    x = bn(name="fuse_bn")(torch_conv(32, x.shape[-1], 3, name="fuse_conv")(x))
    x = torch_conv(self.out_channels, 32, use_bias=True, name="out_conv")(x)
    return resize_align_corners(x, 2 * h, 2 * w)


HEADS: Registry = Registry("head")
HEADS.add("classifier", lambda cfg: ClassifierHead(cfg["num_classes"], cfg.get("dropout", 0.0)))
HEADS.add("embedding", lambda cfg: EmbeddingHead(cfg["embed_dim"], cfg.get("num_proxies", 0)))
HEADS.add("car_decoder", lambda cfg: CARDecoder(cfg["out_channels"]))


class Model(nn.Module):
  """Backbone + one task head; params are {'backbone': ..., 'task_head': ...}."""
  layer_ops: Any
  width: int
  head: str
  head_config: Any  # a hashable tuple of (key, value) pairs
  stem: str = "attention"
  dtype: Any = jnp.float32
  attention_impl: str = "blocked"
  border: str = "zero_pad"
  relu_after_add: bool = False
  zero_init_residual: bool = False
  frozen_bn: bool = False  # fine-tuning: the backbone's BN uses and keeps its statistics
  supernet_impl: str = "per_op"

  def setup(self):
    self.backbone = Backbone(self.layer_ops, self.width, self.stem, self.dtype,
                             self.attention_impl, self.border, self.relu_after_add,
                             self.zero_init_residual, self.supernet_impl)
    self.task_head = HEADS.get(self.head, key="head")(dict(self.head_config))

  def __call__(self, x, alphas=None, train: bool = False, op_mask=None, path=None):
    features = self.backbone(x, alphas, train and not self.frozen_bn, op_mask, path)
    return self.task_head(features, train)


def freeze_layer_ops(layer_ops: LayerOps) -> tuple:
  return tuple(tuple(tuple(ops) for ops in stage) for stage in layer_ops)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How a mixture layer computes its candidates: one bottleneck module each, or all
# at once over an op axis (ops/stacked.py). The same function and variables.
SUPERNET_IMPLS = ("per_op", "stacked", "stacked_window")

# config.model keys that select a behaviour, with their valid values.
_CHOICES = {
    "stem": lambda: STEMS.names(),
    "dtype": lambda: list(DTYPES),
    "attention_impl": lambda: list(IMPLEMENTATIONS),
    "border": lambda: list(BORDERS),
    "supernet_impl": lambda: list(SUPERNET_IMPLS),
}
_FLAGS = ("relu_after_add", "zero_init_residual")


def check_config(model_config: Any) -> None:
  """Raises ValueError (one line naming the key and the valid values) for a bad
  config.model option, before anything is built."""
  for key, choices in _CHOICES.items():
    value = model_config[key]
    if value not in choices():
      raise ValueError(f"model.{key}={value!r} is not a valid choice; valid choices: "
                       f"{', '.join(choices())}.")
  for key in _FLAGS:
    value = model_config[key]
    if not isinstance(value, bool):
      raise ValueError(f"model.{key}={value!r} must be True or False.")


def model_options(model_config: Any) -> dict[str, Any]:
  """The network-wide options of config.model, as make_model keyword arguments.

  dtype is the compute dtype; parameters are always float32 (flax's param_dtype),
  and heads, losses and BN statistics stay float32.
  """
  check_config(model_config)
  return {"stem": model_config.stem, "dtype": DTYPES[model_config.dtype],
          "attention_impl": model_config.attention_impl,
          "border": model_config.border,
          "relu_after_add": model_config.relu_after_add,
          "zero_init_residual": model_config.zero_init_residual,
          "supernet_impl": model_config.supernet_impl}


def make_model(layer_ops: LayerOps, width: int, head: str, *, stem: str = "attention",
               dtype: Any = jnp.float32, attention_impl: str = "blocked",
               border: str = "zero_pad", relu_after_add: bool = False,
               zero_init_residual: bool = False, frozen_bn: bool = False,
               supernet_impl: str = "per_op", **head_config) -> Model:
  """The network of `layer_ops` (derived or supernet) with a task head.

  The defaults are the authors' network; relu_after_add, zero_init_residual and
  border='mask' are the documented departures (see check_config). frozen_bn runs the
  backbone's batch norms on their running statistics, also while training (the head
  still trains, dropout included), and leaves those statistics as they are.
  supernet_impl ('per_op' or 'stacked') only changes how a supernet computes.
  """
  return Model(freeze_layer_ops(layer_ops), width, head,
               tuple(sorted(head_config.items())), stem, dtype, attention_impl,
               border, relu_after_add, zero_init_residual, frozen_bn, supernet_impl)
