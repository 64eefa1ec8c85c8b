"""Learning-rate schedules against their closed forms, epoch by epoch."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fanas_jax.configs import default
from fanas_jax import optim

STEPS = 7  # steps per epoch


def lr_at(schedule, step: int) -> float:
  return float(schedule(jnp.asarray(step)))


def torch_cosine(lr: float, lr_min: float, epoch: int, epochs: int) -> float:
  """PyTorch CosineAnnealingLR's closed form at epoch `epoch` of T = epochs."""
  return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


@pytest.mark.parametrize("w_lr_min", [0.0, 0.001])
def test_search_weights_cosine_is_stepped_once_per_epoch(w_lr_min):
  cfg = default.search_phase(epochs=20, w_lr=0.025, w_lr_min=w_lr_min)
  schedule = optim.search_weight_schedule(cfg, STEPS)
  for epoch in (0, 1, 7, 10, 19):
    want = torch_cosine(0.025, w_lr_min, epoch, 20)
    for step in (epoch * STEPS, epoch * STEPS + 3, epoch * STEPS + STEPS - 1):
      # float32: 1 + cos(x) near x = pi loses digits; 1e-9 is 4e-8 of w_lr.
      assert lr_at(schedule, step) == pytest.approx(want, rel=1e-6, abs=1e-9), (epoch, step)
  assert lr_at(schedule, 0) == pytest.approx(0.025)
  assert lr_at(schedule, 10 * STEPS) == pytest.approx(w_lr_min + (0.025 - w_lr_min) / 2)
  # The last epoch stays above the minimum (T = epochs, e = 0..T-1).
  assert lr_at(schedule, 19 * STEPS) > w_lr_min


def test_paper_search_weights_anneal_to_zero():
  cfg = default.get_config().search_phase2
  assert cfg.w_lr_min == 0.0
  schedule = optim.search_weight_schedule(cfg, STEPS)
  assert lr_at(schedule, (cfg.epochs - 1) * STEPS) == pytest.approx(
      0.025 * (1 + math.cos(math.pi * 49 / 50)) / 2, rel=1e-6, abs=1e-9)


def test_search_weight_optimizer_applies_the_schedule_and_lr_scale():
  cfg = default.search_phase(epochs=4, w_lr=0.1, w_lr_min=0.0, w_momentum=0.0,
                             w_weight_decay=0.0, grad_clip=1e9)
  tx = optim.search_weight_optimizer(cfg, 2, lr_scale=3.0)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  for step in range(8):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    want = 3.0 * torch_cosine(0.1, 0.0, step // 2, 4)
    assert float(updates["w"]) == pytest.approx(-want, rel=1e-6), step


def _train_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(default.get_config().train))
  cfg.update(overrides)
  return cfg


def test_cifar_schedule_warms_up_then_cosines_to_a_multiple_of_lr():
  cfg = _train_cfg()  # 500 epochs, 20 warm-up from 0.3, floor 1e-4 x lr
  assert (cfg.epochs, cfg.warmup_epochs, cfg.warmup_from, cfg.lr_min_factor) == (
      500, 20, 0.3, 1e-4)
  schedule = optim.train_schedule(cfg, STEPS)
  lr = 0.04
  for epoch in (0, 1, 10, 19):
    want = lr * (0.3 + 0.7 * epoch / 20)
    assert lr_at(schedule, epoch * STEPS) == pytest.approx(want, rel=1e-6)
    assert lr_at(schedule, epoch * STEPS + STEPS - 1) == pytest.approx(want, rel=1e-6)
  for epoch in (20, 21, 260, 499):
    want = torch_cosine(lr, 1e-4 * lr, epoch - 20, 480)
    assert lr_at(schedule, epoch * STEPS + 2) == pytest.approx(want, rel=1e-5,
                                                               abs=1e-9), epoch
  # The floor is relative: doubling lr doubles every epoch's rate, the floor included.
  doubled = optim.train_schedule(_train_cfg(lr=0.08), STEPS)
  for step in (0, 150 * STEPS, 499 * STEPS):
    assert lr_at(doubled, step) == pytest.approx(2 * lr_at(schedule, step), rel=1e-6)


def test_imagenet_schedule_is_cosine_to_zero_without_warmup():
  cfg = _train_cfg(epochs=200, warmup_epochs=0, lr_min_factor=0.0)
  schedule = optim.train_schedule(cfg, STEPS)
  for epoch in (0, 1, 100, 199):
    assert lr_at(schedule, epoch * STEPS + 5) == pytest.approx(
        torch_cosine(0.04, 0.0, epoch, 200), rel=1e-5, abs=1e-9), epoch


def test_lr_scale_multiplies_the_whole_train_schedule():
  cfg = _train_cfg(epochs=10, warmup_epochs=3)
  base, scaled = optim.train_schedule(cfg, STEPS), optim.train_schedule(cfg, STEPS, 8.0)
  for step in range(0, 10 * STEPS, 5):
    assert lr_at(scaled, step) == pytest.approx(8 * lr_at(base, step), rel=1e-6)


