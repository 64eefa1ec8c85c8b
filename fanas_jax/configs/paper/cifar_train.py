"""CIFAR-10 training of a genotype with the authors' recipe (SPEC.md 5).

C=96, attention stem, 500 epochs, batch 56, SGD lr 0.04 (momentum 0.9, weight
decay 1e-4, clipping 5), 20 warm-up epochs from 0.3 x lr then cosine down to
1e-4 x lr (per epoch), dropout 0.5, random crop 32 of padding 4 + flip.

Variants: 'original' (default: the authors' shipped genotype) or 'searched'
(the whole configs/paper/cifar_search.py pipeline first, then training of what
it derived, in one workdir); 'tiny' makes either run in seconds.

  python -m fanas_jax.main --config=configs/paper/cifar_train.py --workdir=DIR
  python -m fanas_jax.main --config=configs/paper/cifar_train.py:searched --workdir=DIR
"""
from fanas_jax.configs import default
from fanas_jax.configs.paper import _variants, cifar_search


def get_config(arg: str | None = None):
  variants = _variants.parse(arg, ("original", "searched", "tiny"), "cifar_train")
  if {"original", "searched"} <= variants:
    raise ValueError("cifar_train: choose one of the variants original, searched.")
  searched = "searched" in variants
  tiny = "tiny" if "tiny" in variants else None
  c = cifar_search.get_config(tiny) if searched else default.get_config()
  c.stages = "search_phase1,search_phase2,derive,train" if searched else "train"
  c.dataset = "cifar10"
  c.image_size = 32
  c.model.stem = "attention"
  c.train.update(dict(
      genotype="searched" if searched else "original", width=96,
      split="train", eval_split="test", epochs=500, batch_size=56,
      lr=0.04, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      warmup_epochs=20, warmup_from=0.3, lr_min_factor=1e-4,
      dropout=0.5, label_smoothing=0.0,
      resize="stretch", resize_size=0, random_resized_crop=False,
      crop_padding=4, flip=True, color_jitter=(),
      eval_resize="stretch", eval_resize_size=0))
  if tiny:
    c.train.update(dict(width=16, epochs=1, batch_size=8, warmup_epochs=0))
    c.eval_batch_size = 16
  return c
