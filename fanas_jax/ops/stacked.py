"""A supernet mixture layer with its candidate bottlenecks computed stacked.

Every candidate of a mixture layer reads the same input, so instead of tracing one
bottleneck per candidate (105 per step for the paper's space, each again in the
backward and both bilevel passes) the stacked layer runs them over a leading op axis:
each 1x1 conv is one batched matmul, each BatchNorm one normalisation with per-op
statistics (exactly those of separate BNs), and the local attentions one attention per
head count.

Layout for mixed windows and head counts: local ops with the same head count share one
attention in the group's largest window; a smaller window is that attention narrowed by
an offset mask (`inner_window_bias`) with its relative tables zero-padded, which is the
same function. Masking 3x3 and 5x5 inside a 7x7 halo costs attention FLOPs (on 8x8 maps
under border='mask' none: the halo is the whole map). `group_by_window`
(supernet_impl='stacked_window') groups by window as well: no masked FLOPs, three times
the attention kernels. Head counts are kept apart since each head's softmax is
its own. Other ops (nonlocal, axial) run as their own modules on their slice.

Parameters and statistics stay those of the per-op bottlenecks, read and written by
their paths, so checkpoints, weight inheritance and the cost model are the same under
both implementations.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fanas_jax.ops.attention import inner_window_bias, local_attention
from fanas_jax.ops.layers import OPS, OpOptions, batch_norm

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The static part of a mixture layer: its candidates and bottleneck shape."""
  ops: tuple[str, ...]
  features: int
  stride: int
  options: OpOptions
  relu_after_add: bool = False
  # False: local ops of one head count share one attention in their largest window,
  # smaller windows masked inside it. True: one attention per (window, head count).
  group_by_window: bool = False


def op_order(ops: Sequence[str]) -> list[int]:
  """Candidate indices in stacked order: local ops grouped by head count (then
  window), then the other post-norm ops, then those without a post norm, so every
  group is a contiguous slice of the op axis."""
  def key(i: int) -> tuple:
    spec = OPS.get(ops[i], key="op")
    local = spec.window is not None
    return (not local, not spec.post_norm, spec.num_heads, spec.window or 0, i)
  return sorted(range(len(ops)), key=key)


def _stack(trees: Sequence[Tree]) -> Tree:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Tree, n: int) -> list[Tree]:
  return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(n)]


def _conv1x1(x: jax.Array, kernels: jax.Array, dtype: Any) -> jax.Array:
  """Per-op 1x1 convs; kernels [n, 1, 1, Cin, Cout] (flax's layout), x shared
  [B, H, W, Cin] or stacked [n, B, H, W, Cin]."""
  spec = "bhwc,ncd->nbhwd" if x.ndim == 4 else "nbhwc,ncd->nbhwd"
  return jnp.einsum(spec, x.astype(dtype), kernels[:, 0, 0].astype(dtype))


class _Norms:
  """Per-op BatchNorms over a stacked [n, B, H, W, C], collecting new statistics."""

  def __init__(self, params: list[Tree], stats: list[Tree], train: bool, dtype: Any):
    self.params, self.stats, self.train, self.dtype = params, stats, train, dtype
    self.updated: dict[str, Tree] = {}

  def __call__(self, name: str, y: jax.Array, ops: slice = slice(None)) -> jax.Array:
    """BN `name` of the ops in `ops` (a slice of the op axis) on y."""
    variables = {"params": _stack([p[name] for p in self.params[ops]]),
                 "batch_stats": _stack([s[name] for s in self.stats[ops]])}
    bn = batch_norm(self.train, self.dtype, axis=(0, y.ndim - 1), parent=None)
    if not self.train:
      return bn.apply(variables, y)
    out, new = bn.apply(variables, y, mutable=["batch_stats"])
    self.updated[name] = new["batch_stats"]
    return out


def _local_group(y: jax.Array, ops: Sequence[str], params: list[Tree],
                 options: OpOptions) -> jax.Array:
  """The local attentions of ops (one head count) on their stacked inputs."""
  specs = [OPS.get(op, key="op") for op in ops]
  window, heads = max(s.window for s in specs), specs[0].num_heads
  dtype = options.dtype
  qkv = [_conv1x1(y, _stack([p["op"][n]["kernel"][None, None] for p in params]), dtype)
         for n in ("query", "key", "value")]

  def padded(name: str) -> jax.Array:
    tables = []
    for spec, p in zip(specs, params):
      pad = (window - spec.window) // 2
      tables.append(jnp.pad(p["op"][name], ((pad, pad), (0, 0))))
    return jnp.stack(tables).astype(dtype)

  attend = lambda q, k, v, row, col, b=None: local_attention(
      q, k, v, window=window, num_heads=heads, rel_row=row, rel_col=col,
      border=options.border, impl=options.attention_impl, offset_bias=b)
  tables = (padded("rel_row"), padded("rel_col"))
  if all(s.window == window for s in specs):  # No window to narrow.
    return jax.vmap(attend)(*qkv, *tables)
  bias = jnp.asarray(np.stack([inner_window_bias(window, s.window, dtype) for s in specs]))
  return jax.vmap(attend)(*qkv, *tables, bias)


