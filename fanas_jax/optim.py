"""The optimizers of SPEC.md 3 and 5, built with optax.

Weight decay is coupled (added to the gradient after clipping, before momentum or
Adam) as in the PyTorch recipes the paper's settings come from.
"""
from __future__ import annotations

from typing import Any

import optax


def search_weight_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """SGD + momentum, cosine annealing to lr_min, weight decay, clipping."""
  schedule = optax.cosine_decay_schedule(cfg.w_lr, max(total_steps, 1),
                                         alpha=cfg.w_lr_min / cfg.w_lr)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.w_weight_decay),
      optax.sgd(schedule, momentum=cfg.w_momentum))


def alpha_optimizer(cfg: Any) -> optax.GradientTransformation:
  """Adam with betas (0.5, 0.999) and coupled weight decay on the architecture."""
  return optax.chain(
      optax.add_decayed_weights(cfg.a_weight_decay),
      optax.adam(cfg.a_lr, b1=cfg.a_b1, b2=cfg.a_b2))


def train_schedule(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from warmup_from * lr, then cosine to lr_min."""
  total = cfg.epochs * steps_per_epoch
  warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.warmup_from * cfg.lr, peak_value=cfg.lr,
      warmup_steps=warmup, decay_steps=max(total, warmup + 1),
      end_value=cfg.lr_min)


def train_optimizer(cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(train_schedule(cfg, steps_per_epoch), momentum=cfg.momentum))
