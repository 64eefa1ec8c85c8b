"""Analytic parameter counts and multiply-accumulates (MACs) of fanas_jax networks.

Pure arithmetic on the module structure of model.py and ops/layers.py, so the cost
of a genotype or of the supernet is known without tracing a network: the derive
stage reports it for free, and tables and budgets need no compile. (XLA's own cost
analysis is no substitute: it counts a `lax.scan` body once, not once per
iteration, so it under-counts the local attention.)

MACs are per image (batch 1) and count only products: 1x1 projections, convs,
attention logits and weighted values. BatchNorm, ReLU, softmax, pooling, residual
adds and the supernet's mixture sums are elementwise and not counted. BatchNorm's
scale and bias are parameters; its running statistics are not.

Each op and stem brings its own cost function in its registry entry (OpSpec.cost,
StemSpec.cost in fanas_jax/ops/layers.py), so a registered op always has one. The
command line (`python -m fanas_jax.cost`) is fanas_jax/cost/__main__.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fanas_jax.genotype import (
  NAMED_GENOTYPES,
  STAGE_KINDS,
  Genotype,
  stage_name,
)
from fanas_jax.model import LayerOps, is_supernet, stage_widths
from fanas_jax.ops.costs import Cost, batch_norm_cost, conv_cost
from fanas_jax.ops.layers import OPS, STEMS

__all__ = ["Cost", "LayerCost", "NetworkCost", "batch_norm_cost", "bottleneck_cost",
           "conv_cost", "load_genotype", "network_cost", "op_cost"]


def op_cost(op: str, channels: int, height: int, width: int) -> Cost:
  """Cost of the op alone on a [height, width, channels] map."""
  return OPS.get(op, key="op").cost(channels, height, width)


def bottleneck_cost(op: str, in_channels: int, features: int, stride: int,
                    height: int, width: int) -> Cost:
  """The Bottleneck of ops/layers.py on an input [height, width, in_channels]."""
  inner = features // 2
  pixels = height * width
  cost = (conv_cost(in_channels, inner, pixels) + batch_norm_cost(inner)
          + op_cost(op, inner, height, width))
  if OPS.get(op).post_norm:
    cost += batch_norm_cost(inner)
  cost += conv_cost(inner, features, pixels) + batch_norm_cost(features)
  if stride != 1 or in_channels != features:
    cost += conv_cost(in_channels, features, pixels // stride**2) + batch_norm_cost(features)
  return cost


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One row of the cost table; a supernet layer lists its candidates' bottlenecks."""
  layer: str
  op: str
  output_shape: tuple[int, ...]
  params: int
  macs: int
  candidates: tuple[LayerCost, ...] = ()

  def to_dict(self) -> dict[str, Any]:
    d = {"layer": self.layer, "op": self.op, "output_shape": list(self.output_shape),
         "params": self.params, "macs": self.macs}
    if self.candidates:
      d["candidates"] = [c.to_dict() for c in self.candidates]
    return d


def _row(layer: str, op: str, shape: tuple[int, ...], cost: Cost) -> LayerCost:
  return LayerCost(layer, op, shape, cost.params, cost.macs)


@dataclasses.dataclass(frozen=True)
class NetworkCost:
  """Per-layer and total cost of a network at one width and input size."""
  layers: tuple[LayerCost, ...]
  width: int
  image_size: int
  in_channels: int
  stem: str
  num_classes: int | None

  @property
  def params(self) -> int:
    return sum(row.params for row in self.layers)

  @property
  def macs(self) -> int:
    return sum(row.macs for row in self.layers)

  def totals(self) -> dict[str, Any]:
    """The totals and the settings they hold for, without the per-layer rows."""
    return {"params": self.params, "macs": self.macs, "width": self.width,
            "image_size": self.image_size, "in_channels": self.in_channels,
            "stem": self.stem, "num_classes": self.num_classes}

  def to_dict(self) -> dict[str, Any]:
    return dict(self.totals(), layers=[row.to_dict() for row in self.layers])

  def table(self) -> str:
    """Fixed-width table: one row per layer (supernet candidates indented), totals."""
    def line(layer, op, shape, params, macs):
      return f"{layer:<28} {op:<16} {shape:>12} {params:>12} {macs:>12}"

    def fmt(row: LayerCost, indent: str = "") -> list[str]:
      shape = "x".join(str(d) for d in row.output_shape)
      out = [line(indent + row.layer, row.op, shape, f"{row.params:,}",
                  f"{row.macs / 1e6:.3f}")]
      for c in row.candidates:
        out += fmt(c, indent + "  ")
      return out

    head = "none" if self.num_classes is None else f"{self.num_classes} classes"
    setting = (f"width {self.width}, input {self.image_size}x{self.image_size}x"
               f"{self.in_channels}, {self.stem} stem, head: {head}")
    rows = [setting, line("layer", "op", "output", "params", "MMACs")]
    for row in self.layers:
      rows += fmt(row)
    rows.append(line("total", "", "", f"{self.params:,}", f"{self.macs / 1e6:.3f}"))
    rows.append(f"{self.params / 1e6:.3f}M params, {self.macs / 1e9:.4f} GMACs per image")
    return "\n".join(rows)


