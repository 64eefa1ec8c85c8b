"""Search and training objectives, registered by name.

An objective turns a batch into network inputs and targets, names the head the
network needs, and scores the head's output. `car` is the paper's context
auto-regression pretext: zero random boxes of the image and restore the whole clean
image (L1). The masked image is the input and the clean image the target in BOTH
the weight and the architecture step (the released code fed the clean image to the
architecture step; we do not). `cpc` is the CPC-style variant (fanas_jax/cpc.py):
predict patch embeddings rows ahead from a causal context, scored by InfoNCE.
`supervised` is cross-entropy for phase 2 and training (label-smoothed by the
config's `label_smoothing`, 0 if absent). `proxy_anchor` and `multi_similarity` train
the metric-learning embedding of zero-shot retrieval.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fanas_jax import cpc  # Registers the 'cpc' head before any Model is set up.
from fanas_jax.registry import Registry

Batch = dict[str, jax.Array]


def box_mask(rng: jax.Array, image_size: int, num_boxes: int, box_size: int) -> jax.Array:
  """[H, W] float mask, 0 inside `num_boxes` random box_size x box_size boxes, else 1.

  Box positions are drawn once per batch (shared by its images) and every box lies
  fully inside the image.
  """
  if box_size > image_size:
    raise ValueError(f"box_size {box_size} exceeds image_size {image_size}.")
  corners = jax.random.randint(rng, (num_boxes, 2), 0, image_size - box_size + 1)
  coords = jnp.arange(image_size)
  rows = (coords[None, :] >= corners[:, :1]) & (coords[None, :] < corners[:, :1] + box_size)
  cols = (coords[None, :] >= corners[:, 1:]) & (coords[None, :] < corners[:, 1:] + box_size)
  inside = jnp.any(rows[:, :, None] & cols[:, None, :], axis=0)
  return 1.0 - inside.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
  """How a batch becomes (inputs, targets) and how the head output is scored.

  head_config: the head options the objective itself fixes (e.g. the patch grid).
  """
  head: str
  make_inputs: Callable[[Batch, jax.Array], tuple[jax.Array, jax.Array]]
  loss: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
  head_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def input_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The network input's shape for a batch of image_shape (traced, not computed).

    Not always the image's: `cpc` feeds every patch as its own example.
    """
    batch = {"image": jax.ShapeDtypeStruct(image_shape, jnp.float32),
             "label": jax.ShapeDtypeStruct(image_shape[:1], jnp.int32)}
    inputs, _ = jax.eval_shape(self.make_inputs, batch, jax.random.key(0))
    return tuple(inputs.shape)


def _car(config: Any) -> Objective:
  image_size, num_boxes, box_size = (config.image_size, config.num_boxes,
                                     config.box_size)

  def make_inputs(batch, rng):
    clean = batch["image"]
    mask = box_mask(rng, image_size, num_boxes, box_size)
    return clean * mask[None, :, :, None], clean

  def loss(pred, target):
    l1 = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target))
    return l1, {"l1": l1}

  return Objective("car_decoder", make_inputs, loss)


def _cpc(config: Any) -> Objective:
  """Each patch of each image is one network input; labels are unused."""
  options = config.cpc
  size, stride = options.patch_size, options.patch_stride
  side = cpc.grid_size(config.image_size, size, stride)

  def make_inputs(batch, rng):
    del rng
    patches = cpc.extract_patches(batch["image"], size, stride)
    return patches.reshape(-1, *patches.shape[3:]), None

  def loss(out, targets):
    del targets
    value, accuracy = cpc.info_nce(out["predictions"], out["z"], out["target_index"])
    return value, {"info_nce": value, "accuracy": accuracy}

  head_config = dict(grid=(side, side), embed_dim=options.embed_dim,
                     context_layers=options.context_layers,
                     context_heads=options.context_heads,
                     offsets=tuple(int(k) for k in options.offsets))
  return Objective("cpc", make_inputs, loss, head_config)


def _supervised(config: Any) -> Objective:
  smoothing = float(config.get("label_smoothing", 0.0))

  def make_inputs(batch, rng):
    del rng
    return batch["image"], batch["label"]

  def loss(logits, labels):
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return ce, {"cross_entropy": ce, "accuracy": acc}

  return Objective("classifier", make_inputs, loss)


