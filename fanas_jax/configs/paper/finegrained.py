"""Fine-grained recognition (SPEC.md 6): fine-tune an ImageNet-trained network.

The paper gives no recipe; this is the standard one of the fine-grained literature:
the ImageNet weights (configs/paper/imagenet_train.py) with a new classifier head,
SGD momentum 0.9, lr 0.01 (the head at 10x), weight decay 1e-4, cosine to 0 per
epoch over 100 epochs, batch 32, label smoothing 0; training images random-resized
crop 224 + flip, evaluation shorter side 256 then centre crop 224. Top-1 on the test
split.

Variants: the dataset, one of 'cub' (default; caltech_birds2011 train/test), 'cars'
(cars196 train/test), 'aircraft' (fgvc_aircraft trainval/test); '448': 448 crops
(shorter side 512 for evaluation); 'tiny': 32x32, seconds.

  python -m fanas_jax.main --config=configs/paper/finegrained.py:cars --workdir=DIR \\
    --config.finetune.pretrained=RUNS/in1k/train --config.data_dir=DATA_DIR
"""
from fanas_jax.configs import default
from fanas_jax.configs.paper import _variants

# variant -> (dataset, training split, test split)
DATASETS = {"cub": ("caltech_birds2011", "train", "test"),
            "cars": ("cars196", "train", "test"),
            "aircraft": ("fgvc_aircraft", "trainval", "test")}


def get_config(arg: str | None = None):
  variants = _variants.parse(arg, (*DATASETS, "448", "tiny"), "finegrained")
  dataset, split, test_split = DATASETS[_variants.one_of(
      variants, tuple(DATASETS), "cub", "finegrained", "dataset")]
  c = default.get_config()
  c.stages = "finetune"
  c.dataset = dataset
  c.image_size = 448 if "448" in variants else 224
  c.model.stem = "conv"
  c.finetune.update(dict(
      pretrained="",          # the ImageNet run's weights: RUN/train (or a msgpack/checkpoint)
      genotype="pretrained", split=split, eval_split=test_split,
      epochs=100, batch_size=32,
      lr=0.01, momentum=0.9, weight_decay=1e-4, grad_clip=5.0,
      warmup_epochs=0, warmup_from=1.0, lr_min_factor=0.0,
      dropout=0.0, label_smoothing=0.0, head_lr_mult=10.0, freeze_bn=False, freeze=(),
      resize="stretch", resize_size=0, random_resized_crop=True,
      crop_padding=0, flip=True, color_jitter=(),
      eval_resize="shorter_side", eval_resize_size=512 if "448" in variants else 256))
  if "tiny" in variants:
    c.image_size = 32                   # the conv stem needs a multiple of 32
    c.finetune.update(dict(epochs=1, batch_size=2, eval_resize_size=37))  # 256/224 of 32
    c.eval_batch_size = 4
  return c