def network_cost(layer_ops: LayerOps, width: int, image_size: int, *,
                 in_channels: int = 3, stem: str = "attention",
                 num_classes: int | None = None,
                 preprocess_affine: bool | None = None) -> NetworkCost:
  """Cost of the network `make_model(layer_ops, width, ...)` builds.

  layer_ops is [stage][layer] -> candidate op names (Genotype.layer_ops() or
  SearchSpace.layer_ops()); num_classes=None leaves the classifier head out.
  The model's options (border, relu_after_add, zero_init_residual) change no
  parameter and no product, so they are not arguments.

  preprocess_affine: whether the stage preprocess BNs have scale and bias; None
  (default) as make_model builds them: affine in a derived net, not in a
  supernet. True costs a supernet's table for the networks derived from it.
  """
  stem_cost, (h, w) = STEMS.get(stem, key="model.stem").cost(
      in_channels, width, image_size, image_size)
  rows = [_row("stem", f"{stem} stem", (h, w, width), stem_cost)]
  affine = not is_supernet(layer_ops) if preprocess_affine is None else preprocess_affine
  channels = width
  for s, (kind, features) in enumerate(zip(STAGE_KINDS, stage_widths(width))):
    name = stage_name(s)
    pre = conv_cost(channels, features, h * w) + batch_norm_cost(features, affine)
    rows.append(_row(f"{name}_pre", "conv1x1+bn", (h, w, features), pre))
    channels = features
    for l in range(len(layer_ops[s])):
      stride = 2 if (kind == "reduce" and l == 0) else 1
      if stride == 2 and (h % 2 or w % 2):
        raise ValueError(f"{name} halves an odd {h}x{w} map; use an image_size "
                         "that passes through the stem and both reduce stages.")
      ops = tuple(layer_ops[s][l])
      out_shape = (h // stride, w // stride, features)
      layer = f"{name}_layer{l + 1}"
      candidates = tuple(
          _row(f"{layer}_{op}", op, out_shape,
               bottleneck_cost(op, channels, features, stride, h, w))
          for op in ops)
      if len(ops) == 1:
        rows.append(dataclasses.replace(candidates[0], layer=layer))
      else:
        rows.append(LayerCost(layer, f"{len(ops)} candidates", out_shape,
                              sum(c.params for c in candidates),
                              sum(c.macs for c in candidates), candidates))
      h, w = out_shape[:2]
  if num_classes is not None:
    rows.append(_row("head", "classifier", (num_classes,),
                     conv_cost(channels, num_classes, 1, bias=True)))
  return NetworkCost(tuple(rows), width, image_size, in_channels, stem, num_classes)


def load_genotype(spec: str) -> Genotype:
  """A named genotype, or a JSON file: a derive-stage record or a bare genotype dict."""
  if spec in NAMED_GENOTYPES:
    return NAMED_GENOTYPES[spec]
  if not os.path.isfile(spec):
    raise ValueError(f"--genotype={spec!r} is neither a named genotype "
                     f"({', '.join(sorted(NAMED_GENOTYPES))}) nor a file.")
  try:
    with open(spec) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--genotype={spec!r} is not a readable JSON file: {e}") from None
  if not isinstance(data, dict):
    raise TypeError(f"--genotype={spec!r} holds no genotype dict.")
  return Genotype.from_dict(data.get("genotype", data))
