"""The optimizers of SPEC.md 3 and 5, built with optax.

Weight decay is coupled (added to the gradient after clipping, before momentum or
Adam) as in the PyTorch recipes the paper's settings come from.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def epoch_cosine(lr: float, alpha: float, epochs: int,
                 steps_per_epoch: int) -> optax.Schedule:
  """PyTorch's CosineAnnealingLR(T_max=epochs, eta_min=alpha * lr) stepped per epoch.

  Every step of epoch e (= step // steps_per_epoch, e = 0..epochs-1) uses
  lr * (alpha + (1 - alpha) * (1 + cos(pi * e / epochs)) / 2).
  """
  cosine = optax.cosine_decay_schedule(lr, max(epochs, 1), alpha=alpha)

  def schedule(step):
    return cosine(jnp.minimum(step // steps_per_epoch, max(epochs - 1, 0)))

  return schedule


def search_weight_schedule(cfg: Any, steps_per_epoch: int,
                           lr_scale: float = 1.0) -> optax.Schedule:
  """w_lr cosine-annealed to w_lr_min over cfg.epochs, stepped once per epoch."""
  return epoch_cosine(lr_scale * cfg.w_lr, cfg.w_lr_min / cfg.w_lr, cfg.epochs,
                      steps_per_epoch)


def search_weight_optimizer(cfg: Any, steps_per_epoch: int,
                            lr_scale: float = 1.0) -> optax.GradientTransformation:
  """SGD + momentum on `search_weight_schedule`, weight decay, clipping.

  `lr_scale` multiplies the whole schedule (the linear scaling rule).
  """
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.w_weight_decay),
      optax.sgd(search_weight_schedule(cfg, steps_per_epoch, lr_scale),
                momentum=cfg.w_momentum))


def alpha_steps(cfg: Any, steps_per_epoch: int) -> int:
  """The phase's alpha updates: every step after the weight-only warm-up epochs."""
  return (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch


def alpha_lr_scale(reference_steps: int, steps: int, max_scale: float) -> float:
  """reference_steps / steps, at most max_scale (reference_steps 0: 1, no scaling).

  Adam's step is about lr whatever the gradient's scale, so alpha can move at most
  about lr x steps in a phase. Scaling lr by reference_steps / steps gives a short
  search the total movement of one with reference_steps alpha updates.
  """
  if not reference_steps:
    return 1.0
  return min(reference_steps / max(steps, 1), max_scale)


def alpha_b2(b1: float, b2: float, time_scale: float) -> float:
  """Adam's b2 for a run `time_scale` times shorter than the one b2 was set for.

  The second moment averages over about 1/(1 - b2) steps: 1,000 of the paper's
  ~40,000. In a 66-step run that is all of it, so the moment keeps the large
  gradients of the first steps and shrinks every later step. Scaling 1 - b2 by
  time_scale keeps the average over the same fraction of the run, but never over
  fewer steps than the first moment's 1/(1 - b1).
  """
  if time_scale == 1:
    return b2
  return 1.0 - min((1.0 - b2) * time_scale, 1.0 - b1)


def alpha_optimizer(cfg: Any, lr_scale: float = 1.0) -> optax.GradientTransformation:
  """Adam with betas (0.5, 0.999) and coupled weight decay on the architecture, for
  a run lr_scale times shorter than the recipe's: lr_scale x a_lr, and b2 by
  `alpha_b2` (lr_scale 1: the recipe as it is)."""
  return optax.chain(
      optax.add_decayed_weights(cfg.a_weight_decay),
      optax.adam(lr_scale * cfg.a_lr, b1=cfg.a_b1,
                 b2=alpha_b2(cfg.a_b1, cfg.a_b2, lr_scale)))


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
  """Per-epoch warm-up then cosine, all x lr_scale (SPEC.md 5).

  Epoch e < W = warmup_epochs: lr * (f + (1 - f) * e / W), f = warmup_from.
  Epoch e >= W: PyTorch's CosineAnnealingLR over the remaining E - W epochs
  from lr down to the floor lr_min_factor * lr.
  """
  lr = lr_scale * cfg.lr
  warmup, epochs = cfg.warmup_epochs, cfg.epochs
  cosine = epoch_cosine(lr, cfg.lr_min_factor, max(epochs - warmup, 1), 1)

  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, max(epochs - 1, 0))
    ramp = lr * (cfg.warmup_from + (1.0 - cfg.warmup_from) * epoch / max(warmup, 1))
    return jnp.where(epoch < warmup, ramp, cosine(epoch - warmup))

  return schedule


def train_optimizer(cfg: Any, steps_per_epoch: int,
                    lr_scale: float = 1.0) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(train_schedule(cfg, steps_per_epoch, lr_scale), momentum=cfg.momentum))


# Parameter groups of a fine-tuning run (`finetune_optimizer`'s labels).
HEAD, BACKBONE, FROZEN = "head", "backbone", "frozen"


def finetune_optimizer(cfg: Any, steps_per_epoch: int, labels: Any,
                       lr_scale: float = 1.0) -> optax.GradientTransformation:
  """The training recipe with parameter groups, as PyTorch param groups give it.

  labels: a pytree like the params of HEAD, BACKBONE or FROZEN leaves. FROZEN
  parameters get no gradient, no weight decay and so no update (bitwise unchanged),
  and take no part in the gradient clipping norm; HEAD parameters step with
  cfg.head_lr_mult x the learning rate (SGD with momentum is linear in its input, so
  scaling the head's updates is scaling its learning rate).
  """
  is_ = lambda group: jax.tree.map(lambda label: label == group, labels)
  trainable = jax.tree.map(lambda label: label != FROZEN, labels)
  return optax.chain(
      optax.masked(optax.set_to_zero(), is_(FROZEN)),
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.weight_decay, mask=trainable),
      optax.sgd(train_schedule(cfg, steps_per_epoch, lr_scale), momentum=cfg.momentum),
      optax.masked(optax.scale(cfg.head_lr_mult), is_(HEAD)))
