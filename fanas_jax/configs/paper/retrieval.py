"""Zero-shot retrieval benchmarks (SPEC.md 6) from ImageNet-trained weights.

The standard deep-metric-learning protocol: train an embedding on the training
classes, query the held-out classes (every test image queries all the others,
itself excluded). CUB-200-2011: classes 0-99 train, 100-199 test, all 11,788
images; Cars196: 0-97 / 98-195, all 16,185; Stanford Online Products: Ebay_train.txt
(11,318 products) / Ebay_test.txt (11,316), by class_id. A 512-d L2-normalised
embedding and the proxy-anchor loss (alpha 32, margin 0.1) as Kim et al. (2020)
train it: batch of about 180 (192 here, so it splits over 8 to 64 devices),
random-resized crop 224 + flip, evaluation shorter side 256 then centre crop 224,
batch-norm statistics frozen on CUB and Cars. The optimizer is the trainer's:
SGD momentum 0.9, lr 0.01 with the embedding head and the proxies at 10x, weight
decay 1e-4, cosine to 0 per epoch over 60 epochs. Metrics: Recall@K for K = 1, 2,
4, 8 (SOP: 1, 10, 100, 1000), MAP@R and the NMI of k-means with k = the number of
test classes.

Variants: the benchmark, one of 'cub' (default), 'cars', 'sop';
'multi_similarity': that loss instead of proxy-anchor; 'tiny': 32x32, one epoch,
Ks 1 and 2, in seconds.

  python -m fanas_jax.main --config=configs/paper/retrieval.py:cars --workdir=DIR \\
    --config.retrieval.pretrained=RUNS/in1k/train --config.data_dir=DATA_DIR

The weights name the network (genotype and width, as in finegrained.py); the
embedding head and the proxies are new.
"""
from fanas_jax.configs import default
from fanas_jax.configs.paper import _variants
from fanas_jax.retrieval import CLASS_SPLITS

# variant -> dataset; the splits and Ks are fanas_jax.retrieval.CLASS_SPLITS'.
DATASETS = {"cub": "caltech_birds2011", "cars": "cars196", "sop": "stanford_online_products"}
# SOP's labels are class_id - 1: Ebay_train.txt holds 1..11318, Ebay_test.txt the rest.
SOP_TRAIN_CLASSES, SOP_CLASSES = 11318, 22634


def _classes(dataset: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  split = CLASS_SPLITS.get(dataset)
  if split.train_classes is None:
    return tuple(range(SOP_TRAIN_CLASSES)), tuple(range(SOP_TRAIN_CLASSES, SOP_CLASSES))
  return split.train_classes, split.test_classes


def get_config(arg: str | None = None):
  variants = _variants.parse(arg, (*DATASETS, "multi_similarity", "tiny"), "retrieval")
  benchmark = _variants.one_of(variants, tuple(DATASETS), "cub", "retrieval", "benchmark")
  dataset = DATASETS[benchmark]
  split = CLASS_SPLITS.get(dataset)
  train_classes, test_classes = _classes(dataset)
  c = default.get_config()
  c.stages = "retrieval"
  c.dataset = dataset
  c.image_size = 224
  c.model.stem = "conv"
  c.retrieval.update(dict(
      pretrained="",          # the ImageNet run's weights: RUN/train (or a msgpack/checkpoint)
      genotype="pretrained",
      split=split.train_split, eval_split=split.test_split,
      train_classes=train_classes, test_classes=test_classes, recall_ks=split.ks,
      embed_dim=512,
      loss="multi_similarity" if "multi_similarity" in variants else "proxy_anchor",
      pa_alpha=32.0, pa_margin=0.1,
      epochs=60, batch_size=192,
      lr=0.01, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      warmup_epochs=0, warmup_from=1.0, lr_min_factor=0.0,
      dropout=0.0, head_lr_mult=10.0, freeze_bn=benchmark != "sop", freeze=(),
      resize="stretch", resize_size=0, random_resized_crop=True,
      crop_padding=0, flip=True, color_jitter=(),
      eval_resize="shorter_side", eval_resize_size=256))
  if "tiny" in variants:
    c.image_size = 32                   # the conv stem needs a multiple of 32
    c.retrieval.update(dict(epochs=1, batch_size=2, recall_ks=(1, 2),
                            eval_resize_size=37))  # 256/224 of 32
    c.eval_batch_size = 4
  return c
