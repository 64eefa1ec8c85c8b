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

from fanas_jax.genotype import SearchSpace
from fanas_jax.model import Model
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
  """Initial variables without running the network.

  `lazy_init` traces the network on abstract inputs and only computes the
  initializers, op by op. For a supernet this takes seconds, where a jitted init
  spends minutes of XLA compile on its hundreds of random initializers.
  """
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  if alphas is None:
    return model.lazy_init(rng, x)
  alphas = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), alphas)
  return model.lazy_init(rng, x, alphas)


def make_loss_fn(model: Model, objective: Objective) -> Callable:
  """(params, alphas, batch_stats, batch, key) -> (loss, (metrics, new batch_stats))."""

  def loss_fn(params, alphas, batch_stats, batch, key):
    k_inputs, k_dropout = jax.random.split(key)
    inputs, targets = objective.make_inputs(batch, k_inputs)
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                               alphas, train=True, mutable=["batch_stats"],
                               rngs={"dropout": k_dropout})
    loss, metrics = objective.loss(out, targets)
    return loss, (metrics, mutated["batch_stats"])

  return loss_fn


def make_search_step(model: Model, objective: Objective, w_tx: optax.GradientTransformation,
                     a_tx: optax.GradientTransformation) -> Callable:
  """One first-order bilevel step: alpha on the architecture batch, then weights.

  The alpha pass runs the network in training mode (batch statistics) but leaves the
  running batch-norm statistics untouched; only the weight pass updates them. Each
  optimizer only ever sees its own gradients.
  """
  loss_fn = make_loss_fn(model, objective)
  arch_grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
  weight_grad = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)

  def step(state: SearchState, w_batch, a_batch, key):
    k_arch, k_weight = jax.random.split(jax.random.fold_in(key, state.step))
    (a_loss, (a_metrics, _)), a_grads = arch_grad(
        state.params, state.alphas, state.batch_stats, a_batch, k_arch)
    a_updates, a_opt_state = a_tx.update(a_grads, state.a_opt_state, state.alphas)
    alphas = optax.apply_updates(state.alphas, a_updates)
    (w_loss, (w_metrics, batch_stats)), w_grads = weight_grad(
        state.params, alphas, state.batch_stats, w_batch, k_weight)
    w_updates, w_opt_state = w_tx.update(w_grads, state.w_opt_state, state.params)
    params = optax.apply_updates(state.params, w_updates)
    metrics = {"w_loss": w_loss, "a_loss": a_loss,
               "w_grad_norm": optax.tree.norm(w_grads),
               "a_grad_norm": optax.tree.norm(a_grads)}
    metrics.update({f"w_{k}": v for k, v in w_metrics.items()})
    metrics.update({f"a_{k}": v for k, v in a_metrics.items()})
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              alphas=alphas, w_opt_state=w_opt_state,
                              a_opt_state=a_opt_state)
    return new_state, metrics

  return step


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


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
