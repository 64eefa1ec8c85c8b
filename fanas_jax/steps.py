"""The jittable steps and their states, shared by search, training and benchmarks.

Pure functions of (model, objective, optimizers): no data pipeline, logging or
config here, so they run anywhere JAX, Flax and optax do.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jax_core
from jax.interpreters import partial_eval as pe

from fanas_jax.genotype import SearchSpace
from fanas_jax.model import Model, gumbel_path
from fanas_jax.objectives import Objective


@flax.struct.dataclass
class SearchState:
  step: jax.Array
  params: Any
  batch_stats: Any
  alphas: Any
  w_opt_state: Any
  a_opt_state: Any


def init_alphas(space: SearchSpace, rng: jax.Array, std: float) -> dict[str, jax.Array]:
  """1e-3 * N(0, 1) per stage, shape [layers, n_ops] (SPEC.md 2)."""
  return {name: std * jax.random.normal(jax.random.fold_in(rng, i), shape)
          for i, (name, shape) in enumerate(sorted(space.alpha_shapes().items()))}


def init_search_state(model: Model, alphas: Any, w_tx: optax.GradientTransformation,
                      a_tx: optax.GradientTransformation, rng: jax.Array,
                      input_shape: tuple[int, ...]) -> SearchState:
  variables = init_variables(model, rng, input_shape, alphas)
  params = variables["params"]
  return SearchState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"], alphas=alphas,
                     w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(alphas))


def init_variables(model: Model, rng: jax.Array, input_shape: tuple[int, ...],
                   alphas: Any = None) -> Any:
  """Initial variables without running the network: bitwise flax's `lazy_init`.

  The network's init is traced on abstract inputs, dead-code elimination keeps what
  the variables depend on (their initializers and rng splits), and that runs op by
  op. A jitted init spends minutes of XLA compile on hundreds of random
  initializers; `lazy_init` also runs, op by op, whatever the forward pass computes
  from parameters alone (relative-position logits, masks, the stem's embedding
  mixture), each new shape a small compile: 710 programs for the quickstart's
  supernet, against 70 here.
  """
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  args = (rng, x) if alphas is None else (
      rng, x, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), alphas))
  closed, shapes = jax.make_jaxpr(model.init, return_shape=True)(*args)
  jaxpr, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  inputs = [a for a, u in zip(jax.tree.leaves(args), used) if u]
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in inputs):
    raise ValueError("A variable's initial value depends on the network's input or "
                     "alphas; initialise it from the rng alone.")
  leaves = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, closed.consts))(*inputs)
  return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def make_loss_fn(model: Model, objective: Objective,
                 sample_path: bool = False) -> Callable:
  """(params, alphas, batch_stats, batch, key[, tau]) -> (loss, (metrics, batch_stats)).

  sample_path: each layer runs one op sampled by `gumbel_path` at temperature tau
  instead of the softmax mixture; alphas still get the straight-through gradient.
  """

  def loss_fn(params, alphas, batch_stats, batch, key, tau=None):
    arch = {}
    if sample_path:
      k_path, key = jax.random.split(key)
      arch["path"] = gumbel_path(alphas, k_path, tau)
    k_inputs, k_dropout = jax.random.split(key)
    inputs, targets = objective.make_inputs(batch, k_inputs)
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                               alphas, train=True, mutable=["batch_stats"],
                               rngs={"dropout": k_dropout}, **arch)
    loss, metrics = objective.loss(out, targets)
    return loss, (metrics, mutated["batch_stats"])

  return loss_fn


SEARCH_MODES = ("first_order", "second_order", "gumbel")


def make_search_step(model: Model, objective: Objective, w_tx: optax.GradientTransformation,
                     a_tx: optax.GradientTransformation, mode: str = "first_order", *,
                     warmup_steps: int = 0, tau_schedule: optax.Schedule | None = None
                     ) -> Callable:
  """One bilevel step: alpha on the architecture batch, then weights on the weight batch.

  `mode` picks alpha's gradient (first_order, second_order, gumbel: see _alpha_grad).
  Every pass runs the network in training mode (batch statistics); only the real
  weight pass updates the running BN statistics. Each optimizer only ever sees its
  own gradients. For the first `warmup_steps` steps the alpha pass is skipped (one
  lax.cond on the step counter, so one compiled program): alpha and its optimizer
  state stay as they are while the weights train."""
  _check_search_mode(mode, tau_schedule)
  loss_fn = make_loss_fn(model, objective, sample_path=mode == "gumbel")
  weight_grad = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
  alpha_grad = _alpha_grad(mode, loss_fn, weight_grad, w_tx)

  def alpha_pass(state, w_batch, a_batch, k_arch, k_weight, tau):
    """-> (alphas, alpha optimizer state, (loss, metrics), gradients) after one step."""
    (a_loss, (a_metrics, _)), a_grads = alpha_grad(state, w_batch, a_batch, k_arch,
                                                   k_weight, tau)
    a_updates, a_opt_state = a_tx.update(a_grads, state.a_opt_state, state.alphas)
    alphas = optax.apply_updates(state.alphas, a_updates)
    return alphas, a_opt_state, (a_loss, a_metrics), a_grads

  def warmup_pass(state, *args):
    """No alpha step: alpha and its optimizer state pass through; the rest is 0."""
    _, _, *outputs = jax.eval_shape(alpha_pass, state, *args)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outputs)
    return state.alphas, state.a_opt_state, *zeros

  def weight_pass(state, alphas, w_batch, k_weight, tau):
    """-> (params, weight optimizer state, batch stats, (loss, metrics), gradients)."""
    (w_loss, (w_metrics, batch_stats)), w_grads = weight_grad(
        state.params, alphas, state.batch_stats, w_batch, k_weight, tau)
    w_updates, w_opt_state = w_tx.update(w_grads, state.w_opt_state, state.params)
    params = optax.apply_updates(state.params, w_updates)
    return params, w_opt_state, batch_stats, (w_loss, w_metrics), w_grads

  def step(state: SearchState, w_batch, a_batch, key):
    k_arch, k_weight = jax.random.split(jax.random.fold_in(key, state.step))
    tau = None if tau_schedule is None else jnp.asarray(tau_schedule(state.step),
                                                        jnp.float32)
    args = (state, w_batch, a_batch, k_arch, k_weight, tau)
    if warmup_steps:
      update_alpha = state.step >= warmup_steps
      alphas, a_opt_state, a_out, a_grads = jax.lax.cond(
          update_alpha, alpha_pass, warmup_pass, *args)
    else:
      update_alpha = jnp.ones((), bool)
      alphas, a_opt_state, a_out, a_grads = alpha_pass(*args)
    params, w_opt_state, batch_stats, w_out, w_grads = weight_pass(
        state, alphas, w_batch, k_weight, tau)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              alphas=alphas, w_opt_state=w_opt_state,
                              a_opt_state=a_opt_state)
    return new_state, _search_metrics(w_out, a_out, w_grads, a_grads, update_alpha, tau)

  return step


def _search_metrics(w_out, a_out, w_grads, a_grads, update_alpha, tau) -> dict:
  """One search step's scalars: both passes' losses, metrics and gradient norms."""
  (w_loss, w_metrics), (a_loss, a_metrics) = w_out, a_out
  return {"w_loss": w_loss, "a_loss": a_loss,
          "w_grad_norm": optax.tree.norm(w_grads),
          "a_grad_norm": optax.tree.norm(a_grads),
          "alpha_updated": update_alpha.astype(jnp.float32),
          **{f"w_{k}": v for k, v in w_metrics.items()},
          **{f"a_{k}": v for k, v in a_metrics.items()},
          **({} if tau is None else {"tau": tau})}


def _check_search_mode(mode: str, tau_schedule: optax.Schedule | None) -> None:
  if mode not in SEARCH_MODES:
    raise ValueError(f"Unknown search mode {mode!r}; valid choices: "
                     f"{', '.join(SEARCH_MODES)}.")
  if (mode == "gumbel") != (tau_schedule is not None):
    raise ValueError("tau_schedule is the gumbel mode's temperature; give it in that "
                     "mode only.")


def _alpha_grad(mode: str, loss_fn: Callable, weight_grad: Callable,
                w_tx: optax.GradientTransformation) -> Callable:
  """(state, w_batch, a_batch, k_arch, k_weight, tau) -> ((L_arch, aux), d L_arch /
  d alpha).

  mode 'first_order': grad_alpha L_arch(w, alpha) (DARTS first order).
  mode 'second_order': grad_alpha L_arch(w'(alpha), alpha) by autodiff through one
    virtual step w' = w + w_tx.update(grad_w L_weight(w, alpha)), i.e. the weight
    optimizer's next step from its current state, on the weight batch with the weight
    pass's keys. So xi is the weight schedule's current learning rate and, as in
    DARTS, momentum and weight decay enter w' (both independent of alpha); unlike
    DARTS the virtual step also clips, as the real one does. With plain SGD this is
    w' = w - xi * grad_w L_weight(w, alpha). The alpha update thus legitimately
    depends on the weight batch.
  mode 'gumbel': both passes run one op per layer sampled from
    gumbel_softmax(alpha, tau) with independent noise (GDAS), tau = tau_schedule(step).
  """
  if mode != "second_order":
    arch_grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    return lambda state, w_batch, a_batch, k_arch, k_weight, tau: arch_grad(
        state.params, state.alphas, state.batch_stats, a_batch, k_arch, tau)

  def unrolled_loss(alphas, state, w_batch, a_batch, k_arch, k_weight):
    """L_arch at the weights one virtual weight step ahead, as a function of alpha."""
    _, grads = weight_grad(state.params, alphas, state.batch_stats, w_batch, k_weight)
    updates, _ = w_tx.update(grads, state.w_opt_state, state.params)
    virtual = optax.apply_updates(state.params, updates)
    return loss_fn(virtual, alphas, state.batch_stats, a_batch, k_arch)

  unrolled_grad = jax.value_and_grad(unrolled_loss, has_aux=True)
  return lambda state, w_batch, a_batch, k_arch, k_weight, tau: unrolled_grad(
      state.alphas, state, w_batch, a_batch, k_arch, k_weight)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def seeds_step(step: Any, num_seeds: int) -> Any:
  """`step` for `num_seeds` searches at once: vmapped over a leading seed axis of the
  state, both batches and the keys, its metrics named `seedS/NAME` (scalars, as the
  loop sums and checks them). One seed is the step itself."""
  if num_seeds == 1:
    return step

  def run(state, w_batch, a_batch, keys):
    state, metrics = jax.vmap(step)(state, w_batch, a_batch, keys)
    return state, {f"seed{s}/{k}": v[s] for s in range(num_seeds)
                   for k, v in metrics.items()}

  return run


def make_train_step(model: Model, objective: Objective,
                    tx: optax.GradientTransformation, alphas: Any = None) -> Callable:
  """One weight step. `alphas` fixes a supernet's mixture (None: a derived net)."""
  loss_fn = make_loss_fn(model, objective)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    (loss, (metrics, batch_stats)), grads = grad_fn(
        state.params, alphas, state.batch_stats, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return step
