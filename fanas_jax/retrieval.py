"""Zero-shot retrieval: exact blockwise top-k on the devices, Recall@K, MAP@R, NMI.

Deep metric learning evaluates an embedding on classes it never trained on: every
test image queries all the others (itself excluded) by cosine similarity. At
Stanford Online Products size (60,502 images) the similarity matrix would be
60,502^2 floats, so it is never built: `blockwise_topk` runs over fixed-size
blocks of queries (sharded over the devices), keeps a running top-k over blocks of
the gallery, and holds only O(block x gallery_block) similarities at a time.

Ties are broken by the lower gallery index: among equal similarities the example
that comes first in the gallery ranks first (what a stable sort of -similarity
gives). Padded rows (mask 0) are never neighbours, and their own rows of the
result are -inf / -1 and count in no metric.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fanas_jax import parallel
from fanas_jax.registry import ConfigError, Registry

PRECISION = jax.lax.Precision.HIGHEST  # exact float32 products: no TF32 or bf16 passes


def _normalized(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _mask(mask: Any, n: int) -> np.ndarray:
  return np.ones(n, bool) if mask is None else np.asarray(mask).astype(bool)


def check_k(k: int, gallery_mask: np.ndarray, exclude_self: bool) -> None:
  """K must be at least 1 and at most the neighbours a query has."""
  available = int(gallery_mask.sum()) - int(exclude_self)
  if not 1 <= k <= available:
    what = "other examples" if exclude_self else "gallery examples"
    raise ValueError(f"K={k} is outside 1..{available}: each query has {available} "
                     f"{what} to rank; use a K of at most {available}.")


def _pad_blocks(x: np.ndarray, block: int, num_blocks: int, fill: Any) -> np.ndarray:
  pad = num_blocks * block - len(x)
  x = np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
  return x.reshape((num_blocks, block) + x.shape[1:])


def _merge(best: tuple[jax.Array, jax.Array], sims: jax.Array, ids: jax.Array,
           k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k of the running best (earlier gallery blocks) followed by a new block.

  lax.top_k puts the lower position first among equals, and the running best both
  comes first and holds lower gallery indices, so ties go to the lower index.
  """
  scores = jnp.concatenate([best[0], sims], axis=1)
  index = jnp.concatenate([best[1], jnp.broadcast_to(ids, sims.shape)], axis=1)
  top, pos = jax.lax.top_k(scores, k)
  return top, jnp.take_along_axis(index, pos, axis=1)


def _block_topk(q: jax.Array, qid: jax.Array, gallery: jax.Array, gid: jax.Array,
                gvalid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """One query block against every gallery block, with a running top-k."""
  def step(best, g):
    g_emb, g_id, g_valid = g
    sims = jnp.dot(q, g_emb.T, precision=PRECISION)
    keep = g_valid[None, :] & (g_id[None, :] != qid[:, None])
    return _merge(best, jnp.where(keep, sims, -jnp.inf), g_id[None, :], k), None

  init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.full((q.shape[0], k), -1, jnp.int32))
  return jax.lax.scan(step, init, (gallery, gid, gvalid))[0]


@functools.partial(jax.jit, static_argnames=("k", "n", "mesh"))
def _topk_on_mesh(qblocks, qids, qvalid, gblocks, gids, gvalid, k: int, n: int,
                  mesh: Mesh):
  """Each device maps over its query blocks; the first n rows come back, masked."""
  def local(qblocks, qids):
    return jax.lax.map(lambda a: _block_topk(*a, gblocks, gids, gvalid, k),
                       (qblocks, qids))

  data = P(parallel.DATA_AXIS)
  scores, index = jax.shard_map(local, mesh=mesh, in_specs=(data, data),
                                out_specs=(data, data), check_vma=False)(qblocks, qids)
  keep = qvalid.reshape(-1)[:n, None]
  return (jnp.where(keep, scores.reshape(-1, k)[:n], -jnp.inf),
          jnp.where(keep, index.reshape(-1, k)[:n], -1))


