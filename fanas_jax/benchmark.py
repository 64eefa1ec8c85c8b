"""Speed and memory of the attention ops and the networks: a table and JSON.

    python -m fanas_jax.benchmark                       # ops and networks
    python -m fanas_jax.benchmark --suite=ops --json=ops.json
    python -m fanas_jax.benchmark --suite=nets --nets=cifar,search
    python -m fanas_jax.benchmark --suite=nets,input --nets=cifar   # who limits whom
    python -m fanas_jax.benchmark --suite=retrieval    # top-k at SOP size, 60,502 x 512
    python -m fanas_jax.benchmark --suite=seeds --seeds=4   # 4 seeds in one run vs 4 runs

The ops suite times forward+backward of every attention core at one stage shape
(default batch 64, 28x28, 256 channels, 8 heads, bfloat16): global attention
through jax.nn.dot_product_attention (cuDNN's fused kernel on GPUs, XLA
elsewhere), each local window in both implementations, and every registered op as
a module. Each row carries its ratio to global attention, measured in the same
run. The nets suite times the real training step of the original genotype (CIFAR
C=96 and ImageNet C=112) and the bilevel search step of the supernet beside one
plain weight step of the same supernet, for each `--supernet_impls`, each
`--search_sizes` map side and each `--search_candidates` count N (a supernet of the
first N of `--search_ops`), so one run gives the scaling table. With
`--single_op_ratio` it also times, at each map side, the weight step of every
candidate's single-op network (the plain network of that op, same width, head and
batch), and each supernet weight step carries its ratio to the sum of its
candidates' (`vs_single_ops`). Network steps run data-parallel on a
'data' mesh over `--devices` devices (default all), with `--net_batch` and
`--search_batch` images per device, and report img/s per device. The input suite
times the real input pipeline (grain over TFDS or an image folder, with
augmentation) at the nets' global batch and resolution, so its img/s stands beside
the steps' and the table says which one limits a run. The retrieval suite times
the exact blockwise top-k of zero-shot retrieval (fanas_jax.retrieval; default at
Stanford Online Products size, 60,502 x 512 queried against itself with K=1000)
at each `--retrieval_blocks` query block, on all devices, beside the bytes it
holds per device computed from the shapes (O(block x N), never N x N) and the
device's own peak where it reports one. The seeds suite times whole search runs,
compile included (`--seed_steps` steps of the supernet of the search flags): one
single-seed run, then one run of each `--seeds` N in one vmapped step (what
search.num_seeds=N runs), against N separate runs.

Times are medians of `--iters` calls after `--warmup` calls. The ops and nets
suites use synthetic in-memory inputs, so they need no dataset (and none of grain,
TFDS or ml_collections). FLOPs are analytic (fanas_jax.cost, 2 per MAC, backward = 2x forward);
MFU is given where the device's peak is known. Memory is XLA's own account of
the compiled function (arguments + outputs + temporaries).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fanas_jax import cost, host, parallel, retrieval, steps
from fanas_jax.genotype import (LAYERS_PER_STAGE, NAMED_GENOTYPES, NUM_STAGES, Genotype,
                               SearchSpace)
from fanas_jax.model import DTYPES, SUPERNET_IMPLS, make_model
from fanas_jax.objectives import make_objective
from fanas_jax.ops import OPS, ORIGINAL_OPS, OpOptions, local_attention
from fanas_jax.ops.attention import IMPLEMENTATIONS, default_backend

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; other devices report none.
PEAK_FLOPS_16BIT = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
                    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12}
NETS = ("cifar", "imagenet", "search")
SUITES = ("ops", "nets", "input", "retrieval", "seeds")
INPUT_MIN_BATCHES = 50
# Backbone variables of one layer's op: backbone/stage{s}_layer{l}_{op}.
_LAYER_VARIABLES = re.compile(r"stage\d+_layer\d+_(.+)")


def _peak_flops(dtype: Any) -> float | None:
  if jnp.dtype(dtype).itemsize != 2:
    return None
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS_16BIT.items() if k in kind), None)


def measure(fn: Callable, args: Sequence[Any], iters: int, warmup: int) -> dict[str, Any]:
  """Compile once, then the median wall time of `iters` blocking calls."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  memory = compiled.memory_analysis()
  mem_bytes = None
  if memory is not None:
    mem_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {"median_ms": 1e3 * float(np.median(times)),
          "p10_ms": 1e3 * float(np.percentile(times, 10)),
          "p90_ms": 1e3 * float(np.percentile(times, 90)),
          "compile_s": compile_s, "memory_mib": None if mem_bytes is None
          else mem_bytes / 2**20}


def _fwd_bwd(fn: Callable) -> Callable:
  """Forward and backward of fn against a fixed random cotangent (no reduction trick
  that XLA could simplify away)."""
  def run(cotangent, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)
  return run