def _other_op(y: jax.Array, op: str, params: Tree, stats: Tree, inner: int,
              options: OpOptions, train: bool) -> tuple[jax.Array, Tree | None]:
  """A non-local (or other non-window) op as its own module on y [B, H, W, C]."""
  module = OPS.get(op, key="op").make(inner, options, "op", parent=None)
  variables = {"params": params["op"]}
  if "op" not in stats:
    return module.apply(variables, y, train), None
  variables["batch_stats"] = stats["op"]
  if not train:
    return module.apply(variables, y, train), None
  out, new = module.apply(variables, y, train, mutable=["batch_stats"])
  return out, new["batch_stats"]


def _middle(y: jax.Array, layer: LayerSpec, order: list[int], params: list[Tree],
            stats: list[Tree], train: bool) -> tuple[jax.Array, dict[int, Tree]]:
  """The attention ops on y [n, B, H, W, inner], in stacked order; also the new
  statistics of ops that keep their own (by position). Local ops with the same head
  count (and window, with layer.group_by_window) run as one group; every other op
  runs alone."""
  specs = [OPS.get(layer.ops[i], key="op") for i in order]

  def group_of(i: int) -> tuple:
    if specs[i].window is None:
      return (i,)
    return (-1, specs[i].num_heads) + ((specs[i].window,) if layer.group_by_window else ())

  outs, op_stats = [], {}
  for _, members in itertools.groupby(range(len(specs)), key=group_of):
    idx = list(members)
    start, stop = idx[0], idx[-1] + 1
    if specs[start].window is not None:
      ops = [layer.ops[i] for i in order[start:stop]]
      outs.append(_local_group(y[start:stop], ops, params[start:stop], layer.options))
      continue
    out, new = _other_op(y[start], layer.ops[order[start]], params[start], stats[start],
                         y.shape[-1], layer.options, train)
    outs.append(out[None])
    if new is not None:
      op_stats[start] = new
  return jnp.concatenate(outs), op_stats


def mixture_layer(x: jax.Array, weights: jax.Array, layer: LayerSpec,
                  params: Sequence[Tree], stats: Sequence[Tree],
                  train: bool) -> tuple[jax.Array, list[Tree]]:
  """sum_i weights[i] * Bottleneck(layer.ops[i])(x), all candidates stacked.

  params and stats are the per-op bottlenecks' variable subtrees, in layer.ops
  order. Returns the mixture and, in the same order, each op's new batch
  statistics (its old ones when not training).
  """
  dtype, n = layer.options.dtype, len(layer.ops)
  order = op_order(layer.ops)
  params = [params[i] for i in order]
  stats = [stats[i] for i in order]
  norms = _Norms(params, stats, train, dtype)
  y = nn.relu(norms("bn_in", _conv1x1(x, _stack([p["conv_in"]["kernel"] for p in params]),
                                      dtype)))
  y, op_stats = _middle(y, layer, order, params, stats, train)
  post = sum(OPS.get(layer.ops[i], key="op").post_norm for i in order)
  if post:
    y = jnp.concatenate([nn.relu(norms("bn_op", y[:post], slice(0, post))), y[post:]])
  y = norms("bn_out", _conv1x1(y, _stack([p["conv_out"]["kernel"] for p in params]), dtype))
  if layer.stride == 2:
    pooled = nn.avg_pool(y.reshape((-1,) + y.shape[2:]), (2, 2), strides=(2, 2))
    y = pooled.reshape((n, x.shape[0]) + pooled.shape[1:])
  shortcut = x[None]
  if layer.stride != 1 or x.shape[-1] != layer.features:
    strided = x[:, ::layer.stride, ::layer.stride]
    kernels = _stack([p["shortcut_conv"]["kernel"] for p in params])
    shortcut = norms("shortcut_bn", _conv1x1(strided, kernels, dtype))
  y = y + shortcut
  if layer.relu_after_add:
    y = nn.relu(y)
  out = jnp.einsum("n,nbhwc->bhwc", weights[jnp.asarray(order)].astype(y.dtype), y)
  return out, _new_stats(norms, op_stats, stats, order)


def _new_stats(norms: _Norms, op_stats: dict[int, Tree], stats: list[Tree],
               order: list[int]) -> list[Tree]:
  """Each op's statistics after the step, back in layer order."""
  new = [dict(s) for s in stats]
  for name, stacked in norms.updated.items():
    count = jax.tree.leaves(stacked)[0].shape[0]
    for i, tree in enumerate(_unstack(stacked, count)):
      new[i][name] = tree
  for i, tree in op_stats.items():
    new[i]["op"] = tree
  by_layer = [None] * len(order)
  for position, i in enumerate(order):
    by_layer[i] = new[position]
  return by_layer
