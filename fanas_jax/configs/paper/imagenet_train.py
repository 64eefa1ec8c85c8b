"""ImageNet training of a genotype with the authors' recipe (SPEC.md 5).

C=112 with the convolutional stem at 224x224, 200 epochs, batch 58, SGD lr 0.04
(momentum 0.9, weight decay 3e-5, clipping 5) cosine-annealed to 0 per epoch
without warm-up, label smoothing 0.1, dropout 0.25; training images:
random-resized crop 224 + flip + colour jitter (0.4, 0.4, 0.4, 0.2);
evaluation: shorter side to 256, centre crop 224, on the validation split.

Variants: 'original' (default) or 'searched' (a genotype derived in the same
workdir); 'tiny': 64x64 inputs, width 16, one epoch, in seconds.

  python -m fanas_jax.main --config=configs/paper/imagenet_train.py --workdir=DIR
"""
from fanas_jax.configs import default
from fanas_jax.configs.paper import _variants


def get_config(arg: str | None = None):
  variants = _variants.parse(arg, ("original", "searched", "tiny"), "imagenet_train")
  if {"original", "searched"} <= variants:
    raise ValueError("imagenet_train: choose one of the variants original, searched.")
  c = default.get_config()
  c.stages = "train"
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.model.stem = "conv"
  c.train.update(dict(
      genotype="searched" if "searched" in variants else "original", width=112,
      split="train", eval_split="validation", epochs=200, batch_size=58,
      lr=0.04, momentum=0.9, weight_decay=3e-5, grad_clip=5.0,
      warmup_epochs=0, warmup_from=1.0, lr_min_factor=0.0,
      dropout=0.25, label_smoothing=0.1,
      resize="stretch", resize_size=0, random_resized_crop=True,
      crop_padding=0, flip=True, color_jitter=(0.4, 0.4, 0.4, 0.2),
      eval_resize="shorter_side", eval_resize_size=256))
  if "tiny" in variants:
    c.image_size = 64                   # the conv stem needs a multiple of 32
    c.train.update(dict(width=16, epochs=1, batch_size=4,
                        eval_resize_size=73))  # 256/224 of 64
    c.eval_batch_size = 8
  return c