def ops_suite(a: argparse.Namespace) -> list[dict[str, Any]]:
  dtype = DTYPES[a.dtype]
  b, s, c, n = a.batch, a.size, a.channels, a.heads
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  q, k, v, ct = (normal(b, s, s, c) for _ in range(4))
  rows = []

  backend = default_backend(dtype)
  tokens = lambda x: x.reshape(b, s * s, n, c // n)
  glob = lambda q, k, v: jax.nn.dot_product_attention(
      tokens(q), tokens(k), tokens(v), implementation=backend).reshape(q.shape)
  global_macs = 2 * b * (s * s) ** 2 * c
  rows.append(dict(name=f"global attention ({backend})", kind="core",
                   macs=global_macs, **measure(_fwd_bwd(glob), (ct, q, k, v),
                                               a.iters, a.warmup)))
  for window in a.windows:
    rel = normal(window, c // 2)
    for impl in a.impls:
      fn = lambda q, k, v, r, impl=impl, window=window: local_attention(
          q, k, v, window=window, num_heads=n, rel_row=r, rel_col=r, impl=impl)
      macs = b * s * s * (2 * window * window * c + 2 * window * c)
      rows.append(dict(name=f"local {window}x{window} ({impl})", kind="core",
                       macs=macs, **measure(_fwd_bwd(fn), (ct, q, k, v, rel),
                                            a.iters, a.warmup)))
  if a.modules:
    x = normal(b, s, s, c)
    for op in a.modules:
      module = OPS.get(op, key="--modules").make(
          c, OpOptions(dtype=dtype, attention_impl=a.impls[0]), "op")
      variables = module.init(jax.random.key(0), x[:1])
      fn = lambda params, x, module=module, variables=variables: module.apply(
          {**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0]
      rows.append(dict(name=f"{op} module", kind="module",
                       macs=b * cost.op_cost(op, c, s, s).macs,
                       **measure(_fwd_bwd(fn), (ct, variables["params"], x),
                                 a.iters, a.warmup)))
  reference = rows[0]["median_ms"]
  for row in rows:
    row["vs_global"] = row["median_ms"] / reference
  return rows


def _synthetic_batch(batch: int, size: int, channels: int, classes: int,
                     mesh: Any) -> dict:
  """A global batch sharded over the mesh's 'data' axis."""
  rng = np.random.default_rng(1)
  return parallel.shard_batch(
      {"image": rng.standard_normal((batch, size, size, channels)).astype(np.float32),
       "label": rng.integers(0, classes, batch).astype(np.int32)}, mesh)


def _train_state(variables: Any, tx: optax.GradientTransformation,
                 mesh: Any) -> steps.TrainState:
  return parallel.replicate(steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)


def _train_row(name: str, a: argparse.Namespace, width: int, size: int, stem: str,
               classes: int, mesh: Any) -> dict[str, Any]:
  """The real training step (loss, backward, SGD) of the original genotype."""
  batch = a.net_batch * mesh.size
  genotype = NAMED_GENOTYPES["original"]
  model = make_model(genotype.layer_ops(), width, "classifier", stem=stem,
                     dtype=DTYPES[a.dtype], attention_impl=a.impls[0],
                     num_classes=classes, dropout=0.0)
  tx = optax.sgd(0.01, momentum=0.9)
  state = _train_state(steps.init_variables(model, jax.random.key(0), (1, size, size, 3)),
                       tx, mesh)
  step = steps.make_train_step(model, make_objective("supervised", None), tx)
  macs = cost.network_cost(genotype.layer_ops(), width, size, stem=stem,
                           num_classes=classes).macs
  result = measure(step, (state, _synthetic_batch(batch, size, 3, classes, mesh),
                          jax.random.key(1)), a.iters, a.warmup)
  return dict(name=name, kind="train step", batch=batch, image_size=size,
              devices=mesh.size, macs=batch * macs, **result)


def _car_objective(size: int) -> Any:
  return make_objective("car", types.SimpleNamespace(
      image_size=size, num_boxes=4, box_size=size // 4))


def _variable_summary(params: Any) -> dict[str, Any]:
  """What a row's network is, read from its own variable tree: the ops its layers'
  variables belong to and the backbone's weight count."""
  backbone = params["backbone"]
  ops = {m.group(1) for name in backbone if (m := _LAYER_VARIABLES.fullmatch(name))}
  return dict(param_ops=sorted(ops),
              backbone_params=int(sum(x.size for x in jax.tree.leaves(backbone))))


def _search_rows(a: argparse.Namespace, mesh: Any) -> list[dict[str, Any]]:
  """For each --search_sizes map side: with --single_op_ratio the single-op networks
  first, then the supernet rows of each --supernet_impls at each --search_candidates
  count, so every ratio is measured side by side in one run."""
  rows = []
  for size in a.search_sizes:
    singles = _single_op_rows(a, mesh, size) if a.single_op_ratio else []
    supernets = [row for impl in a.supernet_impls for n in a.search_candidates
                 for row in _search_rows_at(a, mesh, size, impl, a.search_ops[:n])]
    if singles:
      _single_op_ratios(supernets, singles)
    rows += singles + supernets
  return rows


def _single_op_rows(a: argparse.Namespace, mesh: Any, size: int) -> list[dict[str, Any]]:
  """The weight step of each candidate's plain network (every layer that op alone,
  not a mixture of one) at the supernet's width, head, map side and batch."""
  objective = _car_objective(size)
  batch = a.search_batch * mesh.size
  w_tx = optax.sgd(0.025, momentum=0.9)
  w_batch = _synthetic_batch(batch, size, 3, 10, mesh)
  rows = []
  for op in a.search_ops[:max(a.search_candidates)]:
    layer_ops = Genotype(((op,) * a.search_layers,) * NUM_STAGES).layer_ops()
    model = make_model(layer_ops, a.search_width, objective.head, dtype=DTYPES[a.dtype],
                       attention_impl=a.impls[0], out_channels=3)
    variables = steps.init_variables(model, jax.random.key(0), (1, size, size, 3))
    step = steps.make_train_step(model, objective, w_tx)
    result = measure(step, (_train_state(variables, w_tx, mesh), w_batch,
                            jax.random.key(2)), a.iters, a.warmup)
    macs = batch * cost.network_cost(layer_ops, a.search_width, size).macs
    rows.append(dict(
        name=f"single-op network {op}, weight step (C={a.search_width}, {size}x{size})",
        kind="single op", op=op, step="weight", image_size=size, devices=mesh.size,
        layers_per_stage=a.search_layers, batch=batch, macs=macs, **_variable_summary(variables["params"]), **result))
  return rows


def _single_op_ratios(supernets: list[dict[str, Any]],
                      singles: list[dict[str, Any]]) -> None:
  """Each supernet weight step gets the sum of its candidates' single-op weight-step
  medians and its ratio to it (the same kind of step, batch and map side). A search
  step has no single-op counterpart: a plain network has no alpha to step."""
  medians = {row["op"]: row["median_ms"] for row in singles}
  for row in supernets:
    if row["step"] == "weight":
      row["single_op_sum_ms"] = sum(medians[op] for op in row["candidates"])
      row["vs_single_ops"] = row["median_ms"] / row["single_op_sum_ms"]


def _supernet(a: argparse.Namespace, size: int, impl: str,
              ops: Sequence[str]) -> tuple[Any, Any, Any, Any, Any]:
  """The search flags' supernet of `ops` at map side `size` under the CAR objective,
  with its weight and alpha optimizers: (space, objective, model, w_tx, a_tx)."""
  space, objective = SearchSpace.uniform(ops, a.search_layers), _car_objective(size)
  model = make_model(space.layer_ops(), a.search_width, objective.head,
                     dtype=DTYPES[a.dtype], attention_impl=a.impls[0],
                     supernet_impl=impl, out_channels=3)
  return space, objective, model, optax.sgd(0.025, momentum=0.9), optax.adam(3e-4, b1=0.5)


def _search_rows_at(a: argparse.Namespace, mesh: Any, size: int, impl: str,
                    ops: Sequence[str]) -> list[dict[str, Any]]:
  """One weight step of the supernet of `ops`, then a bilevel search step in each mode.

  A first-order step is an alpha pass on the architecture batch plus a weight pass
  on the weight batch, so about two weight steps; second order adds the virtual
  weight step and differentiates through it; Gumbel runs one sampled op per layer.
  """
  space, objective, model, w_tx, a_tx = _supernet(a, size, impl, ops)
  width, batch = a.search_width, a.search_batch * mesh.size
  alphas = steps.init_alphas(space, jax.random.key(0), 1e-3)
  state = parallel.replicate(steps.init_search_state(
      model, alphas, w_tx, a_tx, jax.random.key(1), (1, size, size, 3)), mesh)
  w_batch = _synthetic_batch(batch, size, 3, 10, mesh)
  a_batch = _synthetic_batch(batch, size, 3, 10, mesh)
  macs = batch * cost.network_cost(space.layer_ops(), width, size).macs
  train_state = steps.TrainState(step=state.step, params=state.params,
                                 batch_stats=state.batch_stats,
                                 opt_state=state.w_opt_state)
  weight_step = steps.make_train_step(model, objective, w_tx, alphas=alphas)
  weight = measure(weight_step, (train_state, w_batch, jax.random.key(2)),
                   a.iters, a.warmup)
  label = f"{len(ops)} ops, {impl}, C={width}, {size}x{size}"
  common = dict(kind="search", image_size=size, devices=mesh.size, supernet_impl=impl,
                num_candidates=len(ops), candidates=list(ops),
                layers_per_stage=a.search_layers, **_variable_summary(state.params))
  rows = [dict(name=f"supernet weight step ({label})", step="weight", batch=batch,
               macs=macs, **common, **weight)]
  for mode in a.search_modes:
    tau = (lambda step: 1.0) if mode == "gumbel" else None
    step = steps.make_search_step(model, objective, w_tx, a_tx, mode, tau_schedule=tau)
    result = measure(step, (state, w_batch, a_batch, jax.random.key(2)), a.iters,
                     a.warmup)
    # Analytic MACs: the mixture's two passes; a sampled path runs about 1/n_ops.
    mode_macs = 2 * macs // (len(ops) if mode == "gumbel" else 1)
    rows.append(dict(name=f"supernet search step, {mode} ({label})", step=mode,
                     batch=2 * batch, macs=mode_macs, **common,
                     vs_weight_step=result["median_ms"] / weight["median_ms"], **result))
  return rows


def nets_suite(a: argparse.Namespace) -> list[dict[str, Any]]:
  mesh = parallel.make_mesh(a.devices)
  rows = []
  if "cifar" in a.nets:
    rows.append(_train_row("original genotype C=96, 32x32 (CIFAR)", a, 96, 32,
                           "attention", 10, mesh))
  if "imagenet" in a.nets:
    rows.append(_train_row("original genotype C=112, 224x224 (ImageNet)", a, 112,
                           224, "conv", 1000, mesh))
  if "search" in a.nets:
    rows += _search_rows(a, mesh)
  return rows


def input_suite(a: argparse.Namespace) -> list[dict[str, Any]]:
  """The real training input pipeline: batches/s of `train_iterator` alone.

  One row per resolution the nets suite uses (or --input_sizes), at the nets'
  global batch, so each step has the pipeline's rate beside it. Its 'median_ms'
  is the mean time per batch over at least INPUT_MIN_BATCHES batches. 224x224
  runs the ImageNet training recipe (random-resized crop, flip, colour jitter
  on RGB), smaller sizes the CIFAR one (crop of padding size/8, flip).
  """
  from fanas_jax.data import pipeline  # grain and TFDS: only this suite needs them
  from fanas_jax.data.datasets import get_dataset

  spec = get_dataset(a.input_dataset)
  data = pipeline.load_split(a.input_dataset, a.input_split)
  sizes = a.input_sizes or sorted({224 if n == "imagenet" else 32 for n in a.nets}) or [32]
  batch = a.net_batch * parallel.mesh_size(a.devices)
  rows = []
  for size in sizes:
    if size >= 224:
      recipe = dict(random_resized_crop=True, flip=True, color_jitter=(
          (0.4, 0.4, 0.4, 0.2) if spec.channels == 3 else ()))
    else:
      recipe = dict(crop_padding=size // 8, flip=True)
    it = pipeline.train_iterator(
        data, batch_size=min(batch, len(data)), seed=0,
        preprocess=pipeline.Preprocess(size, spec.mean, spec.std, **recipe),
        num_workers=a.input_workers)
    # Drain what the read threads prefetched while the iterator started, so the
    # times are the pipeline's steady rate, not its buffer's.
    for _ in range(a.warmup + 2 * pipeline.PREFETCH_BATCHES):
      next(it)
    # Throughput is the mean over many batches: a median of single next() calls
    # would count batches the workers had buffered as free.
    count = max(a.iters, INPUT_MIN_BATCHES)
    times = []
    for _ in range(count):
      t0 = time.perf_counter()
      next(it)
      times.append(time.perf_counter() - t0)
    rows.append(dict(
        name=f"input pipeline {a.input_dataset} {size}x{size}, {a.input_workers} workers",
        kind="input", batch=min(batch, len(data)), image_size=size, macs=0,
        devices=parallel.mesh_size(a.devices),
        median_ms=1e3 * float(np.mean(times)),
        p10_ms=1e3 * float(np.percentile(times, 10)),
        p90_ms=1e3 * float(np.percentile(times, 90)), compile_s=0.0, memory_mib=None))
  return rows


def seeds_suite(a: argparse.Namespace) -> list[dict[str, Any]]:
  """Whole search runs, compile included: one single-seed run, then for each --seeds
  N one run of N seeds in one vmapped step (search.num_seeds=N). Each N-seed row
  carries its wall time against N separate single-seed runs (each compiling, as
  separate processes without a warm cache do) and against the cheapest N separate
  runs could be (one compile, N x the steps)."""
  mesh = parallel.make_mesh(a.devices)
  ops = a.search_ops[:max(a.search_candidates)]
  single = _seed_run(a, mesh, 1, ops)
  rows = [single]
  for n in a.seeds:
    row = _seed_run(a, mesh, n, ops)
    row["vs_separate"] = row["run_s"] / (n * single["run_s"])
    row["vs_separate_one_compile"] = row["run_s"] / (
        single["compile_s"] + n * single["steps_s"])
    row["step_vs_separate"] = row["median_ms"] / (n * single["median_ms"])
    rows.append(row)
  return rows


def _seed_batches(n: int, batch: int, size: int, mesh: Any, offset: int) -> dict:
  """n seeds' own synthetic batches, [n, batch, ...] sharded on the batch axis
  (one seed: [batch, ...], as a single search feeds its step)."""
  rngs = [np.random.default_rng(offset + s) for s in range(n)]
  images = np.stack([r.standard_normal((batch, size, size, 3)) for r in rngs])
  labels = np.stack([r.integers(0, 10, batch) for r in rngs])
  stacked = {"image": images.astype(np.float32), "label": labels.astype(np.int32)}
  if n == 1:
    return parallel.shard_batch(jax.tree.map(lambda x: x[0], stacked), mesh)
  return parallel.shard_batch(stacked, mesh, seed_axis=True)


def _seed_run(a: argparse.Namespace, mesh: Any, n: int,
              ops: Sequence[str]) -> dict[str, Any]:
  """One search run of n seeds at the first --search_sizes and --supernet_impls:
  compile the step (vmapped over the seeds for n > 1), then --seed_steps steps,
  each fed the state the last one returned."""
  size, impl = a.search_sizes[0], a.supernet_impls[0]
  mode = (a.search_modes or ["first_order"])[0]
  space, objective, model, w_tx, a_tx = _supernet(a, size, impl, ops)
  width, batch = a.search_width, a.search_batch * mesh.size
  states = [steps.init_search_state(
      model, steps.init_alphas(space, jax.random.key(2 * s), 1e-3), w_tx, a_tx,
      jax.random.key(2 * s + 1), (1, size, size, 3)) for s in range(n)]
  state = parallel.replicate(
      states[0] if n == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states), mesh)
  keys = jax.random.key(7) if n == 1 else jnp.stack([jax.random.key(7 + s)
                                                     for s in range(n)])
  args = (_seed_batches(n, batch, size, mesh, 100), _seed_batches(n, batch, size, mesh, 200),
          keys)
  step = steps.seeds_step(steps.make_search_step(model, objective, w_tx, a_tx, mode), n)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(a.seed_steps):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, *args))
    times.append(time.perf_counter() - t0)
  macs = batch * cost.network_cost(space.layer_ops(), width, size).macs
  return dict(
      name=f"{n} seed(s), {mode}, {len(ops)} ops, {impl}, C={width}, {size}x{size}: "
           f"compile + {a.seed_steps} steps",
      kind="seeds", num_seeds=n, step=mode, image_size=size, devices=mesh.size,
      supernet_impl=impl, num_candidates=len(ops), batch=2 * batch * n,
      macs=2 * macs * n, compile_s=compile_s, steps_s=float(sum(times)),
      run_s=compile_s + float(sum(times)), median_ms=1e3 * float(np.median(times)),
      memory_mib=None)


def seeds_table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'search runs of N seeds':66s} {'compile s':>9s} {'step ms':>9s} "
          f"{'run s':>8s} {'vs N runs':>9s} {'vs N runs, 1 compile':>20s} "
          f"{'step vs N':>9s}")
  lines = [head, "-" * len(head)]
  fmt = lambda v, width: "-" if v is None else format(v, f"{width}.2f")
  for r in rows:
    lines.append(
        f"{r['name']:66s} {r['compile_s']:9.1f} {r['median_ms']:9.1f} {r['run_s']:8.1f} "
        f"{fmt(r.get('vs_separate'), 9):>9s} "
        f"{fmt(r.get('vs_separate_one_compile'), 20):>20s} "
        f"{fmt(r.get('step_vs_separate'), 9):>9s}")
  return "\n".join(lines)


def _device_peak_mib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def retrieval_suite(a: argparse.Namespace) -> list[dict[str, Any]]:
  """The blockwise top-k of every example against all the others (itself
  excluded), one row per query block: time, queries/s, analytic bytes per device,
  XLA's memory account of the compiled function, and the device's peak."""
  n, dim, k = a.retrieval_n, a.retrieval_dim, a.retrieval_k
  x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
  mesh = parallel.make_mesh(a.devices)
  rows = []
  for block in a.retrieval_blocks:
    fn, args = retrieval.topk_call(x, x, k, block, gallery_block=a.retrieval_gallery_block,
                                   exclude_self=True, mesh=mesh)
    result = measure(fn, args, a.iters, a.warmup)
    bound = retrieval.topk_memory_bytes(n, n, dim, k, block, a.retrieval_gallery_block,
                                        mesh.size)
    rows.append(dict(
        name=f"top-{k} of {n} x {dim}, block {block}", kind="retrieval", n=n, dim=dim,
        k=k, block=block, gallery_block=a.retrieval_gallery_block or n, devices=mesh.size,
        queries_per_s=n / (result["median_ms"] / 1e3),
        tflops=2 * n * n * dim / (result["median_ms"] / 1e3) / 1e12,
        bound_mib={key: v / 2**20 for key, v in bound.items()},
        device_peak_mib=_device_peak_mib(), **result))
  return rows


def retrieval_table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'retrieval top-k':40s} {'median ms':>10s} {'queries/s':>10s} {'TFLOP/s':>8s} "
          f"{'block MiB':>9s} {'bound MiB':>9s} {'XLA MiB':>8s} {'peak MiB':>9s} "
          f"{'NxN MiB':>9s} {'compile s':>9s}")
  lines = [head, "-" * len(head)]
  fmt = lambda v, width: f"{'-' if v is None else format(v, '.1f'):>{width}s}"
  for r in rows:
    b = r["bound_mib"]
    lines.append(
        f"{r['name']:40s} {r['median_ms']:10.1f} {r['queries_per_s']:10.0f} "
        f"{r['tflops']:8.3f} {b['block_working']:9.1f} {b['total']:9.1f} "
        f"{fmt(r['memory_mib'], 8)} {fmt(r['device_peak_mib'], 9)} "
        f"{b['full_matrix']:9.1f} {r['compile_s']:9.1f}")
  return "\n".join(lines)


