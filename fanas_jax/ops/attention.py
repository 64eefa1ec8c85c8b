"""Local (SASA) self-attention as a pure function, in three implementations.

Borders (`border`): 'zero_pad' (the authors') zero-pads the map before the
key and value projections, so a window position outside the map has key 0 and
value 0 but stays in the softmax, with logit q . (its relative embedding), or 0
without one; 'mask' leaves such positions out of the softmax altogether.

No implementation ever gathers the (B, H, W, k*k, C) window neighbourhood:

- `blocked` (default, fast): the map is cut into b x b query blocks; each block
  attends to its (b + k - 1)^2 halo region with dense batched matmuls. Relative
  position logits and the window/border mask are folded into a few extra query
  and key channels (a one-hot code of the key's row and column in the region,
  matched by the query's per-row and per-column logits), so each block is plain
  dot-product attention: XLA runs it as batched matmuls, and on GPUs with
  bf16/fp16 it runs through cuDNN's fused attention kernel.
  A map that fits one default block along both axes (sides up to 10: the
  search's and the quickstart's small maps) runs `dense` instead, unless the
  backend is cuDNN.
- `dense` (small maps): every query against every key of the map, the window a
  mask and the relative logits gathered from per-axis tables by constant one-hot
  matrices; under 'zero_pad' the padding keys of a query's window, which all have
  value 0, are merged into one extra key whose logit is the log of their summed
  exp (it factorises over rows and columns). No halo, no augmented channels: for
  a 7x7 window on an 8x8 map, 65 keys of head_dim channels per query against
  196 keys of head_dim + 28 in one halo block. Memory grows as (H*W)^2.
- `scan` (lean): one window offset at a time from shifted slices of the padded
  keys and values inside a rematerialised `lax.scan`, so memory stays
  O(B*H*W*C) whatever the window. Also the only form of the value-mixture
  attention of the SASA stem.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ("blocked", "scan", "dense")
BORDERS = ("zero_pad", "mask")
BACKENDS = ("xla", "cudnn")
# Added to the logit of a key outside the window or the map. Finite (a -inf
# would meet zero channels in the augmented dot product and give NaN), and so
# large that exp() underflows to exactly 0 in every supported dtype.
_MASKED_LOGIT = {jnp.dtype(jnp.float16): -3e4}
_DEFAULT_MASKED_LOGIT = -1e9


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


def _check_options(window, value_mix, border, impl, block_size, offset_bias):
  if offset_bias is not None and offset_bias.shape != (window,):
    raise ValueError(f"offset_bias must be [{window}]; got {offset_bias.shape}.")
  if border not in BORDERS:
    raise ValueError(f"Unknown local attention border {border!r}; valid: "
                     f"{', '.join(BORDERS)}.")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown local attention implementation {impl!r}; valid: "
                     f"{', '.join(IMPLEMENTATIONS)}.")
  if impl != "scan" and value_mix is not None:
    raise ValueError("value_mix (the attention stem) needs impl='scan'.")
  if impl == "blocked" and block_size is not None and block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")


def _pad_window(x: Array, half: int) -> Array:
  """Zero-pads the two spatial axes (1 and 2) by half a window on each side."""
  return jnp.pad(x, [(0, 0), (half, half), (half, half)] + [(0, 0)] * (x.ndim - 3))


def _shifted(x_pad: Array, offset: Array, height: int, width: int) -> Array:
  """The [B, H, W, ...] slice of a padded map at window offset (dy, dx)."""
  zero = jnp.zeros_like(offset[0])  # Index dtypes must match, even in x64.
  start = (zero, offset[0], offset[1]) + (zero,) * (x_pad.ndim - 3)
  size = (x_pad.shape[0], height, width) + x_pad.shape[3:]
  return lax.dynamic_slice(x_pad, start, size)


def _scan_logits(q_heads, k, offsets, window, rel_row, rel_col, border,
                 offset_bias) -> Array:
  """[k*k, B, H, W, heads] logits of each query at every window offset."""
  batch, height, width, num_heads, head_dim = q_heads.shape
  k_pad = _pad_window(k, window // 2)
  # Logits and softmax in at least float32, also for bfloat16 inputs.
  logit_dtype = jnp.promote_types(q_heads.dtype, jnp.float32)

  # Rematerialised so the backward pass re-slices k instead of saving every
  # shifted copy (which would be the full neighbourhood tensor).
  @jax.checkpoint
  def content_logit(_, offset):
    k_shift = _shifted(k_pad, offset, height, width).reshape(q_heads.shape)
    return None, jnp.sum(q_heads * k_shift, axis=-1, dtype=logit_dtype)

  _, logits = lax.scan(content_logit, None, offsets)

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
  if offset_bias is not None:
    bias = (offset_bias[:, None] + offset_bias[None, :]).astype(logit_dtype)
    logits += bias.reshape(-1, 1, 1, 1, 1)
  if border == "mask":
    valid = _window_mask(height, width, window)[:, None, :, :, None]
    logits = jnp.where(valid, logits, -jnp.inf)
  # zero_pad: a padded key is 0, so its logit is already q . rel (or 0).
  return logits


def _scan_values(weights, v, offsets, window, num_heads, value_mix) -> Array:
  """sum over offsets of weights[o] * v at offset o: [B, H, W, heads, Cv/heads]."""
  batch, height, width = v.shape[:3]
  value_dim = v.shape[-1] // num_heads
  v_pad = _pad_window(v, window // 2)
  acc_dtype = jnp.promote_types(v.dtype, jnp.float32)

  @jax.checkpoint
  def accumulate(acc, xs):
    offset, weight, *mix = xs
    v_shift = _shifted(v_pad, offset, height, width)
    if mix:
      v_shift = jnp.einsum("bhwmc,m->bhwc", v_shift, mix[0])
    v_shift = v_shift.reshape(batch, height, width, num_heads, value_dim)
    return acc + weight[..., None] * v_shift, None

  xs = (offsets, weights) + (() if value_mix is None else (value_mix,))
  init = jnp.zeros((batch, height, width, num_heads, value_dim), acc_dtype)
  out, _ = lax.scan(accumulate, init, xs)
  return out


def _local_attention_scan(q, k, v, window, num_heads, rel_row, rel_col,
                          value_mix, border, offset_bias) -> Array:
  """One offset at a time: a lax.scan over the window, rematerialised."""
  batch, height, width, channels = q.shape
  head_dim = channels // num_heads
  offsets = jnp.asarray(
      np.stack(np.divmod(np.arange(window * window), window), axis=1),
      jnp.int32)
  q_heads = (q * head_dim**-0.5).reshape(batch, height, width, num_heads,
                                         head_dim)
  logits = _scan_logits(q_heads, k, offsets, window, rel_row, rel_col, border,
                        offset_bias)
  weights = jax.nn.softmax(logits, axis=0)
  out = _scan_values(weights, v, offsets, window, num_heads, value_mix)
  return out.reshape(batch, height, width, v.shape[-1]).astype(v.dtype)


def default_block_size(size: int) -> int:
  """Query block side for a map side: a divisor of the side near 8 (no padding,
  ~64 queries per block), the whole side for small maps, else 8 with padding."""
  if size <= 10:
    return size
  divisors = [d for d in range(4, 17) if size % d == 0]
  if divisors:
    return min(divisors, key=lambda d: (abs(d - 8), -d))
  return 8


@functools.lru_cache(maxsize=None)
def _halo_layout(size: int, block: int, half: int, zero_pad: bool):
  """Static layout of one spatial axis for the blocked implementation.

  Returns (num_blocks, region, start, offset, valid):
    region: keys per block along the axis (block + 2*half, or the whole axis
      when there is a single block and positions outside the map are masked);
    start[j]: map index of region row 0 of block j (may be negative: padding);
    offset[j, i, r]: window offset index (0..2*half) of region row r seen
      from query row i of block j;
    valid[j, i, r]: inside the window and (unless zero_pad) inside the map.
  """
  num_blocks = -(-size // block)
  if num_blocks == 1 and not zero_pad:
    region, start = size, np.zeros(1, np.int64)
  else:
    region, start = block + 2 * half, np.arange(num_blocks) * block - half
  query_pos = np.arange(num_blocks)[:, None] * block + np.arange(block)[None]
  key_pos = start[:, None] + np.arange(region)[None]
  offset = key_pos[:, None, :] - query_pos[:, :, None] + half
  valid = (offset >= 0) & (offset <= 2 * half) & (query_pos[:, :, None] < size)
  if not zero_pad:
    valid &= (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] < size)
  return num_blocks, region, start, offset, valid


def _halo_regions(x: Array, axis: int, size: int, block: int, half: int,
                  zero_pad: bool) -> Array:
  """Replaces `axis` (length size) by [num_blocks, region] overlapping windows.

  Built from reshapes and static slices of the zero-padded axis (no gather), so
  the backward pass is a pad and a sum rather than a scatter.
  """
  num_blocks, region, start, _, _ = _halo_layout(size, block, half, zero_pad)
  lead = int(-start[0])
  spans = -(-region // block)  # Blocks of the padded axis one region touches.
  total = (num_blocks + spans - 1) * block
  widths = [(0, 0)] * x.ndim
  widths[axis] = (lead, total - lead - size)
  x = jnp.pad(x, widths)
  shape = x.shape[:axis] + (num_blocks + spans - 1, block) + x.shape[axis + 1:]
  x = x.reshape(shape)
  pieces = [lax.slice_in_dim(x, j, j + num_blocks, axis=axis)
            for j in range(spans)]
  x = jnp.concatenate(pieces, axis=axis + 1)
  return lax.slice_in_dim(x, 0, region, axis=axis + 1)


def _query_blocks(x: Array, axis: int, size: int, block: int) -> Array:
  """Pads `axis` to whole blocks and splits it into [num_blocks, block]."""
  num_blocks = -(-size // block)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, num_blocks * block - size)
  x = jnp.pad(x, widths)
  return x.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:])


def _offset_logits(q_heads: Array, rel: Array | None, offset_bias: Array | None,
                   window: int, is_row: bool, dtype: Any) -> Array:
  """[..., heads, window]: each query's logit of every row (or column) offset, its
  half of the channels dotted with the [window, C/2] relative embedding (the first
  half for rows, the last for columns), plus offset_bias."""
  if rel is None:
    logits = jnp.zeros(q_heads.shape[:-1] + (window,), dtype)
  else:
    zeros = jnp.zeros_like(rel)
    table = jnp.concatenate([rel, zeros] if is_row else [zeros, rel], -1)
    table = table.reshape(window, *q_heads.shape[-2:]).astype(q_heads.dtype)
    logits = jnp.einsum("...nd,wnd->...nw", q_heads, table,
                        preferred_element_type=dtype)
  if offset_bias is not None:
    logits += offset_bias.astype(dtype)
  return logits


def _axis_logits(q_blocks, rel, offset_bias, layout, window, is_row,
                 masked_logit) -> Array:
  """[B, nb_y, b_y, nb_x, b_x, heads, region] logits along rows (is_row) or columns.

  Each query's relative-embedding (and offset-bias) logits at the region
  positions they belong to, plus masked_logit where the key is not `valid`
  (outside the window, or the map under border='mask').
  """
  _, region, _, offset, valid = layout
  dtype = q_blocks.dtype
  one_hot = ((offset[:, :, None, :] == np.arange(window)[None, None, :, None])
             & valid[:, :, None, :])
  bias = np.where(valid, 0.0, masked_logit)  # [nb, b, region] of this axis
  bias = jnp.asarray(bias[None, :, :, None, None, None] if is_row
                     else bias[None, None, None, :, :, None], dtype)
  if rel is None and offset_bias is None:
    return jnp.broadcast_to(bias, q_blocks.shape[:-1] + (region,))
  rel_logits = _offset_logits(q_blocks, rel, offset_bias, window, is_row, dtype)
  spec = "bYyXxnw,Yywr->bYyXxnr" if is_row else "bYyXxnw,Xxwr->bYyXxnr"
  return jnp.einsum(spec, rel_logits, jnp.asarray(one_hot, dtype)) + bias


def _augmented_keys(k_regions: Array, pad_dim: int) -> Array:
  """[B, nb_y, nb_x, r_y*r_x, heads, aug]: keys and their one-hot row and column
  codes in the region (matched by the queries' axis logits), zero-padded."""
  batch, nb_y, nb_x, region_y, region_x, num_heads, _ = k_regions.shape
  dtype = k_regions.dtype
  code_shape = (batch, nb_y, nb_x, region_y, region_x, num_heads)
  row_code = jnp.broadcast_to(
      jnp.eye(region_y, dtype=dtype)[:, None, None, :], code_shape + (region_y,))
  col_code = jnp.broadcast_to(
      jnp.eye(region_x, dtype=dtype)[None, :, None, :], code_shape + (region_x,))
  k_aug = jnp.concatenate(
      [k_regions, row_code, col_code,
       jnp.zeros(code_shape + (pad_dim,), dtype)], axis=-1)
  return k_aug.reshape(batch, nb_y, nb_x, region_y * region_x, num_heads, -1)


def _local_attention_blocked(q, k, v, window, num_heads, rel_row, rel_col,
                             block_size, backend, border, offset_bias) -> Array:
  """Blocked (halo) local attention as augmented dot-product attention."""
  batch, height, width, channels = q.shape
  head_dim = channels // num_heads
  value_dim = v.shape[-1] // num_heads
  half = window // 2
  block_y = block_size or default_block_size(height)
  block_x = block_size or default_block_size(width)
  zero_pad = border == "zero_pad"
  rows = _halo_layout(height, block_y, half, zero_pad)
  cols = _halo_layout(width, block_x, half, zero_pad)
  (nb_y, region_y), (nb_x, region_x) = rows[:2], cols[:2]
  masked_logit = _MASKED_LOGIT.get(jnp.dtype(q.dtype), _DEFAULT_MASKED_LOGIT)

  # Queries: [B, nb_y, b_y, nb_x, b_x, heads, d], pre-scaled.
  q_heads = (q * head_dim**-0.5).reshape(batch, height, width, num_heads,
                                         head_dim)
  q_blocks = _query_blocks(_query_blocks(q_heads, 1, height, block_y), 3,
                           width, block_x)
  axis_logits = [
      _axis_logits(q_blocks, rel, offset_bias, layout, window, is_row,
                   masked_logit)
      for rel, layout, is_row in ((rel_row, rows, True), (rel_col, cols, False))]
  pad_dim = -(head_dim + region_y + region_x) % 8  # Multiples of 8 suit tensor
  # cores (and cuDNN).
  q_aug = jnp.concatenate(
      [q_blocks, *axis_logits,
       jnp.zeros(q_blocks.shape[:-1] + (pad_dim,), q.dtype)], axis=-1)
  # [B, nb_y, nb_x, b_y*b_x, heads, aug]
  q_aug = q_aug.transpose(0, 1, 3, 2, 4, 5, 6).reshape(
      batch, nb_y, nb_x, block_y * block_x, num_heads, -1)

  def regions(x):  # [B, H, W, ...] -> [B, nb_y, nb_x, r_y, r_x, ...]
    x = _halo_regions(_halo_regions(x, 1, height, block_y, half, zero_pad), 3,
                      width, block_x, half, zero_pad)
    return jnp.moveaxis(x, 3, 2)

  k_aug = _augmented_keys(
      regions(k.reshape(batch, height, width, num_heads, head_dim)), pad_dim)
  v_regions = regions(v.reshape(batch, height, width, num_heads, value_dim))
  v_regions = v_regions.reshape(batch, nb_y, nb_x, region_y * region_x,
                                num_heads, value_dim)

  flat = lambda x: x.reshape((batch * nb_y * nb_x,) + x.shape[3:])
  out = _block_attention(flat(q_aug), flat(k_aug), flat(v_regions), backend)
  out = out.reshape(batch, nb_y, nb_x, block_y, block_x, num_heads * value_dim)
  out = out.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, nb_y * block_y, nb_x * block_x, num_heads * value_dim)
  return out[:, :height, :width]


