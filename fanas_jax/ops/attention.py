"""Local (SASA) self-attention as a pure function.

The window neighbourhood is never gathered into one tensor: logits and outputs
are built one offset at a time from shifted slices of the zero-padded keys and
values, inside a `lax.scan`, so memory stays O(B*H*W*C) and the compiled graph
does not grow with the window size.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=None)
def _window_mask(height: int, width: int, window: int) -> np.ndarray:
  """[window*window, H, W] bool: whether offset o of pixel (y, x) is in the map.

  A compile-time constant, so masking costs no traced ops beyond one select.
  """
  half = window // 2
  dy, dx = np.divmod(np.arange(window * window), window)
  rows = np.arange(height)[None, :] + dy[:, None] - half
  cols = np.arange(width)[None, :] + dx[:, None] - half
  row_ok = (rows >= 0) & (rows < height)
  col_ok = (cols >= 0) & (cols < width)
  return row_ok[:, :, None] & col_ok[:, None, :]


def _check_shapes(q, k, v, window, num_heads, rel_row, rel_col, value_mix):
  if window < 1 or window % 2 == 0:
    raise ValueError(f"window must be a positive odd integer, got {window}.")
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(
        f"q and k must both be [B, H, W, C]; got {q.shape} and {k.shape}.")
  channels = q.shape[-1]
  if channels % num_heads:
    raise ValueError(
        f"{channels} query channels do not split into {num_heads} heads.")
  value_rank = 4 if value_mix is None else 5
  if v.ndim != value_rank or v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"v must be [B, H, W, {'M, ' if value_mix is not None else ''}Cv] "
        f"matching q's {q.shape[:3]}; got {v.shape}.")
  if v.shape[-1] % num_heads:
    raise ValueError(
        f"{v.shape[-1]} value channels do not split into {num_heads} heads.")
  if (rel_row is None) != (rel_col is None):
    raise ValueError("rel_row and rel_col must be given together.")
  if rel_row is not None:
    if channels % 2:
      raise ValueError(
          f"Relative embeddings need an even channel count, got {channels}.")
    expected = (window, channels // 2)
    if rel_row.shape != expected or rel_col.shape != expected:
      raise ValueError(
          f"rel_row and rel_col must be {expected}; got {rel_row.shape} and "
          f"{rel_col.shape}.")
  if value_mix is not None and value_mix.shape != (window * window, v.shape[3]):
    raise ValueError(
        f"value_mix must be {(window * window, v.shape[3])}; "
        f"got {value_mix.shape}.")


def local_attention(q: Array,
                    k: Array,
                    v: Array,
                    *,
                    window: int,
                    num_heads: int,
                    rel_row: Array | None = None,
                    rel_col: Array | None = None,
                    value_mix: Array | None = None) -> Array:
  """Multi-head attention of each pixel over its window x window neighbourhood.

  Positions outside the map are excluded from the softmax (not given logit 0),
  so a window covering the whole map without relative embeddings is exactly
  global attention.

  Args:
    q: [B, H, W, C] queries.
    k: [B, H, W, C] keys.
    v: [B, H, W, Cv] values, or [B, H, W, M, Cv] when `value_mix` is given.
    window: odd side of the square neighbourhood.
    num_heads: channels are split into this many contiguous groups; each head
      has its own softmax over the window, with logits scaled by
      1/sqrt(C/num_heads).
    rel_row: optional [window, C/2] embedding of the row offset, added (via the
      query) to the first C/2 key channels, as in SASA.
    rel_col: optional [window, C/2] embedding of the column offset, added to the
      last C/2 key channels.
    value_mix: optional [window*window, M] weights: the value at offset o is
      sum_m value_mix[o, m] * v[neighbour, m] (the SASA attention stem).

  Returns:
    [B, H, W, Cv] attention output, in v's dtype.
  """
  _check_shapes(q, k, v, window, num_heads, rel_row, rel_col, value_mix)
  batch, height, width, channels = q.shape
  head_dim = channels // num_heads
  value_dim = v.shape[-1] // num_heads
  half = window // 2
  offsets = jnp.asarray(
      np.stack(np.divmod(np.arange(window * window), window), axis=1),
      jnp.int32)

  def pad(x):
    widths = [(0, 0), (half, half), (half, half)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, widths)

  def shifted(x_pad, offset):
    zero = jnp.zeros_like(offset[0])  # Index dtypes must match, even in x64.
    start = (zero, offset[0], offset[1]) + (zero,) * (x_pad.ndim - 3)
    size = (batch, height, width) + x_pad.shape[3:]
    return lax.dynamic_slice(x_pad, start, size)

  q_heads = (q * head_dim**-0.5).reshape(batch, height, width, num_heads,
                                         head_dim)
  k_pad = pad(k)
  # Logits and softmax in at least float32, also for bfloat16 inputs.
  logit_dtype = jnp.promote_types(q.dtype, jnp.float32)

  # Rematerialised so the backward pass re-slices k instead of saving every
  # shifted copy (which would be the full neighbourhood tensor).
  @jax.checkpoint
  def content_logit(_, offset):
    k_shift = shifted(k_pad, offset).reshape(q_heads.shape)
    return None, jnp.sum(q_heads * k_shift, axis=-1, dtype=logit_dtype)

  _, logits = lax.scan(content_logit, None, offsets)  # [kk, B, H, W, heads]

  if rel_row is not None:
    # q . concat(rel_row[dy], rel_col[dx]) = q_row . rel_row[dy] +
    # q_col . rel_col[dx]: 2*window small products instead of window**2.
    zeros = jnp.zeros_like(rel_row)
    row_table = jnp.concatenate([rel_row, zeros], axis=-1)
    col_table = jnp.concatenate([zeros, rel_col], axis=-1)
    row_table, col_table = (
        t.reshape(window, num_heads, head_dim) for t in (row_table, col_table))
    row = jnp.einsum("bhwnd,ynd->ybhwn", q_heads, row_table,
                     preferred_element_type=logit_dtype)
    col = jnp.einsum("bhwnd,xnd->xbhwn", q_heads, col_table,
                     preferred_element_type=logit_dtype)
    logits += (row[:, None] + col[None, :]).reshape(logits.shape)

  valid = _window_mask(height, width, window)[:, None, :, :, None]
  weights = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=0)

  v_pad = pad(v)
  acc_dtype = jnp.promote_types(v.dtype, jnp.float32)

  @jax.checkpoint
  def accumulate(acc, xs):
    offset, weight, *mix = xs
    v_shift = shifted(v_pad, offset)
    if mix:
      v_shift = jnp.einsum("bhwmc,m->bhwc", v_shift, mix[0])
    v_shift = v_shift.reshape(batch, height, width, num_heads, value_dim)
    return acc + weight[..., None] * v_shift, None

  xs = (offsets, weights) + (() if value_mix is None else (value_mix,))
  init = jnp.zeros((batch, height, width, num_heads, value_dim), acc_dtype)
  out, _ = lax.scan(accumulate, init, xs)
  return out.reshape(batch, height, width, num_heads * value_dim).astype(
      v.dtype)
