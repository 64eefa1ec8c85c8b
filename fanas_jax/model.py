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
what makes inheriting the chosen ops' supernet weights a plain subtree copy.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fanas_jax.genotype import LAYERS_PER_STAGE, STAGE_KINDS, stage_name
from fanas_jax.ops.layers import STEMS, Bottleneck
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
  bn_axis_name: str | None = None
  attention_impl: str = "blocked"

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
    x = STEMS.get(self.stem, key="model.stem")(self.width, self.dtype, self.bn_axis_name,
                                                 name="stem")(x, train)
    features = {}
    for s, (kind, width) in enumerate(zip(STAGE_KINDS, stage_widths(self.width))):
      name = stage_name(s)
      # Stage preprocessing: ReLU -> 1x1 conv -> BN.
      x = nn.relu(x)
      x = nn.Conv(width, (1, 1), use_bias=False, dtype=self.dtype,
                  name=f"{name}_pre_conv")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=self.bn_axis_name, dtype=self.dtype,
                       name=f"{name}_pre_bn")(x)
      for l in range(LAYERS_PER_STAGE):
        ops = tuple(self.layer_ops[s][l])
        stride = 2 if (kind == "reduce" and l == 0) else 1
        options = dict(features=width, stride=stride, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, attention_impl=self.attention_impl)
        if len(ops) > 1 and path is not None:
          x = self._sampled_layer(options, ops, f"{name}_layer{l + 1}", x,
                                  path[name][l], train)
          continue
        outs = [Bottleneck(op, name=f"{name}_layer{l + 1}_{op}", **options)(x, train)
                for op in ops]
        if len(outs) == 1:
          x = outs[0]
        else:
          if alphas is None:
            raise ValueError("A supernet (several candidates per layer) needs alphas "
                             "or a sampled path.")
          mask = None if op_mask is None else op_mask[name]
          w = mixture_weights(alphas[name], mask)[l]
          x = sum(w[i].astype(o.dtype) * o for i, o in enumerate(outs))
      features[name] = x
    return features

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
  """Global average pooling, dropout, dense classifier."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = jnp.mean(features["stage5"].astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


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


class CARDecoder(nn.Module):
  """Decoder of the context auto-regression pretext (only used while searching).

  A low-level feature (end of stage 2, 1/2 resolution) through 1x1 conv -> 16 + BN,
  the high-level feature (end of stage 5, 1/4 resolution) bilinearly upsampled to
  1/2, concatenated, 3x3 conv -> 32 + BN + ReLU, 1x1 conv (with bias) -> image
  channels, bilinearly upsampled to the input resolution.
  """
  out_channels: int
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                   epsilon=1e-5, axis_name=self.bn_axis_name,
                                   name=name)
    low = features["stage2"].astype(jnp.float32)
    high = features["stage5"].astype(jnp.float32)
    b, h, w, _ = low.shape
    low = bn("low_bn")(nn.Conv(16, (1, 1), use_bias=False, name="low_conv")(low))
    high = jax.image.resize(high, (b, h, w, high.shape[-1]), "bilinear")
    x = jnp.concatenate([low, high], axis=-1)
    x = nn.relu(bn("fuse_bn")(nn.Conv(32, (3, 3), use_bias=False, name="fuse_conv")(x)))
    x = nn.Conv(self.out_channels, (1, 1), use_bias=True, name="out_conv")(x)
    return jax.image.resize(x, (b, 2 * h, 2 * w, self.out_channels), "bilinear")


HEADS: Registry = Registry("head")
HEADS.add("classifier", lambda cfg: ClassifierHead(cfg["num_classes"], cfg.get("dropout", 0.0)))
HEADS.add("embedding", lambda cfg: EmbeddingHead(cfg["embed_dim"], cfg.get("num_proxies", 0)))
HEADS.add("car_decoder", lambda cfg: CARDecoder(cfg["out_channels"], cfg.get("bn_axis_name")))


class Model(nn.Module):
  """Backbone + one task head; params are {'backbone': ..., 'task_head': ...}."""
  layer_ops: Any
  width: int
  head: str
  head_config: Any  # a hashable tuple of (key, value) pairs
  stem: str = "attention"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  attention_impl: str = "blocked"

  def setup(self):
    self.backbone = Backbone(self.layer_ops, self.width, self.stem, self.dtype,
                             self.bn_axis_name, self.attention_impl)
    self.task_head = HEADS.get(self.head, key="head")(dict(self.head_config))

  def __call__(self, x, alphas=None, train: bool = False, op_mask=None, path=None):
    return self.task_head(self.backbone(x, alphas, train, op_mask, path), train)


def freeze_layer_ops(layer_ops: LayerOps) -> tuple:
  return tuple(tuple(tuple(ops) for ops in stage) for stage in layer_ops)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_options(model_config: Any) -> dict[str, Any]:
  """The network-wide options of config.model, as make_model keyword arguments.

  dtype is the compute dtype; parameters are always float32 (flax's param_dtype),
  and heads, losses and BN statistics stay float32.
  """
  return {"stem": model_config.stem, "dtype": DTYPES[model_config.dtype],
          "attention_impl": model_config.attention_impl}


def make_model(layer_ops: LayerOps, width: int, head: str, *, stem: str = "attention",
               dtype: Any = jnp.float32, bn_axis_name: str | None = None,
               attention_impl: str = "blocked", **head_config) -> Model:
  return Model(freeze_layer_ops(layer_ops), width, head,
               tuple(sorted(head_config.items())), stem, dtype, bn_axis_name,
               attention_impl)
