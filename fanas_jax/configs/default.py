"""The paper's settings (SPEC.md 3-5) on the embedded digits dataset.

Every other config imports this one and overrides what it must. Variants are chosen
with `--config=configs/default.py:VARIANT`.
"""
import ml_collections

from fanas_jax.ops.layers import ORIGINAL_OPS

STAGES = "search_phase1,search_phase2,derive,train,retrieval"
# The tiny variants' search space (quickstart.py:tiny, paper/cifar_search.py:tiny). Its
# compile time grows with the bottlenecks it traces, so only stage 1 mixes two
# candidates and stages 2-5 hold one op each, in one layer per stage: 6 bottlenecks,
# against 30 with both candidates in every stage's 3 layers.
TINY_CANDIDATES = (("local3_h4", "nonlocal"),) + (("local3_h4",),) * 4
TINY_LAYERS_PER_STAGE = 1


def tiny_search_space(c: ml_collections.ConfigDict) -> None:
  """The tiny variants' search space, set on config c."""
  c.search.candidates = TINY_CANDIDATES
  c.search.layers_per_stage = TINY_LAYERS_PER_STAGE


def evals(**entries) -> ml_collections.ConfigDict:
  """A stage's evaluations (fanas_jax/evaluators.py): NAME -> dict(type=..., split=...,
  every_epochs=N (0: after the last epoch only), options); logged as NAME/metric."""
  return ml_collections.ConfigDict({k: dict(v) for k, v in entries.items()})


def augmentation(**overrides) -> dict:
  """A stage's training augmentation (fanas_jax/data/transforms.py), applied in this order."""
  keys = dict(
      resize="stretch",       # 'stretch': to resize_size square; 'shorter_side': the shorter
                              # side to resize_size (aspect kept); then a centre crop to image_size
      resize_size=0,          # 0 = image_size
      random_resized_crop=False,  # instead: torchvision's RandomResizedCrop (scale (0.08, 1),
                                  # ratio (3/4, 4/3)) of the stored image to image_size
      crop_padding=0,         # >0: random image_size window of the image zero-padded by this
      flip=False,             # random horizontal flip (probability 1/2)
      color_jitter=(),        # () or (brightness, contrast, saturation, hue): torchvision's
                              # ColorJitter, the four in a random order
  )
  keys.update(overrides)
  return keys


def evaluation(**overrides) -> dict:
  """How a stage's evaluation images are sized: resize, then a centre crop to image_size."""
  keys = dict(
      eval_resize="stretch",  # 'stretch' (to eval_resize_size square) or 'shorter_side'
      eval_resize_size=0,     # 0 = image_size
  )
  keys.update(overrides)
  return keys


def search_phase(**overrides) -> ml_collections.ConfigDict:
  """DARTS optimisation settings shared by both search phases."""
  phase = ml_collections.ConfigDict(dict(
      objective="car",
      dataset="",             # '' = config.dataset; or a dataset name for this phase only
      split="train",          # divided 50/50 into a weight and an architecture half
      epochs=20,
      batch_size=32,
      # Weight lr: cosine from w_lr to w_lr_min, stepped once per epoch (as PyTorch's
      # CosineAnnealingLR stepped each epoch).
      w_lr=0.025, w_lr_min=0.0, w_momentum=0.9, w_weight_decay=3e-4, grad_clip=5.0,
      a_lr=3e-4, a_b1=0.5, a_b2=0.999, a_weight_decay=1e-3,
      alpha_init_std=1e-3,
      # Ours, not the authors' (0 keeps their Adam): alpha's Adam moves it about lr per
      # step, so a phase with fewer alpha steps than the paper's hardly moves it. N > 0:
      # alpha's Adam runs as if over N steps: lr = a_lr x N / this phase's alpha steps
      # (at most alpha_lr_scale_max x), 1 - b2 scaled alike (optim.alpha_b2).
      # The paper's phases take about 39,580 (20 epochs of half of ImageNet-100's
      # 126,689 images) and 39,050 (50 epochs of 25,000 CIFAR-10 images) alpha steps.
      alpha_reference_steps=0,
      alpha_lr_scale_max=1000.0,
      mode="first_order",     # alpha gradient: 'first_order', 'second_order' or 'gumbel'
      warmup_epochs=0,        # weight-only epochs before alpha starts to move
      gumbel_tau_max=10.0,    # gumbel: temperature at the first step, decaying linearly
      gumbel_tau_min=0.1,     # ... to this at the phase's last step
      init_alpha_from="",     # '' = fresh alphas; or a stage name
      **augmentation(flip=True),
      num_boxes=4,            # CAR: zeroed boxes per image
      box_size=8,
      cpc=ml_collections.ConfigDict(dict(  # objective='cpc' (fanas_jax/cpc.py)
          patch_size=8, patch_stride=4,    # 7x7 grid of patches at 32x32
          embed_dim=64,                    # patch embedding z
          context_layers=2, context_heads=4,
          offsets=(1, 2),                  # predict z this many rows below
      )),
      evals=evals(),          # e.g. evals.rec = dict(type='reconstruction', split='test')
  ))
  phase.update(overrides)
  return phase


