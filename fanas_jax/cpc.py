"""Context auto-regression in the strict sense: a CPC-style search objective.

The image is cut into a grid of patches (overlapping when the stride is smaller
than the patch, as in CPC v2) and every patch goes through the (super)network on
its own, so the backbone's receptive field never crosses patches. The `cpc` head
pools each patch's stage-5 features into an embedding z, runs a causal attention
context network over the grid, and predicts z k rows below with one linear map per
offset k (van den Oord et al. 2018, "Representation Learning with Contrastive
Predictive Coding"; Henaff et al. 2019).

What the context sees: c[r, col] attends to every position in rows <= r (the rows
above and its own row, all columns), never below. The prediction of z[r + k, col]
is W_k c[r, col], so it depends only on rows at least k above its target. Stacked
blocks keep this, since each block only mixes positions its predecessor could see.

Batch norm in the backbone (training mode) normalises with moments pooled over all
patches of the batch, so every patch nudges every other patch's features, alike for
all positions. CPC v2 swaps batch norm for layer norm to close even that channel;
here the search space fixes the backbone's norm.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fanas_jax.model import HEADS


def grid_size(image_size: int, patch_size: int, stride: int) -> int:
  """Patches per side; every patch lies fully inside the image."""
  return (image_size - patch_size) // stride + 1


def extract_patches(images: jax.Array, patch_size: int, stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, gh, gw, p, p, C]; patch (r, c) starts at (r*stride, c*stride)."""
  _, height, width, _ = images.shape
  starts = lambda side: np.arange(grid_size(side, patch_size, stride)) * stride
  rows = starts(height)[:, None] + np.arange(patch_size)
  cols = starts(width)[:, None] + np.arange(patch_size)
  return images[:, rows[:, None, :, None], cols[None, :, None, :]]


def row_causal_mask(rows: int, cols: int) -> np.ndarray:
  """[L, L] bool over raster positions: query i may see key j iff row(j) <= row(i)."""
  row = np.repeat(np.arange(rows), cols)
  return row[None, :] <= row[:, None]


class ContextNetwork(nn.Module):
  """Pre-norm transformer blocks over the raster-ordered grid, masked by rows.

  A learned position embedding tells each position where it is, so the same
  context can aim at different columns.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    batch, rows, cols, dim = z.shape
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (rows, cols, dim))
    x = (z + pos).reshape(batch, rows * cols, dim)
    mask = jnp.asarray(row_causal_mask(rows, cols))[None, None]
    for i in range(self.num_layers):
      y = nn.LayerNorm(name=f"block{i}_norm1")(x)
      x = x + nn.MultiHeadDotProductAttention(self.num_heads,
                                              name=f"block{i}_attention")(y, y, mask=mask)
      y = nn.LayerNorm(name=f"block{i}_norm2")(x)
      y = nn.gelu(nn.Dense(self.mlp_ratio * dim, name=f"block{i}_mlp_in")(y))
      x = x + nn.Dense(dim, name=f"block{i}_mlp_out")(y)
    return nn.LayerNorm(name="norm_out")(x).reshape(batch, rows, cols, dim)


class CPCHead(nn.Module):
  """Patch embeddings, their causal context and the k-rows-ahead predictions.

  Input: backbone features of B*gh*gw patches in (image, row, col) order. Returns
  {'z': [N, D] embeddings (N = B*gh*gw), 'predictions': [P, D] (offset, image,
  row, col order), 'target_index': [P] the row of z each prediction aims at}.
  """
  grid: tuple[int, int]
  embed_dim: int
  context_layers: int
  context_heads: int
  offsets: tuple[int, ...]

  @nn.compact
  def __call__(self, features: dict[str, jax.Array],
               train: bool = False) -> dict[str, jax.Array]:
    del train  # No dropout or batch statistics in the head.
    rows, cols = self.grid
    pooled = jnp.mean(features["stage5"].astype(jnp.float32), axis=(1, 2))
    z = nn.Dense(self.embed_dim, name="embed")(pooled)
    context = ContextNetwork(self.context_layers, self.context_heads,
                             name="context")(z.reshape(-1, rows, cols, self.embed_dim))
    index = np.arange(z.shape[0]).reshape(-1, rows, cols)
    predictions, targets = [], []
    for k in self.offsets:
      # CPC's log-bilinear score z^T W_k c: a linear map without bias.
      pred = nn.Dense(self.embed_dim, use_bias=False, name=f"predict_k{k}")(
          context[:, :rows - k])
      predictions.append(pred.reshape(-1, self.embed_dim))
      targets.append(index[:, k:].reshape(-1))
    return {"z": z, "predictions": jnp.concatenate(predictions),
            "target_index": jnp.asarray(np.concatenate(targets), jnp.int32)}


def info_nce(predictions: jax.Array, embeddings: jax.Array,
             target_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """InfoNCE of each prediction against every patch embedding of the batch.

  Scores are dot products with all N embeddings, scaled by 1/sqrt(D) so they start
  O(1) (a scale W_k could absorb; it only conditions the start): the positive at
  target_index, negatives at all other positions of the same image and of the
  other images.

  z is not stop-gradiented (as in CPC v1): the gradient through the positives and
  negatives is what teaches the encoder, and in the architecture step the alphas,
  to make patches predictable and distinct; the negatives already rule out
  collapse (a constant z scores log N). Returns (mean loss, top-1 accuracy).
  """
  logits = predictions @ embeddings.T / np.sqrt(embeddings.shape[-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, target_index).mean()
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == target_index)
  return loss, accuracy


def _make_head(cfg: dict[str, Any]) -> CPCHead:
  return CPCHead(tuple(cfg["grid"]), cfg["embed_dim"], cfg["context_layers"],
                 cfg["context_heads"], tuple(cfg["offsets"]))


HEADS.add("cpc", _make_head)
