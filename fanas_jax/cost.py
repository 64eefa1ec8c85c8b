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

Every op needs a cost function here (`OP_COSTS`); registering one for a new op is
`OP_COSTS.add(name, fn)` with fn(spec, channels, height, width) -> Cost.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from fanas_jax.genotype import (
  LAYERS_PER_STAGE,
  NAMED_GENOTYPES,
  STAGE_KINDS,
  Genotype,
  search_space_from_config,
  stage_name,
)
from fanas_jax.model import LayerOps, stage_widths
from fanas_jax.ops.layers import OPS, STEMS, AttentionStem, OpSpec
from fanas_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Cost:
  """Parameters and MACs of one part of a network."""
  params: int = 0
  macs: int = 0

  def __add__(self, other: Cost) -> Cost:
    return Cost(self.params + other.params, self.macs + other.macs)


def conv_cost(in_channels: int, out_channels: int, out_pixels: int,
              kernel: int = 1, bias: bool = False) -> Cost:
  """A bias-free (by default) kernel x kernel conv or dense layer."""
  fan_in = kernel * kernel * in_channels
  return Cost(fan_in * out_channels + (out_channels if bias else 0),
              out_pixels * fan_in * out_channels)


def batch_norm_cost(channels: int) -> Cost:
  return Cost(params=2 * channels)


OpCostFn = Callable[[OpSpec, int, int, int], Cost]
OP_COSTS: Registry[OpCostFn] = Registry("op cost function")


def local_attention_cost(spec: OpSpec, channels: int, height: int, width: int) -> Cost:
  """SASA local attention over the nominal k x k window (padding included).

  Per pixel: q/k/v projections, k*k logits and k*k weighted values over all
  channels (head_dim * heads = channels, so the head count does not change MACs),
  and the relative-position logits as the code computes them: the query against a
  row table and a column table, each k x channels.
  """
  k = spec.window
  projections = 3 * channels * channels
  params = projections + k * channels  # rel_row and rel_col are [k, channels/2] each.
  per_pixel = projections + 2 * k * k * channels + 2 * k * channels
  return Cost(params, height * width * per_pixel)