def _model() -> ml_collections.ConfigDict:
  """The network: the supernet's width, stem and dtype, and where ours may differ
  from the authors'."""
  return ml_collections.ConfigDict(dict(
      width=16,               # search supernet width C
      stem="attention",       # 'attention' (32x32 inputs) or 'conv' (224x224)
      dtype="float32",        # compute dtype: 'float32' or 'bfloat16' (params stay f32)
      attention_impl="blocked",  # local attention: 'blocked' (fast), 'dense' (small maps) or 'scan' (lean)
      supernet_impl="per_op",  # mixture layers: 'per_op' (a bottleneck per candidate),
                              # 'stacked' (all candidates over one op axis, one attention
                              # per head count) or 'stacked_window' (one per window too)
      # Where ours may differ from the authors' network (their values here):
      border="zero_pad",      # local attention at the map's edges: 'zero_pad' (padded
                              # zeros stay in the softmax) or 'mask' (left out of it)
      relu_after_add=False,   # True: ReLU after each bottleneck's residual add
      zero_init_residual=False,  # True: each bottleneck's last BN scale starts at 0
  ))


def _search() -> ml_collections.ConfigDict:
  """The search space, and how many searches run at once."""
  # One tuple of op names for every stage, or a tuple of 5 tuples (one per stage).
  return ml_collections.ConfigDict(dict(
      candidates=tuple(ORIGINAL_OPS),
      layers_per_stage=3,     # the paper's 3; a reduce stage's first one has stride 2
      # N > 1: each search phase runs N independent searches in one compiled program;
      # seed s is the single search with seed + s (its own init, data order, masks
      # and noise). result.json gives seed 0's keys plus every seed's alphas and
      # genotype (seed_alphas, seed_genotypes, seed_epochs).
      num_seeds=1,
  ))


def _derive() -> ml_collections.ConfigDict:
  """The discrete architecture from the last search phase's alphas."""
  return ml_collections.ConfigDict(dict(
      rule="constrained", max_window7=1, max_global=1, select="last",
      # Optional caps on the derived network at train.width and image_size
      # (0 = none): solved exactly together with the per-stage limits.
      max_params=0, max_macs=0))


def _train() -> ml_collections.ConfigDict:
  """Training the derived network (SPEC.md 5)."""
  return ml_collections.ConfigDict(dict(
      genotype="searched",    # or a named genotype, e.g. 'original'
      init="scratch",         # 'scratch' (the authors' protocol) or 'supernet': start
                              # from the chosen ops' weights of the last search phase
                              # (needs width = model.width; fanas_jax/inherit.py)
      dataset="",             # '' = config.dataset; or a dataset name for this stage only
      width=96, split="train", eval_split="test",
      epochs=500, batch_size=56,
      lr=0.04, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      # Per epoch: warm-up from warmup_from x lr to lr over warmup_epochs, then cosine
      # down to lr_min_factor x lr (a multiple of lr, not an absolute lr).
      warmup_epochs=20, warmup_from=0.3, lr_min_factor=1e-4,
      dropout=0.5,
      label_smoothing=0.0,    # cross-entropy against (1 - s) one-hot + s / classes
      **augmentation(crop_padding=4, flip=True),
      **evaluation(),
      evals=evals(),          # e.g. evals.val = dict(type='top1', split='test', every_epochs=5)
  ))


def _finetune() -> ml_collections.ConfigDict:
  """Fine-tuning a trained network on another classification task."""
  # Not in the default stages; the paper gives no recipe, this is the common one: SGD,
  # cosine, a 10x head.
  return ml_collections.ConfigDict(dict(
      pretrained="train",     # a stage of this workdir (train, retrieval), a
                              # final_variables.msgpack (or a stage dir holding one), or
                              # an orbax checkpoint step dir (RUN/train/checkpoints/STEP)
      genotype="pretrained",  # the architecture the weights name; or a named genotype or
                              # a genotype.json, which must match the weights
      dataset="",             # '' = config.dataset; or a dataset name for this stage only
      split="train", eval_split="test",
      epochs=30, batch_size=56,
      lr=0.01, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      warmup_epochs=0, warmup_from=1.0, lr_min_factor=0.0,
      dropout=0.0, label_smoothing=0.0,
      head_lr_mult=10.0,      # the new head's lr = head_lr_mult x lr
      freeze_bn=False,        # True: the backbone's BN runs on (and keeps) its statistics
      freeze=(),              # parts that do not move: 'stem', 'stage1', ..., 'stage5'
      **augmentation(crop_padding=4, flip=True),
      **evaluation(),
      evals=evals(),
  ))


