"""What every stage is built from, made in one place and passed in.

The pipeline makes one `Builder` per run. A stage asks it for its data (splits,
halves, training iterators, evaluation batches), the mesh, its RNG key, its
optimizers, its replicated state, its metric writer and its `StageRun`, so every
input pipeline call and every optimizer of the trainer is made here. A test that
needs a fault (a poisoned batch, a writer that dies) passes a subclass.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Iterator, Sequence

import jax
import optax

from fanas_jax import optim, parallel
from fanas_jax.data import pipeline
from fanas_jax.data.datasets import DatasetSpec, get_dataset, stage_dataset
from fanas_jax.logging_utils import MetricWriter
from fanas_jax.loop import Preemption, StageRun


class Builder:
  """Data, mesh, keys, optimizers, state and writers for the stages of one run."""

  def __init__(self, config: Any, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh = parallel.make_mesh(config.num_devices)
    self.preemption = Preemption()
    self._specs: dict[str, DatasetSpec] = {}

  # Data: each stage reads its own dataset (its `dataset` key, '' = config.dataset).

  def spec(self, stage: str) -> DatasetSpec:
    """The DatasetSpec of the dataset `stage` reads (scanned once per run)."""
    name = stage_dataset(self.config, stage)
    if name not in self._specs:
      self._specs[name] = get_dataset(name)
    return self._specs[name]

  def load_split(self, stage: str, split: str, classes: Sequence[int] | None = None,
                 relabel: bool = False) -> Any:
    return pipeline.load_split(stage_dataset(self.config, stage), split,
                               self.config.data_dir or None, classes=classes,
                               relabel=relabel, bad_examples=self.config.bad_examples)

  def split_halves(self, ds: Any, seed: int | None = None) -> tuple[Any, Any]:
    """(weight half, architecture half) of a search split, drawn by `seed` (None:
    config.seed; a search of several seeds draws each seed's own)."""
    return pipeline.split_halves(ds, self.config.seed if seed is None else seed)

  def steps_per_epoch(self, num_examples: int, batch_size: int) -> int:
    return pipeline.steps_per_epoch(num_examples, batch_size)

  def train_iterator(self, stage: str, ds: Any, seed: int) -> Any:
    """This process's part of the stage's endless augmented global batches."""
    cfg = self.config[stage]
    return pipeline.train_iterator(
        ds, batch_size=parallel.process_batch_size(cfg.batch_size),
        preprocess=pipeline.train_preprocess(cfg, self.config.image_size, self.spec(stage)),
        seed=seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_workers=self.config.data_workers)

  def eval_batches(self, stage: str, ds: Any) -> Iterator[dict[str, Any]]:
    """This process's padded evaluation batches of `ds` (eval_batch_size global),
    preprocessed by the stage's evaluation recipe."""
    preprocess = pipeline.eval_preprocess(self.config[stage], self.config.image_size,
                                          self.spec(stage))
    return pipeline.eval_batches(
        ds, batch_size=parallel.process_batch_size(self.config.eval_batch_size),
        preprocess=preprocess, shard_index=jax.process_index(),
        shard_count=jax.process_count())

  # Keys and optimizers.

  def stage_key(self, stage: str, seed: int | None = None) -> jax.Array:
    """The run's seed (or `seed`) folded with the stage's name: each stage draws its
    own keys."""
    seed = self.config.seed if seed is None else seed
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode()))

  def lr_scale(self, cfg: Any) -> float:
    return parallel.lr_scale(cfg.batch_size, self.config.lr_reference_batch)

  def search_optimizers(self, cfg: Any, steps_per_epoch: int
                        ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(weight optimizer, alpha optimizer) of a search phase."""
    return (optim.search_weight_optimizer(cfg, steps_per_epoch, self.lr_scale(cfg)),
            optim.alpha_optimizer(cfg, self.alpha_lr_scale(cfg, steps_per_epoch)))

  def alpha_lr_scale(self, cfg: Any, steps_per_epoch: int) -> float:
    return optim.alpha_lr_scale(cfg.alpha_reference_steps,
                                optim.alpha_steps(cfg, steps_per_epoch),
                                cfg.alpha_lr_scale_max)

  def gumbel_temperature(self, cfg: Any, total_steps: int) -> optax.Schedule | None:
    return optim.gumbel_temperature(cfg, total_steps) if cfg.mode == "gumbel" else None

  def train_optimizer(self, cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    return optim.train_optimizer(cfg, steps_per_epoch, self.lr_scale(cfg))

  # State, writer, loop.

  def replicate(self, tree: Any) -> Any:
    return parallel.replicate(tree, self.mesh)

  def shard(self, batch: dict[str, Any], seed_axis: bool = False) -> dict[str, jax.Array]:
    return parallel.shard_batch(batch, self.mesh, seed_axis)

  def writer(self, stage: str, purge_step: int | None = None) -> MetricWriter:
    return MetricWriter(self.workdir, stage, purge_step=purge_step)

  def stage_run(self, stage: str, iterators: Sequence[Any], steps_per_epoch: int,
                epochs: int, batch_size: int) -> StageRun:
    return StageRun(self.config, stage, os.path.join(self.workdir, stage), iterators,
                    steps_per_epoch, epochs, batch_size,
                    lambda purge_step: self.writer(stage, purge_step), self.preemption)