def _input_limits(rows: list[dict[str, Any]]) -> None:
  """Each step row gets the input pipeline's img/s at its resolution, and the ratio:
  input_vs_step < 1 means the pipeline, not the step, limits a run."""
  inputs = {r["image_size"]: r["img_per_s"] for r in rows if r["kind"] == "input"}
  for row in rows:
    if row["kind"] != "input" and row.get("image_size") in inputs:
      row["input_img_per_s"] = inputs[row["image_size"]]
      row["input_vs_step"] = row["input_img_per_s"] / row["img_per_s"]


def _finish(rows: list[dict[str, Any]], dtype: Any) -> None:
  """Derived columns: analytic TFLOP/s (fwd+bwd = 3x forward), MFU, img/s."""
  peak = _peak_flops(dtype)
  for row in rows:
    seconds = row["median_ms"] / 1e3
    row["tflops"] = 6 * row["macs"] / seconds / 1e12
    row["mfu"] = None if peak is None else 6 * row["macs"] / seconds / peak / row.get(
        "devices", 1)
    if "batch" in row:
      row["img_per_s"] = row["batch"] / seconds
      row["img_per_s_per_device"] = row["img_per_s"] / row.get("devices", 1)
  _input_limits(rows)


def table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'benchmark':66s} {'median ms':>10s} {'ratio':>7s} {'img/s':>9s} "
          f"{'img/s/dev':>9s} {'input/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'MiB':>8s} {'compile s':>9s}")
  lines = [head, "-" * len(head)]
  for r in rows:
    ratio = r.get("vs_global", r.get("vs_weight_step"))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines.append(
        f"{r['name']:66s} {r['median_ms']:10.3f} {fmt(ratio, '7.2f')} "
        f"{fmt(r.get('img_per_s'), '9.1f')} {fmt(r.get('img_per_s_per_device'), '9.1f')} "
        f"{fmt(r.get('input_vs_step'), '10.2f')} {r['tflops']:8.3f} "
        f"{fmt(r['mfu'], '6.1%')} {fmt(r['memory_mib'], '8.1f')} {r['compile_s']:9.1f}")
  return "\n".join(lines)


