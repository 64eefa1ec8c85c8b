"""The optimizers of SPEC.md 3 and 5, built with optax.

Weight decay is coupled (added to the gradient after clipping, before momentum or
Adam) as in the PyTorch recipes the paper's settings come from.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def search_weight_optimizer(cfg: Any, total_steps: int,
                            lr_scale: float = 1.0) -> optax.GradientTransformation:
  """SGD + momentum, cosine annealing to lr_min, weight decay, clipping.

  `lr_scale` multiplies both ends of the schedule (the linear scaling rule).
  """
  schedule = optax.cosine_decay_schedule(lr_scale * cfg.w_lr, max(total_steps, 1),
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


def gumbel_temperature(cfg: Any, total_steps: int) -> optax.Schedule:
  """GDAS's linear decay: gumbel_tau_max at the first step, gumbel_tau_min at the last.

  Written as (1 - f) * max + f * min, so both endpoints are exact.
  """
  tau_max, tau_min, last = cfg.gumbel_tau_max, cfg.gumbel_tau_min, max(total_steps - 1, 1)

  def schedule(step):
    f = jnp.clip(step / last, 0.0, 1.0)
    return (1.0 - f) * tau_max + f * tau_min

  return schedule


def train_schedule(cfg: Any, steps_per_epoch: int, lr_scale: float = 1.0) -> optax.Schedule:
  """Linear warm-up from warmup_from * lr, then cosine to lr_min (all x lr_scale)."""
  total = cfg.epochs * steps_per_epoch
  warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
  lr = lr_scale * cfg.lr
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.warmup_from * lr, peak_value=lr,
      warmup_steps=warmup, decay_steps=max(total, warmup + 1),
      end_value=lr_scale * cfg.lr_min)


def train_optimizer(cfg: Any, steps_per_epoch: int,
                    lr_scale: float = 1.0) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(train_schedule(cfg, steps_per_epoch, lr_scale), momentum=cfg.momentum))