def test_train_optimizer_steps_with_the_schedule():
  cfg = _train_cfg(epochs=3, warmup_epochs=1, momentum=0.0, weight_decay=0.0,
                   grad_clip=1e9)
  tx = optim.train_optimizer(cfg, 2)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  got = []
  for _ in range(6):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    got.append(-float(updates["w"]))
  want = [0.3 * 0.04] * 2 + [torch_cosine(0.04, 4e-6, e, 2) for e in (0, 0, 1, 1)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert isinstance(tx, optax.GradientTransformation)


def test_alpha_lr_scale_is_reference_over_this_phases_alpha_steps_with_a_cap():
  assert optim.alpha_lr_scale(0, 66, 1000.0) == 1.0     # the paper's configs: a_lr as given
  assert optim.alpha_lr_scale(39_580, 66, 1000.0) == pytest.approx(39_580 / 66)
  assert optim.alpha_lr_scale(39_580, 22, 1000.0) == 1000.0   # capped
  assert optim.alpha_lr_scale(100, 400, 1000.0) == 0.25       # longer than the reference
  cfg = default.search_phase(epochs=5, warmup_epochs=2)
  assert optim.alpha_steps(cfg, STEPS) == 3 * STEPS     # warm-up epochs do not step alpha


def test_paper_phases_keep_the_authors_alpha_lr():
  from fanas_jax.builders import Builder
  config = default.get_config()
  build = Builder(config, "/nonexistent")
  for phase in (config.search_phase1, config.search_phase2):
    assert phase.alpha_reference_steps == 0
    assert build.alpha_lr_scale(phase, 1) == 1.0


def test_coupled_alpha_decay_is_normalised_like_the_gradient():
  """Why the authors' decay stops a short search (README): Adam sees g + wd * alpha,
  so a decay term as large as the gradient cancels it whatever the learning rate."""
  cfg = default.search_phase(epochs=1)
  alpha = jnp.asarray([2.0, -1.0])
  for lr_scale in (1.0, 600.0):
    tx = optim.alpha_optimizer(cfg, lr_scale)
    state = tx.init(alpha)
    # A gradient exactly -wd * alpha: the coupled term cancels it, alpha stays.
    updates, _ = tx.update(-cfg.a_weight_decay * alpha, state, alpha)
    np.testing.assert_allclose(updates, 0.0, atol=1e-12)
    # With no gradient the decay alone, tiny as it is (1e-3 x |alpha|), moves alpha back
    # towards 0 by a full step: Adam's bias-corrected first step is lr * g / |g|.
    updates, _ = tx.update(jnp.zeros(2), state, alpha)
    np.testing.assert_allclose(updates, -lr_scale * cfg.a_lr * np.sign(alpha), rtol=1e-4)


def test_the_paper_keeps_the_authors_alpha_decay_and_the_quickstart_drops_it():
  from fanas_jax.configs import quickstart
  config = default.get_config()
  assert config.search_phase1.a_weight_decay == config.search_phase2.a_weight_decay == 1e-3
  for config in (quickstart.get_config(), quickstart.get_config("tiny")):
    # README: why the authors' decay stops a short search.
    assert config.search_phase1.a_weight_decay == config.search_phase2.a_weight_decay == 0


def test_alpha_b2_keeps_the_second_moment_horizon_a_fraction_of_the_run():
  assert optim.alpha_b2(0.5, 0.999, 1.0) == 0.999        # the recipe, bit for bit
  assert optim.alpha_b2(0.5, 0.999, 10.0) == pytest.approx(0.99)   # 1,000 -> 100 steps
  assert optim.alpha_b2(0.5, 0.999, 0.5) == pytest.approx(0.9995)  # a longer run
  assert optim.alpha_b2(0.5, 0.999, 600.0) == 0.5        # never shorter than b1's


def _numpy_adam(grads, lr, b1, b2, eps=1e-8):
  """Adam's updates for a sequence of gradients, written out (Kingma & Ba, Alg. 1)."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, 1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return out


@pytest.mark.parametrize("scale", [1.0, 600.0])
def test_alpha_optimizer_steps_with_the_scaled_lr(scale):
  from fanas_jax.builders import Builder
  from fanas_jax.configs import quickstart
  config = quickstart.get_config()
  cfg = config.search_phase1
  cfg.a_weight_decay = 0.0
  cfg.alpha_reference_steps = int(scale * optim.alpha_steps(cfg, STEPS))
  _, a_tx = Builder(config, "/nonexistent").search_optimizers(cfg, STEPS)
  alphas = {"stage1": jnp.zeros((3, 7))}
  grads = {"stage1": jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)}
  updates, _ = a_tx.update(grads, a_tx.init(alphas), alphas)
  # Adam's first step: m_hat = g, v_hat = g^2, so the update is -lr * sign(g).
  want = -scale * cfg.a_lr * np.sign(grads["stage1"])
  np.testing.assert_allclose(updates["stage1"], want, rtol=1e-5)
  # Later steps follow Adam with the scaled lr and b2.
  rng = np.random.default_rng(1)
  seq = [np.asarray(g, np.float64) for g in
         [grads["stage1"]] + [10.0 ** -k * rng.normal(size=(3, 7)) for k in (1, 2, 2)]]
  b2 = 0.999 if scale == 1 else 0.5
  want = _numpy_adam(seq, scale * cfg.a_lr, cfg.a_b1, b2)
  opt_state = a_tx.init(alphas)
  for g, w in zip(seq, want):
    updates, opt_state = a_tx.update({"stage1": jnp.asarray(g, jnp.float32)}, opt_state,
                                     alphas)
    np.testing.assert_allclose(updates["stage1"], w, rtol=2e-4)
