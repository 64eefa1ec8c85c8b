"""Zero-shot retrieval against independent references: the blockwise top-k against a
full sort, Recall@K and MAP@R against per-query numpy loops (with ties and padded
rows), NMI against sklearn, k-means as a fixed point of Lloyd's step, the
multi-similarity loss against the paper's formulas, the class splits, bad input."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from fanas_jax.configs import quickstart
from fanas_jax import experiment, retrieval
from fanas_jax.config_checks import validate
from fanas_jax.objectives import make_objective, multi_similarity_loss
from fanas_jax.registry import ConfigError
from tests import small_genotype


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tied(rng, n, dim=8, patterns=5):
  """Rows of +-0.5 on 4 coordinates: unit norm and every dot product a multiple of
  0.25, exact in float32, and only `patterns` distinct rows, so ties abound."""
  base = np.zeros((patterns, dim), np.float32)
  for p in range(patterns):
    cols = rng.choice(dim, 4, replace=False)
    base[p, cols] = 0.5 * rng.choice([-1, 1], 4)
  return base[rng.integers(0, patterns, n)]


def _ranking(e, q, valid, exclude_self):
  """Gallery indices by decreasing cosine, the lower index first among equals."""
  order = [(-float(e[q] @ e[j]), j) for j in range(len(e))
           if valid[j] and not (exclude_self and j == q)]
  return [j for _, j in sorted(order)]


@pytest.mark.parametrize("n, block, gallery_block, k", [
    (37, 8, 5, 6), (50, 16, 0, 1), (23, 64, 7, 22), (41, 1, 41, 3)])
def test_blockwise_topk_equals_a_full_sort(n, block, gallery_block, k):
  x = np.random.default_rng(n).normal(size=(n, 6)).astype(np.float32)
  scores, index = retrieval.blockwise_topk(x, x, k, block, gallery_block=gallery_block,
                                           exclude_self=True)
  sims = _unit(x.astype(np.float64)) @ _unit(x.astype(np.float64)).T
  np.fill_diagonal(sims, -np.inf)
  want = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(index), want)
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(sims, want, 1),
                             atol=1e-6)


def test_queries_against_another_gallery_keep_every_row():
  rng = np.random.default_rng(3)
  q, g = rng.normal(size=(13, 4)), rng.normal(size=(29, 4))
  _, index = retrieval.blockwise_topk(q, g, 29, 4, gallery_block=6)
  want = np.argsort(-(_unit(q) @ _unit(g).T), axis=1, kind="stable")
  np.testing.assert_array_equal(np.asarray(index), want)


def test_ties_go_to_the_lower_index_across_blocks():
  rng = np.random.default_rng(4)
  x = _tied(rng, 45)
  _, index = retrieval.blockwise_topk(x, x, 20, 8, gallery_block=6, exclude_self=True)
  valid = np.ones(45, bool)
  for q in range(45):
    assert list(np.asarray(index[q])) == _ranking(x, q, valid, True)[:20]
  # The data really ties: a query's copies all score 1 and come in index order.
  copies = [j for j in range(45) if j != 0 and np.array_equal(x[j], x[0])]
  assert len(copies) > 3 and list(np.asarray(index[0, :len(copies)])) == copies


def test_padded_rows_are_never_neighbours_nor_queries():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(30, 5)).astype(np.float32)
  valid = rng.random(30) > 0.3
  padded = np.where(valid[:, None], x, 0.0)
  padded[~valid] = x[np.flatnonzero(valid)[:(~valid).sum()]]  # decoys: copies of queries
  scores, index = retrieval.blockwise_topk(padded, padded, 5, 8, gallery_block=7,
                                           query_mask=valid, gallery_mask=valid,
                                           exclude_self=True)
  e = _unit(padded)
  for q in range(30):
    if valid[q]:
      assert list(np.asarray(index[q])) == _ranking(e, q, valid, True)[:5]
    else:
      assert np.all(np.asarray(index[q]) == -1) and np.all(np.isneginf(scores[q]))
  assert not np.isin(np.asarray(index), np.flatnonzero(~valid)).any()


def _loop_recall(e, labels, valid, k):
  queries = np.flatnonzero(valid)
  return np.mean([any(labels[j] == labels[q] for j in _ranking(e, q, valid, True)[:k])
                  for q in queries])


def _loop_map_at_r(e, labels, valid):
  """Musgrave et al.: AP over the first R neighbours, R = the query's other
  same-class examples; lone queries left out."""
  values = []
  for q in np.flatnonzero(valid):
    r = sum(1 for j in np.flatnonzero(valid) if j != q and labels[j] == labels[q])
    if r == 0:
      continue
    found, total = 0, 0.0
    for i, j in enumerate(_ranking(e, q, valid, True)[:r], start=1):
      if labels[j] == labels[q]:
        found += 1
        total += found / i
    values.append(total / r)
  return np.mean(values)


@pytest.mark.parametrize("tied", [False, True])
def test_recall_and_map_at_r_match_numpy_loops_with_padding(tied):
  rng = np.random.default_rng(6)
  n = 53
  x = _tied(rng, n) if tied else rng.normal(size=(n, 6)).astype(np.float32)
  labels = rng.integers(0, 6, n)
  labels[0] = 99                                    # a lone query
  valid = rng.random(n) > 0.2
  valid[0] = True
  got = retrieval.retrieval_scores(x, labels, (1, 2, 4, 8), mask=valid, block=8,
                                   gallery_block=9)
  e = _unit(x)
  for k in (1, 2, 4, 8):
    assert got[f"recall_at_{k}"] == pytest.approx(_loop_recall(e, labels, valid, k), abs=1e-12)
  assert got["map_at_r"] == pytest.approx(_loop_map_at_r(e, labels, valid), rel=1e-6)
  assert 0 < got["map_at_r"] < 1


def test_map_at_r_is_one_for_perfect_clusters():
  labels = np.repeat(np.arange(4), 5)
  x = np.eye(4)[labels] + 0.01 * np.random.default_rng(7).normal(size=(20, 4))
  got = retrieval.retrieval_scores(x, labels, (1,), block=3)
  assert got == pytest.approx({"recall_at_1": 1.0, "map_at_r": 1.0})


def test_nmi_matches_sklearn():
  rng = np.random.default_rng(8)
  for classes, clusters, n in ((5, 5, 200), (3, 7, 50), (10, 2, 120), (1, 4, 30)):
    labels, pred = rng.integers(0, classes, n), rng.integers(0, clusters, n) * 3 + 1
    assert retrieval.nmi(labels, pred) == pytest.approx(
        normalized_mutual_info_score(labels, pred), abs=1e-12)
  same = rng.integers(0, 4, 40)
  assert retrieval.nmi(same, same + 10) == pytest.approx(1.0)
  assert retrieval.nmi(np.zeros(5), np.ones(5)) == normalized_mutual_info_score(
      np.zeros(5), np.ones(5))


def test_kmeans_converges_to_a_fixed_point_of_lloyd():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(150, 4)).astype(np.float32)
  valid = rng.random(150) > 0.1
  assign = retrieval.kmeans(x, 6, mask=valid, seed=1, block=32)
  assert np.all(assign[~valid] == -1) and set(assign[valid]) == set(range(6))
  centres = np.stack([x[valid & (assign == c)].mean(0) for c in range(6)])
  d2 = ((x[valid, None, :] - centres[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argmin(d2, axis=1), assign[valid])
  np.testing.assert_array_equal(assign, retrieval.kmeans(x, 6, mask=valid, seed=1, block=32))


def test_clustering_nmi_recovers_separated_classes():
  rng = np.random.default_rng(10)
  labels = rng.integers(0, 5, 100)
  x = np.eye(8)[labels] + 0.05 * rng.normal(size=(100, 8))
  assert retrieval.clustering_nmi(x, labels, block=16) == pytest.approx(1.0)
  noise = rng.normal(size=(100, 8))
  assert retrieval.clustering_nmi(noise, labels, block=16) < 0.3


def _ms_numpy(emb, labels, alpha, beta, base, eps):
  """Wang et al. 2019, eqs. (4), (6), (7), one anchor at a time."""
  s = emb @ emb.T
  total = 0.0
  for i in range(len(emb)):
    pos = [j for j in range(len(emb)) if j != i and labels[j] == labels[i]]
    neg = [j for j in range(len(emb)) if labels[j] != labels[i]]
    kept_neg = [j for j in neg if pos and s[i, j] + eps > min(s[i, p] for p in pos)]
    kept_pos = [j for j in pos if neg and s[i, j] - eps < max(s[i, n] for n in neg)]
    total += np.log(1 + sum(np.exp(-alpha * (s[i, j] - base)) for j in kept_pos)) / alpha
    total += np.log(1 + sum(np.exp(beta * (s[i, j] - base)) for j in kept_neg)) / beta
  return total / len(emb)


def test_multi_similarity_loss_matches_the_paper():
  rng = np.random.default_rng(11)
  emb = _unit(rng.normal(size=(16, 5)))
  labels = rng.integers(0, 4, 16)
  labels[0] = 9                                     # an anchor without positives
  for params in ((2.0, 50.0, 0.5, 0.1), (1.0, 10.0, 0.3, 0.3)):
    got = multi_similarity_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), *params)
    assert float(got) == pytest.approx(_ms_numpy(emb, labels, *params), rel=1e-4)
  objective = make_objective("multi_similarity", ml_collections.ConfigDict(dict(
      ms_alpha=2.0, ms_beta=50.0, ms_base=0.5, ms_epsilon=0.1)))
  value, metrics = objective.loss({"embedding": jnp.asarray(emb, jnp.float32)},
                                  jnp.asarray(labels))
  assert objective.head == "embedding"
  assert float(value) == pytest.approx(_ms_numpy(emb, labels, 2.0, 50.0, 0.5, 0.1), rel=1e-4)
  assert float(metrics["multi_similarity"]) == float(value)


def test_multi_similarity_gradient_matches_finite_differences():
  rng = np.random.default_rng(12)
  emb = jnp.asarray(_unit(rng.normal(size=(10, 4))), jnp.float64 if jax.config.x64_enabled
                    else jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 10))
  loss = lambda e: multi_similarity_loss(e, labels, 2.0, 10.0, 0.5, 0.1)
  grad = np.asarray(jax.grad(loss)(emb))
  direction = rng.normal(size=emb.shape).astype(np.float32)
  h = 1e-3
  numeric = (float(loss(emb + h * direction)) - float(loss(emb - h * direction))) / (2 * h)
  assert np.sum(grad * direction) == pytest.approx(numeric, rel=2e-2)
  assert np.abs(grad).sum() > 0


def test_standard_class_splits():
  cub, cars = (retrieval.CLASS_SPLITS.get(n) for n in ("caltech_birds2011", "cars196"))
  assert (cub.train_classes, cub.test_classes) == (tuple(range(100)), tuple(range(100, 200)))
  assert (cars.train_classes, cars.test_classes) == (tuple(range(98)), tuple(range(98, 196)))
  assert cub.ks == cars.ks == (1, 2, 4, 8)
  sop = retrieval.CLASS_SPLITS.get("stanford_online_products")
  assert (sop.train_split, sop.test_split, sop.label_key, sop.ks) == (
      "train", "test", "class_id", (1, 10, 100, 1000))
  labels = np.random.default_rng(13).integers(0, 200, 1000)
  train, test = retrieval.split_indices(cub, labels, labels)
  assert len(train) + len(test) == 1000 and not set(train) & set(test)
  assert labels[train].max() < 100 <= labels[test].min()
  sop_train, sop_test = retrieval.split_indices(sop, np.arange(5), np.arange(5, 12))
  assert list(sop_train) == list(range(5)) and list(sop_test) == list(range(7))


def test_overlapping_classes_are_one_clear_error():
  sop = retrieval.CLASS_SPLITS.get("stanford_online_products")
  with pytest.raises(ConfigError, match=r"^the train and test images' classes overlap in "
                     r"2 class\(es\) \(first: \[4, 5\]\); zero-shot retrieval needs "
                     r"disjoint classes\.$"):
    retrieval.split_indices(sop, np.arange(6), np.arange(4, 9))
  overlap = retrieval.ClassSplit("train", "train", (0, 1, 2), (2, 3), (1,))
  with pytest.raises(ConfigError, match=r"^the train and test classes overlap in 1 "):
    retrieval.split_indices(overlap, np.arange(4), np.arange(4))
  with pytest.raises(ConfigError, match="valid choices: caltech_birds2011, cars196, "
                     "stanford_online_products"):
    retrieval.CLASS_SPLITS.get("cub")


@pytest.mark.parametrize("call, message", [
    (lambda x: retrieval.retrieval_scores(x, np.zeros(10), (1, 10)),
     r"^K=10 is outside 1\.\.9: each query has 9 other examples to rank; use a K of at "
     r"most 9\.$"),
    (lambda x: retrieval.retrieval_scores(x, np.zeros(10), (1, 9), mask=np.arange(10) < 6),
     r"^K=9 is outside 1\.\.5"),
    (lambda x: retrieval.blockwise_topk(x[:3], x, 11), r"^K=11 is outside 1\.\.10: each "
     r"query has 10 gallery examples"),
    (lambda x: retrieval.blockwise_topk(x, x, 0), r"^K=0 is outside 1\.\.10"),
    (lambda x: retrieval.blockwise_topk(x[:3], x, 2, exclude_self=True),
     r"^exclude_self needs the queries to be the gallery, got 3 queries and 10"),
    (lambda x: retrieval.blockwise_topk(x, x, 2, 0), r"^block=0 must be >= 1"),
    (lambda x: retrieval.retrieval_scores(x, np.zeros(9), (1,)), r"^10 embeddings but 9 labels"),
    (lambda x: retrieval.kmeans(x, 11), r"^k-means: 11 clusters for 10 rows"),
])
def test_bad_input_is_one_line_before_compute(call, message):
  x = np.random.default_rng(14).normal(size=(10, 3))
  with pytest.raises(ValueError, match=message):
    call(x)


def _retrieval_config(**retrieval_options):
  c = quickstart.get_config("tiny")
  c.stages = "retrieval"
  c.train.genotype = "original"
  c.retrieval.update(retrieval_options)
  return c


@pytest.mark.parametrize("options, message", [
    (dict(train_classes=(0, 1, 2), test_classes=(2, 3)),
     "retrieval.train_classes and retrieval.test_classes overlap in 1 class(es) (first: "
     "[2]); zero-shot retrieval needs disjoint classes."),
    (dict(loss="triplet"), "retrieval.loss='triplet' is not a metric-learning loss; "
     "valid choices: proxy_anchor, multi_similarity."),
])
def test_bad_retrieval_config_is_one_line(options, message):
  with pytest.raises(ConfigError) as error:
    validate(_retrieval_config(**options))
  assert str(error.value) == message


@pytest.mark.slow
def test_retrieval_stage_with_multi_similarity_reports_every_metric(tmp_path):
  c = _retrieval_config(loss="multi_similarity", epochs=1)
  c.train.genotype = small_genotype.write(tmp_path / "genotype")
  result = experiment.run(c, str(tmp_path))
  r = result["retrieval"]
  assert r["loss"] == "multi_similarity" and set(r["recall"]) == {"1", "2", "4", "8"}
  assert 0 < r["map_at_r"] <= 1 and 0 <= r["nmi"] <= 1
  assert list(r["recall"].values()) == sorted(r["recall"].values())