def topk_call(queries: Any, gallery: Any, k: int, block: int = 1024, *,
              gallery_block: int = 0, query_mask: Any = None, gallery_mask: Any = None,
              exclude_self: bool = False, mesh: Mesh | None = None
              ) -> tuple[Callable[..., tuple[jax.Array, jax.Array]], list[jax.Array]]:
  """(fn, args): `fn(*args)` is blockwise_topk's result, its inputs already padded
  and placed on the devices, so a benchmark can compile and time the device part
  alone. Bad input is refused here, before any compute."""
  queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
  q_mask, g_mask = _mask(query_mask, len(queries)), _mask(gallery_mask, len(gallery))
  if exclude_self and len(queries) != len(gallery):
    raise ValueError(f"exclude_self needs the queries to be the gallery, got "
                     f"{len(queries)} queries and {len(gallery)} gallery rows.")
  if block < 1 or gallery_block < 0:
    raise ValueError(f"block={block} must be >= 1 and gallery_block={gallery_block} "
                     ">= 0 (0: the whole gallery).")
  check_k(k, g_mask, exclude_self)
  mesh = mesh or parallel.make_mesh()
  q_blocks = -(-len(queries) // (block * mesh.size)) * mesh.size
  g_block = min(gallery_block or len(gallery), len(gallery))
  g_blocks = -(-len(gallery) // g_block)
  qids = np.arange(len(queries)) if exclude_self else np.full(len(queries), -1)
  data, rep = NamedSharding(mesh, P(parallel.DATA_AXIS)), NamedSharding(mesh, P())
  args = [(_pad_blocks(_normalized(queries), block, q_blocks, 0.0), data),
          (_pad_blocks(qids.astype(np.int32), block, q_blocks, -1), data),
          (_pad_blocks(q_mask, block, q_blocks, False), data),
          (_pad_blocks(_normalized(gallery), g_block, g_blocks, 0.0), rep),
          (_pad_blocks(np.arange(len(gallery), dtype=np.int32), g_block, g_blocks, -1), rep),
          (_pad_blocks(g_mask, g_block, g_blocks, False), rep)]
  fn = functools.partial(_topk_on_mesh, k=k, n=len(queries), mesh=mesh)
  return fn, [jax.device_put(x, s) for x, s in args]


def blockwise_topk(queries: Any, gallery: Any, k: int, block: int = 1024, *,
                   gallery_block: int = 0, query_mask: Any = None,
                   gallery_mask: Any = None, exclude_self: bool = False,
                   mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact top-k cosine neighbours of every query: (similarities, indices), [Nq, k].

  Embeddings are L2-normalised here. `block` queries at a time run against
  `gallery_block` gallery rows at a time (0: the whole gallery), so the devices hold
  O(block x gallery_block) similarities, never Nq x Ng. Query blocks are sharded
  over `mesh` (default: all devices). With `exclude_self` the queries are the
  gallery and query i never retrieves gallery row i. Rows with mask 0 are never
  neighbours; their own rows come back as -inf / -1. Ties: the lower index first.
  """
  fn, args = topk_call(queries, gallery, k, block, gallery_block=gallery_block,
                       query_mask=query_mask, gallery_mask=gallery_mask,
                       exclude_self=exclude_self, mesh=mesh)
  return fn(*args)


def topk_memory_bytes(n_queries: int, n_gallery: int, dim: int, k: int, block: int,
                      gallery_block: int = 0, devices: int = 1) -> dict[str, int]:
  """Bytes the blockwise top-k holds per device, from the shapes (float32, int32).

  'block_working': one query block's similarities (block x gallery_block), its
  candidates (block x (k + gallery_block), scores and indices) and running top-k:
  O(block x N) with the whole gallery as one block. 'inputs' and 'outputs' are the
  embeddings and this device's share of the [Nq, k] result. 'full_matrix' is the
  Nq x Ng similarity matrix that is never built, for comparison.
  """
  g = min(gallery_block or n_gallery, n_gallery)
  local_queries = -(-n_queries // (block * devices)) * block
  n_gallery_padded = -(-n_gallery // g) * g
  working = 4 * block * (g + 2 * (k + g) + 2 * k)
  inputs = 4 * (local_queries * (dim + 2) + n_gallery_padded * (dim + 2))
  outputs = 8 * local_queries * k
  return {"block_working": working, "inputs": inputs, "outputs": outputs,
          "total": working + inputs + outputs, "full_matrix": 4 * n_queries * n_gallery}


def same_class_counts(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """R of MAP@R: how many other real examples share each example's label."""
  _, inverse, counts = np.unique(labels[mask], return_inverse=True, return_counts=True)
  r = np.zeros(len(labels), np.int32)
  r[mask] = counts[inverse] - 1
  return r


@functools.partial(jax.jit, static_argnames=("ks",))
def _hit_counts(index, labels, r, valid, ks: tuple[int, ...]):
  """(queries with a hit in their first K, for every K; the sum of the queries'
  average precision at R), over the real queries, on the devices."""
  hits = (labels[jnp.maximum(index, 0)] == labels[:, None]) & (index >= 0)
  hits = hits & valid[:, None]
  found = jnp.stack([jnp.sum(jnp.any(hits[:, :k], axis=1)) for k in ks])
  rank = jnp.arange(1, index.shape[1] + 1)
  precision = jnp.cumsum(hits, axis=1) / rank
  within = rank[None, :] <= r[:, None]
  average = jnp.sum(hits * precision * within, axis=1) / jnp.maximum(r, 1)
  return found, jnp.sum(average)


def retrieval_scores(embeddings: Any, labels: Any, ks: Sequence[int], *,
                     mask: Any = None, block: int = 1024, gallery_block: int = 0,
                     mesh: Mesh | None = None) -> dict[str, float]:
  """{'recall_at_K': ..., 'map_at_r': ...}: every real example queries all the others.

  Recall@K: the fraction of queries with a same-label example among their K
  nearest neighbours (itself excluded). MAP@R (Musgrave et al. 2020): for a query
  with R other same-label examples, the mean over its first R neighbours of
  precision@i at each i that hits; averaged over the queries with R >= 1 (a lone
  query has nothing to retrieve; 0 when no query has a positive).
  """
  labels, valid = np.asarray(labels), _mask(mask, len(labels))
  if len(labels) != len(embeddings):
    raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels.")
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("Recall@K needs at least one K.")
  check_k(max(ks), valid, exclude_self=True)
  r = same_class_counts(labels, valid)
  depth = max(max(ks), int(r.max()))
  _, index = blockwise_topk(embeddings, embeddings, depth, block, gallery_block=gallery_block,
                            query_mask=valid, gallery_mask=valid, exclude_self=True,
                            mesh=mesh)
  found, precision_sum = _hit_counts(index, jnp.asarray(labels), jnp.asarray(r),
                                     jnp.asarray(valid), ks)
  out = {f"recall_at_{k}": int(n) / int(valid.sum()) for k, n in zip(ks, np.asarray(found))}
  scored = int(np.sum(valid & (r > 0)))
  return out | {"map_at_r": float(precision_sum) / scored if scored else 0.0}


def recall_at_k(embeddings: Any, labels: Any, ks: Sequence[int], **options: Any
                ) -> dict[int, float]:
  """{K: Recall@K} of every example querying all the others (retrieval_scores)."""
  scores = retrieval_scores(embeddings, labels, ks, **options)
  return {int(k): scores[f"recall_at_{k}"] for k in ks}


def _sq_dist(x: jax.Array, c: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x - c), axis=-1)


def _kmeans_pp(x: jax.Array, valid: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k-means++ seeds (Arthur & Vassilvitskii 2007): each new centre is a real row
  drawn with probability proportional to its squared distance to the nearest centre."""
  first_key, key = jax.random.split(key)
  first = jax.random.categorical(first_key, jnp.log(valid.astype(jnp.float32)))
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.where(valid, _sq_dist(x, x[first]), 0.0)

  def body(i, state):
    centres, d2 = state
    # With fewer distinct rows than k every distance is 0: draw any real row.
    logits = jnp.where(jnp.sum(d2) > 0, jnp.log(d2), jnp.log(valid.astype(jnp.float32)))
    c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
    return centres.at[i].set(c), jnp.where(valid, jnp.minimum(d2, _sq_dist(x, c)), 0.0)

  return jax.lax.fori_loop(1, k, body, (centres, d2))[0]


def _assign(x: jax.Array, centres: jax.Array, block: int) -> jax.Array:
  """Nearest centre of every row, `block` rows at a time (O(block x k) distances);
  ties go to the lower centre index."""
  c2 = jnp.sum(jnp.square(centres), axis=1)
  def one(xb):
    return jnp.argmin(c2[None, :] - 2 * jnp.dot(xb, centres.T, precision=PRECISION), axis=1)
  return jax.lax.map(one, x.reshape(-1, block, x.shape[1])).reshape(-1)


@functools.partial(jax.jit, static_argnames=("k", "block", "max_iters"))
def _kmeans(x, valid, key, k: int, block: int, max_iters: int):
  """Lloyd's iterations from k-means++ seeds until no row changes cluster."""
  weight = valid.astype(x.dtype)

  def update(centres, assign):
    sums = jax.ops.segment_sum(x * weight[:, None], assign, k)
    counts = jax.ops.segment_sum(weight, assign, k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)

  def body(state):
    it, centres, assign, _ = state
    centres = update(centres, assign)
    new = _assign(x, centres, block)
    return it + 1, centres, new, jnp.any((new != assign) & valid)

  centres = _kmeans_pp(x, valid, k, key)
  state = (0, centres, _assign(x, centres, block), True)
  state = jax.lax.while_loop(lambda s: (s[0] < max_iters) & s[3], body, state)
  return state[2]


def kmeans(x: Any, num_clusters: int, *, mask: Any = None, seed: int = 0,
           max_iters: int = 100, block: int = 1024) -> np.ndarray:
  """The cluster (0..num_clusters-1) of every row, -1 for masked rows: Lloyd's
  k-means from k-means++ seeds drawn from `seed`, on one device."""
  x = np.asarray(x, np.float32)
  valid = _mask(mask, len(x))
  if not 1 <= num_clusters <= int(valid.sum()):
    raise ValueError(f"k-means: {num_clusters} clusters for {int(valid.sum())} rows; "
                     "use 1 to the number of rows.")
  blocks = -(-len(x) // block)
  assign = _kmeans(jnp.asarray(_pad_blocks(x, block, blocks, 0.0).reshape(-1, x.shape[1])),
                   jnp.asarray(_pad_blocks(valid, block, blocks, False).reshape(-1)),
                   jax.random.key(seed), k=num_clusters, block=block, max_iters=max_iters)
  return np.where(valid, np.asarray(assign)[:len(x)], -1)


def _entropy(counts: np.ndarray, n: int) -> float:
  p = counts[counts > 0] / n
  return float(-np.sum(p * np.log(p)))


def nmi(labels: Any, clusters: Any) -> float:
  """Normalised mutual information, MI / mean(H(labels), H(clusters)) (the
  arithmetic normalisation, sklearn's default); 1 when both are one group."""
  _, a = np.unique(np.asarray(labels), return_inverse=True)
  _, b = np.unique(np.asarray(clusters), return_inverse=True)
  n, width = len(a), int(b.max()) + 1
  if a.max() == b.max() == 0:
    return 1.0
  pairs, joint = np.unique(a.astype(np.int64) * width + b, return_counts=True)
  pa, pb = np.bincount(a) / n, np.bincount(b) / n
  pab = joint / n
  mi = float(np.sum(pab * np.log(pab / (pa[pairs // width] * pb[pairs % width]))))
  if mi <= 0:
    return 0.0
  return mi / ((_entropy(np.bincount(a), n) + _entropy(np.bincount(b), n)) / 2)


def clustering_nmi(embeddings: Any, labels: Any, *, mask: Any = None, seed: int = 0,
                   block: int = 1024) -> float:
  """NMI of k-means on the L2-normalised embeddings, k = the number of classes
  among the real examples, against their labels."""
  labels, valid = np.asarray(labels), _mask(mask, len(labels))
  k = len(np.unique(labels[valid]))
  clusters = kmeans(_normalized(np.asarray(embeddings, np.float32)), k, mask=valid,
                    seed=seed, block=block)
  return nmi(labels[valid], clusters[valid])


@dataclasses.dataclass(frozen=True)
class ClassSplit:
  """A dataset's standard zero-shot protocol: which images train the embedding and
  which are queried, by class (None: every class of that split), and its Ks."""
  train_split: str
  test_split: str
  train_classes: tuple[int, ...] | None
  test_classes: tuple[int, ...] | None
  ks: tuple[int, ...]
  label_key: str = "label"


CLASS_SPLITS: Registry[ClassSplit] = Registry("retrieval benchmark")
CLASS_SPLITS.add("caltech_birds2011", ClassSplit(
    "train+test", "train+test", tuple(range(100)), tuple(range(100, 200)), (1, 2, 4, 8)))
CLASS_SPLITS.add("cars196", ClassSplit(
    "train+test", "train+test", tuple(range(98)), tuple(range(98, 196)), (1, 2, 4, 8)))
# SOP by its Ebay_train.txt / Ebay_test.txt files: 11,318 and 11,316 class_ids.
CLASS_SPLITS.add("stanford_online_products", ClassSplit(
    "train", "test", None, None, (1, 10, 100, 1000), label_key="class_id"))


def check_disjoint(train_classes: Any, test_classes: Any,
                   what: str = "the train and test classes") -> None:
  """Zero-shot retrieval is meaningless when a test class was trained on."""
  shared = sorted(set(np.asarray(train_classes).ravel().tolist())
                  & set(np.asarray(test_classes).ravel().tolist()))
  if shared:
    raise ConfigError(f"{what} overlap in {len(shared)} class(es) (first: "
                      f"{shared[:5]}); zero-shot retrieval needs disjoint classes.")


def split_indices(split: ClassSplit, train_labels: Any, test_labels: Any
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(indices of the training images in train_split, of the test images in
  test_split), after refusing classes that fall on both sides."""
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if split.train_classes is not None and split.test_classes is not None:
    check_disjoint(split.train_classes, split.test_classes)
  pick = lambda labels, classes: (np.arange(len(labels)) if classes is None
                                  else np.flatnonzero(np.isin(labels, classes)))
  train = pick(train_labels, split.train_classes)
  test = pick(test_labels, split.test_classes)
  check_disjoint(np.unique(train_labels[train]), np.unique(test_labels[test]),
                 f"the {split.train_split} and {split.test_split} images' classes")
  return train, test