def proxy_anchor_loss(embedding: jax.Array, proxies: jax.Array, labels: jax.Array,
                      alpha: float = 32.0, margin: float = 0.1) -> jax.Array:
  """Proxy-anchor loss (Kim et al., CVPR 2020) on unit-norm embeddings and proxies.

  Positive term averaged over the proxies that have a positive in the batch, negative
  term over all proxies. Similarities are cosines in [-1, 1], so the exponentials are
  bounded by exp(alpha * (1 + margin)) and need no log-sum-exp trick in float32.
  """
  sim = embedding @ proxies.T
  pos = jax.nn.one_hot(labels, proxies.shape[0], dtype=sim.dtype)
  pos_sum = jnp.sum(jnp.exp(-alpha * (sim - margin)) * pos, axis=0)
  neg_sum = jnp.sum(jnp.exp(alpha * (sim + margin)) * (1.0 - pos), axis=0)
  has_pos = jnp.sum(pos, axis=0) > 0
  pos_term = jnp.sum(jnp.where(has_pos, jnp.log1p(pos_sum), 0.0)) / jnp.maximum(
      jnp.sum(has_pos), 1)
  return pos_term + jnp.mean(jnp.log1p(neg_sum))


def _proxy_anchor(config: Any) -> Objective:
  alpha, margin = config.get("pa_alpha", 32.0), config.get("pa_margin", 0.1)

  def make_inputs(batch, rng):
    del rng
    return batch["image"], batch["label"]

  def loss(out, labels):
    value = proxy_anchor_loss(out["embedding"], out["proxies"], labels, alpha, margin)
    return value, {"proxy_anchor": value}

  return Objective("embedding", make_inputs, loss)


def multi_similarity_loss(embedding: jax.Array, labels: jax.Array, alpha: float = 2.0,
                          beta: float = 50.0, base: float = 0.5,
                          epsilon: float = 0.1) -> jax.Array:
  """Multi-similarity loss (Wang et al., CVPR 2019) on unit-norm embeddings.

  Pair mining: a negative pair is kept when its similarity + epsilon exceeds the
  anchor's hardest (least similar) positive, a positive pair when its similarity
  - epsilon is below the hardest (most similar) negative; an anchor's own pair is
  never a positive. Per anchor
    1/alpha log(1 + sum_P exp(-alpha (S - base))) + 1/beta log(1 + sum_N exp(beta (S - base)))
  over its kept pairs (an empty set adds 0), averaged over the anchors. Cosines
  lie in [-1, 1], so the exponentials stay finite in float32.
  """
  sim = embedding @ embedding.T
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(labels.shape[0], dtype=bool)
  neg = ~same
  hardest_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=1, keepdims=True)
  hardest_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=1, keepdims=True)
  pos_kept = pos & (sim - epsilon < hardest_neg)
  neg_kept = neg & (sim + epsilon > hardest_pos)
  pos_sum = jnp.sum(jnp.where(pos_kept, jnp.exp(-alpha * (sim - base)), 0.0), axis=1)
  neg_sum = jnp.sum(jnp.where(neg_kept, jnp.exp(beta * (sim - base)), 0.0), axis=1)
  return jnp.mean(jnp.log1p(pos_sum) / alpha + jnp.log1p(neg_sum) / beta)


def _multi_similarity(config: Any) -> Objective:
  alpha, beta = config.get("ms_alpha", 2.0), config.get("ms_beta", 50.0)
  base, epsilon = config.get("ms_base", 0.5), config.get("ms_epsilon", 0.1)

  def make_inputs(batch, rng):
    del rng
    return batch["image"], batch["label"]

  def loss(out, labels):
    value = multi_similarity_loss(out["embedding"], labels, alpha, beta, base, epsilon)
    return value, {"multi_similarity": value}

  return Objective("embedding", make_inputs, loss)


OBJECTIVES: Registry = Registry("objective")
OBJECTIVES.add("car", _car)
OBJECTIVES.add("cpc", _cpc)
OBJECTIVES.add("supervised", _supervised)
OBJECTIVES.add("proxy_anchor", _proxy_anchor)
OBJECTIVES.add("multi_similarity", _multi_similarity)


def make_objective(name: str, config: Any) -> Objective:
  return OBJECTIVES.get(name, key="objective")(config)
