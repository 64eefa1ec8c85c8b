"""The paper's two-phase search for CIFAR-10 (SPEC.md 3-4), then derive.

Phase 1: context auto-regression on the 100 ImageNet classes at 32x32
(dataset imagenet100_32): shorter side to 40, centre crop 32, flip. Phase 2:
supervised on CIFAR-10, alphas from phase 1, random crop 32 of padding 4 +
flip. Both: 50/50 weight/architecture halves, batch 32, weight lr 0.025
cosine-annealed to 0 per epoch. Derive: at most one 7x7 and one non-local op per
stage, solved exactly (derive.rule='constrained', the default);
derive.rule='greedy' is the authors' layer-by-layer parser under the same limits.

  python -m fanas_jax.main --config=configs/paper/cifar_search.py --workdir=DIR
  (:tiny runs it in seconds on small data: the test's fabricated datasets)
"""
from fanas_jax.configs import default
from fanas_jax.configs.paper import _variants


def get_config(arg: str | None = None):
  variants = _variants.parse(arg, ("tiny",), "cifar_search")
  c = default.get_config()
  c.stages = "search_phase1,search_phase2,derive"
  c.dataset = "cifar10"
  c.image_size = 32
  c.search_phase1.dataset = "imagenet100_32"
  c.search_phase1.update(dict(objective="car", epochs=20, batch_size=32,
                              resize="shorter_side", resize_size=40, flip=True,
                              crop_padding=0, w_lr_min=0.0))
  c.search_phase2.update(dict(objective="supervised", epochs=50, batch_size=32,
                              resize="stretch", resize_size=0, crop_padding=4,
                              flip=True, w_lr_min=0.0,
                              init_alpha_from="search_phase1"))
  if "tiny" in variants:
    default.tiny_search_space(c)  # 1 layer per stage; 2 ops in stage 1, 1 in the others
    for phase in (c.search_phase1, c.search_phase2):
      phase.epochs = 1
      phase.batch_size = 8
  return c