def _axis_one_hot(size: int, window: int) -> np.ndarray:
  """[size, window, size] float32: 1 where the key position (last axis) lies at
  window offset w of the query position (first axis)."""
  offset = np.arange(size)[None, :] - np.arange(size)[:, None] + window // 2
  return (offset[:, None, :] == np.arange(window)[None, :, None]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _dense_layout(height: int, width: int, window: int):
  """Static tables of the dense implementation: the row and column one-hots, the
  [H, W, H, W] in-window mask, and per query row (column) which window offsets
  fall inside the map, [H, window] ([W, window])."""
  half = window // 2
  rows, cols = np.arange(height), np.arange(width)
  near_y = np.abs(rows[None, :] - rows[:, None]) <= half
  near_x = np.abs(cols[None, :] - cols[:, None]) <= half
  in_window = near_y[:, None, :, None] & near_x[None, :, None, :]
  offsets = np.arange(window) - half
  row_in = (rows[:, None] + offsets >= 0) & (rows[:, None] + offsets < height)
  col_in = (cols[:, None] + offsets >= 0) & (cols[:, None] + offsets < width)
  return (_axis_one_hot(height, window), _axis_one_hot(width, window), in_window,
          row_in, col_in)


def _padding_logit(row, col, layout, window, dtype, masked_logit) -> Array:
  """[B, heads, H, W] log of the summed exp(logit) of a query's window positions
  outside the map (zero keys and values under 'zero_pad').

  A position is outside when its row or its column is, and its logit is the sum of
  a row and a column term, so the sum factorises:
  out_rows(a) * all_cols(b) + in_rows(a) * out_cols(b). masked_logit stands in for
  an empty sum (exp underflows to 0), so gradients stay finite."""
  _, _, _, row_in, col_in = layout
  zero = jnp.zeros((1, 1, 1, 1, window), dtype)
  row = zero if row is None else row
  col = zero if col is None else col
  row_in = row_in[None, :, None, None, :]
  col_in = col_in[None, None, :, None, :]
  lse = lambda x, keep: jax.nn.logsumexp(jnp.where(keep, x, masked_logit), axis=-1)
  pad = jnp.logaddexp(lse(row, ~row_in) + lse(col, True),
                      lse(row, row_in) + lse(col, ~col_in))
  return pad.transpose(0, 3, 1, 2)


def _local_attention_dense(q, k, v, window, num_heads, rel_row, rel_col, border,
                           offset_bias) -> Array:
  """Each query against every key of the map, the window as a mask."""
  batch, height, width, channels = q.shape
  head_dim = channels // num_heads
  value_dim = v.shape[-1] // num_heads
  logit_dtype = jnp.promote_types(q.dtype, jnp.float32)
  masked_logit = _MASKED_LOGIT.get(jnp.dtype(q.dtype), _DEFAULT_MASKED_LOGIT)
  layout = _dense_layout(height, width, window)
  one_hot_y, one_hot_x, in_window = layout[:3]
  heads = lambda x, d: x.reshape(batch, height, width, num_heads, d)
  q_heads = heads(q * head_dim**-0.5, head_dim)
  logits = jnp.einsum("byxnd,bYXnd->bnyxYX", q_heads, heads(k, head_dim),
                      preferred_element_type=logit_dtype)
  row = col = None  # No relative or offset logits: a zero table in _padding_logit.
  if rel_row is not None or offset_bias is not None:
    row = _offset_logits(q_heads, rel_row, offset_bias, window, True, logit_dtype)
    col = _offset_logits(q_heads, rel_col, offset_bias, window, False, logit_dtype)
    logits += jnp.einsum("byxnw,ywY->bnyxY", row,
                         jnp.asarray(one_hot_y, logit_dtype))[..., None]
    logits += jnp.einsum("byxnw,xwX->bnyxX", col,
                         jnp.asarray(one_hot_x, logit_dtype))[..., None, :]
  # A constant bias rather than a select, so it fuses with the additions above.
  logits += jnp.asarray(np.where(in_window, 0.0, masked_logit), logit_dtype)
  logits = logits.reshape(batch, num_heads, height, width, height * width)
  # softmax over the map's keys and, under 'zero_pad', the merged padding key (value
  # 0: it only adds to the denominator), without concatenating it to the logits.
  top = jnp.max(logits, axis=-1)
  if border == "zero_pad":
    pad = _padding_logit(row, col, layout, window, logit_dtype, masked_logit)
    top = jnp.maximum(top, pad)
  top = lax.stop_gradient(top)
  exp = jnp.exp(logits - top[..., None])
  total = jnp.sum(exp, axis=-1)
  if border == "zero_pad":
    total += jnp.exp(pad - top)
  weights = (exp / total[..., None]).astype(v.dtype)
  values = heads(v, value_dim).reshape(batch, height * width, num_heads, value_dim)
  out = jnp.einsum("bnyxk,bknd->byxnd", weights, values)
  return out.reshape(batch, height, width, num_heads * value_dim)


def inner_window_bias(window: int, inner: int, dtype: Any = jnp.float32) -> np.ndarray:
  """The [window] `offset_bias` that narrows a window x window attention to the
  centre inner x inner offsets (a masked logit outside them)."""
  if inner < 1 or inner % 2 == 0 or inner > window:
    raise ValueError(f"inner window must be odd and in 1..{window}, got {inner}.")
  masked = _MASKED_LOGIT.get(jnp.dtype(dtype), _DEFAULT_MASKED_LOGIT)
  distance = np.abs(np.arange(window) - window // 2)
  return np.where(distance <= inner // 2, 0.0, masked).astype(np.float32)


# cuDNN's fused (flash) attention takes head dims up to this, in multiples of 8.
CUDNN_MAX_HEAD_DIM = 128


def _block_attention(q: Array, k: Array, v: Array, backend: str | None) -> Array:
  """softmax(q k^T) v per block and head; q and k carry scale and biases."""
  if backend is None:
    backend = default_backend(q.dtype, q.shape[-1])
  if backend == "cudnn":
    if q.shape[-1] > CUDNN_MAX_HEAD_DIM:
      raise ValueError(
          f"backend='cudnn' takes augmented head dims up to {CUDNN_MAX_HEAD_DIM}; "
          f"this layer needs {q.shape[-1]} (head dim + 2 halo sides): use 'xla', "
          "more heads or a smaller block_size.")
    return _fused_block_attention(q, k, v, "cudnn")
  if backend != "xla":
    raise ValueError(f"Unknown attention backend {backend!r}; valid: "
                     f"{', '.join(BACKENDS)}.")
  logit_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=logit_dtype)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v)


def _fused_block_attention(q: Array, k: Array, v: Array, implementation: str) -> Array:
  """The same through jax.nn.dot_product_attention, whose fused kernels need equal
  key and value head dims: values are zero-padded and the output sliced back."""
  pad = q.shape[-1] - v.shape[-1]
  v_wide = jnp.pad(v, [(0, 0)] * 3 + [(0, pad)]) if pad > 0 else v
  out = jax.nn.dot_product_attention(q, k, v_wide, scale=1.0,
                                     implementation=implementation)
  return out[..., :v.shape[-1]]


def default_backend(dtype: Any, head_dim: int = 0) -> str:
  """cuDNN's fused attention where it applies (GPU, 16-bit floats, head dims up
  to CUDNN_MAX_HEAD_DIM), else XLA."""
  if (jax.default_backend() == "gpu" and head_dim <= CUDNN_MAX_HEAD_DIM
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    return "cudnn"
  return "xla"


def local_attention(q: Array,
                    k: Array,
                    v: Array,
                    *,
                    window: int,
                    num_heads: int,
                    rel_row: Array | None = None,
                    rel_col: Array | None = None,
                    value_mix: Array | None = None,
                    border: str = "zero_pad",
                    impl: str = "blocked",
                    block_size: int | None = None,
                    backend: str | None = None,
                    offset_bias: Array | None = None) -> Array:
  """Multi-head attention of each pixel over its window x window neighbourhood.

  With border='mask' positions outside the map are excluded from the softmax,
  so a window covering the whole map without relative embeddings is exactly
  global attention; with 'zero_pad' they take part as zero keys and values.

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
      sum_m value_mix[o, m] * v[neighbour, m] (the SASA attention stem; `scan`
      implementation only).
    border: 'zero_pad' (positions outside the map are zero keys and values
      that stay in the softmax) or 'mask' (they are left out of it).
    impl: 'blocked', 'dense' or 'scan' (the module docstring).
    block_size: query block side for `blocked` (default: per axis, a divisor
      of the side near 8; given, the halo form runs at every map size).
    backend: for `blocked`, 'xla' or 'cudnn' (default: cuDNN on GPU for
      bf16/fp16 inputs, else XLA).
    offset_bias: optional [window] logit bias; a key at row offset dy and column
      offset dx gets offset_bias[dy] + offset_bias[dx]. A large negative bias outside
      the centre w x w offsets makes this exactly a w x w window's attention (rel
      tables zero-padded to `window`): the stacked supernet runs windows as one.

  Returns:
    [B, H, W, Cv] attention output, in v's dtype.
  """
  _check_shapes(q, k, v, window, num_heads, rel_row, rel_col, value_mix)
  _check_options(window, value_mix, border, impl, block_size, offset_bias)
  if impl == "scan":
    return _local_attention_scan(q, k, v, window, num_heads, rel_row, rel_col,
                                 value_mix, border, offset_bias)
  if impl == "dense" or (impl == "blocked" and _fits_one_block(q, block_size, backend)):
    return _local_attention_dense(q, k, v, window, num_heads, rel_row, rel_col,
                                  border, offset_bias)
  return _local_attention_blocked(q, k, v, window, num_heads, rel_row, rel_col,
                                  block_size, backend, border,
                                  offset_bias).astype(v.dtype)


def _fits_one_block(q: Array, block_size: int | None, backend: str | None) -> bool:
  """Whether `blocked` runs as `dense`: default blocks, a map of one block along
  both axes, and XLA rather than cuDNN's fused kernel."""
  _, height, width, _ = q.shape
  return (block_size is None and default_block_size(height) == height
          and default_block_size(width) == width
          and (backend or default_backend(q.dtype)) == "xla")