def _scaling_points(rows: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
  """The (supernet_impl, candidates, map side) points the search rows measured."""
  return list(dict.fromkeys((r["supernet_impl"], r["num_candidates"], r["image_size"])
                            for r in rows if r["kind"] == "search"))


def scaling_table(rows: list[dict[str, Any]]) -> str:
  """One line per supernet_impl x candidates x map side: each step's median ms and
  compile s, and the weight step's ratio to the sum of its single-op networks'."""
  search = {(r["supernet_impl"], r["num_candidates"], r["image_size"], r["step"]): r
            for r in rows if r["kind"] == "search"}
  kinds = list(dict.fromkeys(key[3] for key in search))
  head = f"{'supernet_impl':14s} {'ops':>3s} {'size':>4s} " + " ".join(
      f"{kind + ' ms':>15s} {'compile s':>9s}" for kind in kinds)
  head += f" {'single-op sum ms':>16s} {'vs sum':>6s}"
  lines = [head, "-" * len(head)]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for impl, n, size in _scaling_points(rows):
    cells = [search.get((impl, n, size, kind)) for kind in kinds]
    weight = search.get((impl, n, size, "weight"), {})
    lines.append(f"{impl:14s} {n:3d} {size:4d} " + " ".join(
        f"{fmt(c and c['median_ms'], '15.1f')} {fmt(c and c['compile_s'], '9.1f')}"
        for c in cells) + f" {fmt(weight.get('single_op_sum_ms'), '16.1f')} "
        f"{fmt(weight.get('vs_single_ops'), '6.2f')}")
  return "\n".join(lines)


def _split(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def _integers(a: argparse.Namespace, name: str, what: str,
              problems: list[str]) -> bool:
  """Parses the comma list --name into integers in place; False (and a problem
  saying it takes `what`) when it does not parse."""
  try:
    setattr(a, name, [int(x) for x in _split(getattr(a, name))])
  except ValueError:
    problems.append(f"--{name} takes {what}, got {getattr(a, name)!r}")
    return False
  return True


def _positive(a: argparse.Namespace, *names: str) -> list[str]:
  return [f"--{name} must be positive" for name in names if getattr(a, name) < 1]


def _unknown_ops(flag: str, ops: Sequence[str]) -> list[str]:
  unknown = [op for op in ops if op not in OPS]
  return [f"{flag}: unknown ops {unknown}; valid: {', '.join(OPS.names())}"] if unknown else []


def _general_problems(a: argparse.Namespace) -> list[str]:
  """--suite, --devices and --iters, which every suite uses."""
  a.suite = _split(a.suite)
  problems = []
  if not a.suite or set(a.suite) - set(SUITES):
    problems.append(f"--suite takes {', '.join(SUITES)} (comma list), got {a.suite}")
  if a.devices < 0 or a.devices > jax.device_count():
    problems.append(f"--devices {a.devices}: {jax.device_count()} device(s) are "
                    "present (0: all)")
  return problems + _positive(a, "iters")


def _ops_problems(a: argparse.Namespace) -> list[str]:
  """The ops suite's flags; --impls also chooses the networks' local attention."""
  a.impls, a.modules = _split(a.impls), _split(a.modules)
  problems = []
  if not a.impls or set(a.impls) - set(IMPLEMENTATIONS):
    problems.append(f"--impls takes {', '.join(IMPLEMENTATIONS)}, got {a.impls}")
  problems += _unknown_ops("--modules", a.modules)
  if _integers(a, "windows", "odd integers", problems):
    if any(w < 1 or w % 2 == 0 for w in a.windows):
      problems.append(f"--windows takes odd integers, got {a.windows}")
  if a.channels % a.heads or (a.channels // a.heads) % 2:
    problems.append(f"--channels {a.channels} must split into --heads {a.heads} "
                    "heads of even size")
  return problems + _positive(a, "batch", "size")


def _nets_problems(a: argparse.Namespace) -> list[str]:
  """The nets suite's flags up to the supernet's ops (the rest: _search_problems)."""
  a.nets, a.search_modes, a.search_ops = (
      _split(x) for x in (a.nets, a.search_modes, a.search_ops))
  problems = []
  if set(a.nets) - set(NETS):
    problems.append(f"--nets takes {', '.join(NETS)}, got {a.nets}")
  if set(a.search_modes) - set(steps.SEARCH_MODES):
    problems.append(f"--search_modes takes {', '.join(steps.SEARCH_MODES)}, "
                    f"got {a.search_modes}")
  problems += _unknown_ops("--search_ops", a.search_ops)
  if len(set(a.search_ops)) < 2:
    problems.append("--search_ops needs at least 2 distinct ops (a supernet)")
  elif len(set(a.search_ops)) < len(a.search_ops):
    problems.append(f"--search_ops lists an op twice: {a.search_ops}")
  if a.search_width % 16:
    problems.append(f"--search_width {a.search_width} must be a multiple of 16 (its "
                    "ops split width/2 channels into up to 8 heads)")
  return problems + _positive(a, "net_batch", "search_batch", "search_width",
                              "search_layers")


def _search_problems(a: argparse.Namespace) -> list[str]:
  """The supernet rows' own flags; needs --search_ops parsed (_nets_problems)."""
  a.supernet_impls = _split(a.supernet_impls)
  problems = []
  if not a.supernet_impls or set(a.supernet_impls) - set(SUPERNET_IMPLS):
    problems.append(f"--supernet_impls takes {', '.join(SUPERNET_IMPLS)}, "
                    f"got {a.supernet_impls}")
  if _integers(a, "search_sizes", "integers", problems):
    if not a.search_sizes or any(n < 4 or n % 4 for n in a.search_sizes):
      problems.append(f"--search_sizes takes multiples of 4 (two reduce stages), "
                      f"got {a.search_sizes}")
  most = len(a.search_ops)
  if _integers(a, "search_candidates", "integers", problems) and most >= 2:
    a.search_candidates = sorted(set(a.search_candidates)) or [most]
    if not 2 <= min(a.search_candidates) <= max(a.search_candidates) <= most:
      problems.append(
          f"--search_candidates takes counts from 2 to {most} (the first N of "
          "--search_ops; a layer of 1 candidate is the plain single-op network, not a "
          f"mixture: --single_op_ratio times those), got {a.search_candidates}")
  if a.single_op_ratio and ("nets" not in a.suite or "search" not in a.nets):
    problems.append("--single_op_ratio times the supernet's single-op networks: it "
                    "needs nets in --suite and search in --nets")
  return problems


def _input_problems(a: argparse.Namespace) -> list[str]:
  problems = []
  _integers(a, "input_sizes", "integers", problems)
  if a.input_workers < 0:
    problems.append("--input_workers must be non-negative")
  return problems


def _seeds_problems(a: argparse.Namespace) -> list[str]:
  problems = []
  if _integers(a, "seeds", "integers", problems) and (
      not a.seeds or min(a.seeds) < 2):
    problems.append(f"--seeds takes seed counts of 2 or more (each is timed against "
                    f"a single-seed run), got {a.seeds}")
  return problems + _positive(a, "seed_steps")


def _retrieval_problems(a: argparse.Namespace) -> list[str]:
  problems = []
  if _integers(a, "retrieval_blocks", "integers", problems):
    if not a.retrieval_blocks or min(a.retrieval_blocks) < 1:
      problems.append(f"--retrieval_blocks takes positive integers, got {a.retrieval_blocks}")
  if not 1 <= a.retrieval_k < a.retrieval_n:
    problems.append(f"--retrieval_k {a.retrieval_k} must be 1 to --retrieval_n - 1 "
                    f"({a.retrieval_n - 1}): each query ranks the other examples")
  if a.retrieval_gallery_block < 0:
    problems.append("--retrieval_gallery_block must be non-negative (0: the whole gallery)")
  return problems + _positive(a, "retrieval_n", "retrieval_dim")


# In order: _search_problems reads what the general and nets checks parsed.
_CHECKS = (_general_problems, _ops_problems, _nets_problems, _search_problems,
           _input_problems, _seeds_problems, _retrieval_problems)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m fanas_jax.benchmark",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", default="ops,nets",
                 help=", ".join(SUITES) + " (comma list)")
  p.add_argument("--devices", type=int, default=0,
                 help="data-parallel devices for the nets suite (0: all)")
  p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--json", default="", help="also write the results here")
  ops = p.add_argument_group("ops suite")
  ops.add_argument("--batch", type=int, default=64)
  ops.add_argument("--size", type=int, default=28, help="map side of the ops suite")
  ops.add_argument("--channels", type=int, default=256)
  ops.add_argument("--heads", type=int, default=8)
  ops.add_argument("--windows", default="3,5,7")
  ops.add_argument("--impls", default="blocked,scan",
                   help="local attention implementations; the first is used by modules "
                        "and networks")
  ops.add_argument("--modules", default=",".join(ORIGINAL_OPS + ("axial_h8",)),
                   help="registered ops to time as modules ('' for none)")
  _nets_arguments(p)
  inputs = p.add_argument_group("input suite")
  inputs.add_argument("--input_dataset", default="sklearn_digits",
                      help="a registered dataset or folder:/path")
  inputs.add_argument("--input_split", default="train")
  inputs.add_argument("--input_sizes", default="",
                      help="resolutions (default: those of --nets)")
  inputs.add_argument("--input_workers", type=int, default=0, help="grain worker processes")
  seeds = p.add_argument_group(
      "seeds suite (the supernet of the nets suite's search flags, at the first "
      "--search_sizes, --supernet_impls and --search_modes)")
  seeds.add_argument("--seeds", default="4", help="seed counts N to time (comma list)")
  seeds.add_argument("--seed_steps", type=int, default=66,
                     help="steps per run (66: one quickstart search phase, 3 epochs "
                          "of 22 steps)")
  _retrieval_arguments(p)
  return p


def _nets_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("nets suite")
  g.add_argument("--nets", default=",".join(NETS))
  g.add_argument("--net_batch", type=int, default=64, help="train images per device")
  g.add_argument("--search_width", type=int, default=16)
  g.add_argument("--search_batch", type=int, default=32,
                 help="images per device in each half of a search step")
  g.add_argument("--search_layers", type=int, default=LAYERS_PER_STAGE,
                 help="layers per stage of the supernets and single-op networks (the "
                      "paper's 3; search.layers_per_stage)")
  g.add_argument("--search_modes", default=",".join(steps.SEARCH_MODES))
  g.add_argument("--search_ops", default=",".join(ORIGINAL_OPS),
                 help="the supernet's candidates (fewer compile faster on CPU)")
  g.add_argument("--search_candidates", default="",
                 help="candidate counts N (comma list, 2 to the number of --search_ops): "
                      "a supernet of the first N of --search_ops each ('': all)")
  g.add_argument("--single_op_ratio", action="store_true",
                 help="also time each candidate's single-op network, and each supernet "
                      "weight step against the sum of its candidates'")
  g.add_argument("--supernet_impls", default=",".join(SUPERNET_IMPLS),
                 help="mixture-layer implementations to time side by side")
  g.add_argument("--search_sizes", default="32",
                 help="supernet map sides (multiples of 4; comma list)")


def _retrieval_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("retrieval suite")
  g.add_argument("--retrieval_n", type=int, default=60502,
                 help="examples querying each other (SOP test: 60,502)")
  g.add_argument("--retrieval_dim", type=int, default=512)
  g.add_argument("--retrieval_k", type=int, default=1000, help="neighbours per query")
  g.add_argument("--retrieval_blocks", default="256,1024", help="query blocks to time")
  g.add_argument("--retrieval_gallery_block", type=int, default=0,
                 help="gallery rows per step of the running top-k (0: all)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags, each list parsed; every problem in one line before any compute."""
  p = _parser()
  a = p.parse_args(argv)
  problems = [problem for check in _CHECKS for problem in check(a)]
  if problems:
    p.error("; ".join(problems))
  return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  print(f"fanas_jax.benchmark on {jax.device_count()} x {device.device_kind} "
        f"({device.platform}), jax {jax.__version__}, {a.dtype}; nets on "
        f"{parallel.mesh_size(a.devices)} device(s)", flush=True)
  rows = []
  if "ops" in a.suite:
    rows += ops_suite(a)
  if "nets" in a.suite:
    rows += nets_suite(a)
  if "input" in a.suite:
    rows += input_suite(a)
  _finish(rows, DTYPES[a.dtype])
  if rows:
    print(table(rows))
  if len(_scaling_points(rows)) > 1 or any("vs_single_ops" in r for r in rows):
    print(scaling_table(rows))
  if "seeds" in a.suite:
    seed_rows = seeds_suite(a)
    _finish(seed_rows, DTYPES[a.dtype])
    print(seeds_table(seed_rows))
    rows += seed_rows
  if "retrieval" in a.suite:
    retrieval_rows = retrieval_suite(a)
    print(retrieval_table(retrieval_rows))
    rows += retrieval_rows
  result = {"device": device.device_kind, "platform": device.platform,
            "devices": jax.device_count(), "jax": jax.__version__,
            "args": vars(a), "rows": rows}
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {a.json}")
  return result


if __name__ == "__main__":
  host.collect_garbage_less_often()   # as the command line's runs do
  main()