def nonlocal_cost(spec: OpSpec, channels: int, height: int, width: int) -> Cost:
  """theta/phi/g to channels/2, (H*W)^2 logits and weighted values, output 1x1, BN."""
  del spec
  inner = max(channels // 2, 1)
  tokens = height * width
  projections = 4 * channels * inner  # theta, phi, g and out.
  attention = 2 * tokens * tokens * inner
  return Cost(projections, tokens * projections + attention) + batch_norm_cost(channels)


def axial_attention_cost(spec: OpSpec, channels: int, height: int, width: int) -> Cost:
  """Row then column attention: q/k/v per pass, each pixel attends along its row
  (W logits and values) and then its column (H)."""
  del spec
  projections = 6 * channels * channels
  per_pixel = projections + 2 * channels * (height + width)
  return Cost(projections, height * width * per_pixel)


for _window in (3, 5, 7):
  for _heads in (4, 8):
    OP_COSTS.add(f"local{_window}_h{_heads}", local_attention_cost)
OP_COSTS.add("nonlocal", nonlocal_cost)
for _heads in (4, 8):
  OP_COSTS.add(f"axial_h{_heads}", axial_attention_cost)


def require_cost_function(op: str) -> OpSpec:
  """The op's spec; a clear error if the op is unknown or has no cost function."""
  spec = OPS.get(op, key="op")
  if op not in OP_COSTS:
    raise ValueError(
        f"Op {op!r} has no cost function: register one with "
        f"fanas_jax.cost.OP_COSTS.add({op!r}, fn). Ops with one: "
        f"{', '.join(OP_COSTS.names())}.")
  return spec


def op_cost(op: str, channels: int, height: int, width: int) -> Cost:
  """Cost of the op alone on a [height, width, channels] map."""
  spec = require_cost_function(op)
  return OP_COSTS.get(op)(spec, channels, height, width)


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


# A stem cost function maps (in_channels, features, height, width) to its cost and
# output (height, width).
StemCostFn = Callable[[int, int, int, int], tuple[Cost, tuple[int, int]]]
STEM_COSTS: Registry[StemCostFn] = Registry("stem cost function")


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


def conv_stem_cost(in_channels: int, features: int, height: int,
                   width: int) -> tuple[Cost, tuple[int, int]]:
  """Three 3x3 stride-2 'SAME' convs (C/2, C/2, C), each followed by BN."""
  cost = Cost()
  for out_channels in (features // 2, features // 2, features):
    height, width = -(-height // 2), -(-width // 2)
    cost += (conv_cost(in_channels, out_channels, height * width, kernel=3)
             + batch_norm_cost(out_channels))
    in_channels = out_channels
  return cost, (height, width)


STEM_COSTS.add("attention", attention_stem_cost)
STEM_COSTS.add("conv", conv_stem_cost)


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
                 num_classes: int | None = None) -> NetworkCost:
  """Cost of the network `make_model(layer_ops, width, ...)` builds.

  layer_ops is [stage][layer] -> candidate op names (Genotype.layer_ops() or
  SearchSpace.layer_ops()); num_classes=None leaves the classifier head out.
  """
  STEMS.get(stem, key="model.stem")
  if stem not in STEM_COSTS:
    raise ValueError(
        f"Stem {stem!r} has no cost function: register one with "
        f"fanas_jax.cost.STEM_COSTS.add({stem!r}, fn).")
  stem_cost, (h, w) = STEM_COSTS.get(stem)(in_channels, width, image_size, image_size)
  rows = [_row("stem", f"{stem} stem", (h, w, width), stem_cost)]
  channels = width
  for s, (kind, features) in enumerate(zip(STAGE_KINDS, stage_widths(width))):
    name = stage_name(s)
    pre = conv_cost(channels, features, h * w) + batch_norm_cost(features)
    rows.append(_row(f"{name}_pre", "conv1x1+bn", (h, w, features), pre))
    channels = features
    for l in range(LAYERS_PER_STAGE):
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


def _define_flags() -> None:
  """Called only when run as a program: importing this module defines no flags."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Config file: configs/NAME.py or configs/NAME.py:VARIANT.",
      lock_config=True)
  flags.DEFINE_string("genotype", None, "A named genotype (default 'original') or the "
                      "path of a genotype JSON (a derive stage's genotype.json).")
  flags.DEFINE_bool("supernet", False, "Cost the supernet of config.search.candidates.")
  flags.DEFINE_integer("width", None, "Width C; default config.train.width "
                       "(config.model.width with --supernet).")
  flags.DEFINE_integer("image_size", None, "Input side; default config.image_size.")
  flags.DEFINE_string("stem", None, "Stem; default config.model.stem.")
  flags.DEFINE_integer("in_channels", None, "Input channels; default the dataset's.")
  flags.DEFINE_integer("num_classes", None,
                       "Classifier classes; default the dataset's; 0 leaves the head out.")
  flags.DEFINE_string("json", None, "Also write the cost as JSON to this path.")
  flags.mark_flags_as_required(["config"])


def _fail(message: str) -> None:
  print(f"fanas_jax.cost: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    _fail(str(e))
  return []


def main(argv: Sequence[str]) -> None:
  """python -m fanas_jax.cost --config=configs/default.py [--genotype=...] [--supernet]."""
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from fanas_jax.data.datasets import get_dataset
  f = flags.FLAGS
  config = f.config
  try:
    if f.supernet:
      if f.genotype is not None:
        raise ValueError("give --genotype or --supernet, not both.")
      layer_ops = search_space_from_config(config.search.candidates).layer_ops()
      width = f.width or config.model.width
    else:
      layer_ops = load_genotype(f.genotype or "original").layer_ops()
      width = f.width or config.train.width
    dataset = get_dataset(config.dataset)
    num_classes = dataset.num_classes if f.num_classes is None else f.num_classes
    cost = network_cost(layer_ops, width, f.image_size or config.image_size,
                        in_channels=f.in_channels or dataset.channels,
                        stem=f.stem or config.model.stem,
                        num_classes=num_classes or None)
  except (OSError, TypeError, ValueError) as e:  # OSError: an unloadable --config.
    _fail(str(e))
  print(cost.table())
  if f.json:
    try:
      with open(f.json, "w") as out:
        json.dump(cost.to_dict(), out, indent=2)
    except OSError as e:
      _fail(f"cannot write --json={f.json}: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