def _retrieval() -> ml_collections.ConfigDict:
  """Zero-shot retrieval: train an embedding on some classes, rank the others."""
  return ml_collections.ConfigDict(dict(
      dataset="",             # '' = config.dataset; or a dataset name for this stage only
      width=96, split="train+test",
      eval_split="",          # '' = split: the split the test classes are read from
      train_classes=tuple(range(0, 5)), test_classes=tuple(range(5, 10)),
      embed_dim=512, recall_ks=(1, 2, 4, 8),
      loss="proxy_anchor",    # or 'multi_similarity'
      pa_alpha=32.0, pa_margin=0.1,   # proxy-anchor (Kim et al. 2020)
      # multi-similarity (Wang et al. 2019): alpha, beta, lambda (base), mining epsilon
      ms_alpha=2.0, ms_beta=50.0, ms_base=0.5, ms_epsilon=0.1,
      epochs=100, batch_size=56,
      lr=0.04, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      warmup_epochs=5, warmup_from=0.3, lr_min_factor=1e-4,  # as in train
      dropout=0.0,
      # Starting from trained weights (as finetune does): '' = from scratch (train.genotype
      # at width); else a stage of this workdir (train), RUN/train, a
      # final_variables.msgpack or an orbax checkpoint step dir, whose backbone is
      # copied; the embedding head is new.
      pretrained="",
      genotype="pretrained",  # with pretrained: the weights' architecture, or a named
                              # genotype or genotype.json that must match them
      head_lr_mult=1.0,       # the embedding head's (and proxies') lr = head_lr_mult x lr
      freeze_bn=False,        # with pretrained: the backbone's BN keeps its statistics
      freeze=(),              # with pretrained: parts that do not move ('stem', 'stage1'..)
      **augmentation(crop_padding=4, flip=True),
      **evaluation(),
      evals=evals(),          # e.g. evals.r = dict(type='recall_at_k', split='test', ks=(1, 2))
  ))


def _baseline() -> ml_collections.ConfigDict:
  """The random-architecture baseline (not in the default stages): num_genotypes random
  genotypes within the derive limits (and budget) trained with the train block's
  recipe and config.seed; the genotype train trained is ranked among them."""
  return ml_collections.ConfigDict(dict(
      num_genotypes=8,
      sample_seed=0,          # which random genotypes are drawn (with config.seed)
  ))


def _checkpoint() -> ml_collections.ConfigDict:
  """Checkpoints of every training stage (workdir/<stage>/checkpoints, orbax); a rerun
  of the same command resumes from the newest one that restores."""
  return ml_collections.ConfigDict(dict(
      every_steps=0,          # also save every N steps (0: only at each epoch end)
      keep=2,                 # the newest N checkpoints stay, older ones are deleted...
      keep_every_epochs=0,    # ... except those at every Nth epoch end (0: none)
      nan_policy="stop",      # non-finite loss/grad: 'stop' (error naming stage, step,
                              # last good checkpoint) or 'rollback' (restore the last
                              # good checkpoint, skip that batch, log it, go on)
      max_rollbacks=3,        # rollback: stop once a stage has skipped this many batches
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = "sklearn_digits"
  c.data_dir = ""             # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  # Or dataset = "folder:/path/ROOT" for images in ROOT/SPLIT/CLASS/*.jpg|png|...
  c.bad_examples = "raise"    # an undecodable/misshapen/mislabelled example: 'raise' or
                              # 'skip' (train: next good example; eval: masked out)
  c.data_workers = 0          # grain worker processes building training batches (0: threads)
  c.compile_cache = "default"  # XLA compilation cache: 'default' ($JAX_COMPILATION_CACHE_DIR,
                              # else ~/.cache/fanas_jax/xla), 'off', or a directory
  c.image_size = 32
  c.stages = STAGES
  c.eval_batch_size = 256
  # Data parallelism: batch sizes are global (split over all devices and processes).
  c.num_devices = 0           # size of the 1-D 'data' mesh; 0 = every device present
  c.lr_reference_batch = 0    # 0: lrs as given; N: weight lrs x global batch / N (linear rule)

  c.model = _model()
  c.search = _search()
  # Phase 1: shorter side to 40, centre 32, flip; phase 2: crop 32 of padding 4, flip.
  c.search_phase1 = search_phase(objective="car", epochs=20, resize="shorter_side",
                                 resize_size=40)
  c.search_phase2 = search_phase(objective="supervised", epochs=50, a_lr=1e-4,
                                 init_alpha_from="search_phase1", crop_padding=4)
  c.derive = _derive()
  c.train = _train()
  c.finetune = _finetune()
  c.retrieval = _retrieval()
  c.baseline = _baseline()
  c.checkpoint = _checkpoint()
  return c
