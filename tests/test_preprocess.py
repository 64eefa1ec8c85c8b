"""The stage preprocessing (fanas_jax/data/transforms.py) against PIL, colorsys and
torchvision's formulas written out here, plus the pipeline invariants it must keep."""
from __future__ import annotations

import colorsys
import copy
import math

import grain
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance
import pytest

from fanas_jax.configs import default
from fanas_jax.data import datasets, pipeline, transforms

CIFAR = datasets.get_dataset("cifar10")
IMAGENET = datasets.get_dataset("imagenet2012")
ZERO_ONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that keep [0, 1] pixels


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth random RGB image (resampling errors stay small on it)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


def pil_resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def unnormalise(x: np.ndarray, spec) -> np.ndarray:
  return np.round((x * np.float32(spec.std) + np.float32(spec.mean)) * 255.0)


# Geometry.


@pytest.mark.parametrize("h,w,size", [(30, 40, 40), (40, 30, 40), (300, 400, 256),
                                      (32, 32, 40), (57, 19, 24)])
def test_shorter_side_resize_is_torchvision_resize(h, w, size):
  image = rgb(h, w)
  short, long_ = min(h, w), max(h, w)
  new_long = int(size * long_ / short)  # torchvision truncates the long side
  want_h, want_w = (size, new_long) if h <= w else (new_long, size)
  assert transforms.shorter_side_size(h, w, size) == (want_h, want_w)
  got = transforms.resize(image, want_h, want_w)
  assert got.shape == (want_h, want_w, 3)
  if want_h % h or want_w % w:  # PIL bilinear on the RGB image as a whole
    np.testing.assert_array_equal(got, pil_resize(image, want_w, want_h))


@pytest.mark.parametrize("h,w,size", [(40, 40, 32), (41, 53, 32), (256, 341, 224)])
def test_center_crop_is_torchvision_center_crop(h, w, size):
  image = rgb(h, w)
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  np.testing.assert_array_equal(transforms.center_crop(image, size),
                                image[top:top + size, left:left + size])


def test_phase1_recipe_is_shorter_side_40_centre_32_and_flip():
  cfg = default.get_config().search_phase1
  p = pipeline.train_preprocess(cfg, 32, CIFAR)
  assert (p.resize, p.resize_size, p.flip, p.crop_padding) == ("shorter_side", 40, True, 0)
  image = rgb(32, 32, seed=3)
  ref = pil_resize(image, 40, 40)[4:36, 4:36]
  flips = 0
  for seed in range(20):
    got = unnormalise(p(image, np.random.default_rng(seed)), CIFAR)
    if np.array_equal(got, ref[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(got, ref)
  assert 0 < flips < 20


def test_eval_resize_256_centre_224():
  cfg = ml_collections.ConfigDict(dict(eval_resize="shorter_side", eval_resize_size=256))
  p = pipeline.eval_preprocess(cfg, 224, IMAGENET)
  assert not p.is_random
  image = rgb(300, 451, seed=1)
  resized = pil_resize(image, int(256 * 451 / 300), 256)
  top, left = 16, int(round((resized.shape[1] - 224) / 2.0))
  np.testing.assert_array_equal(unnormalise(p(image), IMAGENET),
                                resized[top:top + 224, left:left + 224])


def test_stretch_stays_the_default():
  p = pipeline.train_preprocess(ml_collections.ConfigDict(), 8, CIFAR)
  assert p == transforms.Preprocess(8, CIFAR.mean, CIFAR.std)
  image = rgb(5, 7)
  np.testing.assert_array_equal(unnormalise(p(image), CIFAR), pil_resize(image, 8, 8))


def torchvision_rrc_box(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop.get_params, line by line, drawing from a numpy generator."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("h,w", [(224, 224), (375, 500), (500, 333), (1000, 10), (10, 1000)])
def test_rrc_box_is_torchvisions_and_inside_the_image(h, w):
  areas, ratios = [], []
  for seed in range(300):
    box = transforms.rrc_box(h, w, np.random.default_rng(seed))
    assert box == torchvision_rrc_box(h, w, np.random.default_rng(seed))
    i, j, bh, bw = box
    assert 0 <= i and 0 <= j and 0 < bh and 0 < bw and i + bh <= h and j + bw <= w
    areas.append(bh * bw / (h * w))
    ratios.append(bw / bh)
  if h == w or max(h, w) < 600:
    # Area fraction in (0.08, 1] and aspect in [3/4, 4/3] up to the rounding to pixels.
    assert min(areas) > 0.07 and max(areas) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    assert max(areas) - min(areas) > 0.5  # the scale range is really used
  else:  # No try fits: the centred fallback, clipped to the ratio range.
    assert len(set(areas)) == 1


def test_random_resized_crop_output_is_pil_crop_and_resize_of_the_box():
  p = transforms.Preprocess(64, *ZERO_ONE, random_resized_crop=True)
  image = rgb(120, 90, seed=5)
  for seed in range(5):
    i, j, h, w = transforms.rrc_box(120, 90, np.random.default_rng(seed))
    want = pil_resize(np.ascontiguousarray(image[i:i + h, j:j + w]), 64, 64)
    got = np.round(p(image, np.random.default_rng(seed)) * 255.0)
    if 64 % h or 64 % w:
      np.testing.assert_array_equal(got, want)


def test_padded_crop_is_a_window_of_the_zero_padded_image():
  image = rgb(32, 32)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for seed in range(40):
    got = transforms.padded_crop(image, 4, np.random.default_rng(seed))
    match = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.array_equal(got, padded[dy:dy + 32, dx:dx + 32])]
    assert match
    offsets.update(match)
  assert len(offsets) > 15


# Colour jitter.


def pixels(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (6, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_brightness_and_saturation_match_pil(factor):
  image = pixels()
  x = image.astype(np.float32) / 255.0
  for ours, theirs in ((transforms.adjust_brightness, ImageEnhance.Brightness),
                       (transforms.adjust_saturation, ImageEnhance.Color)):
    want = np.asarray(theirs(Image.fromarray(image)).enhance(factor), np.float32)
    # PIL rounds to uint8 (and its grey uses 299/587/114 per mille).
    np.testing.assert_allclose(ours(x, factor) * 255.0, want, atol=1.6)


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_contrast_blends_with_the_mean_grey_like_pil(factor):
  image = pixels(1)
  x = image.astype(np.float32) / 255.0
  want = np.asarray(ImageEnhance.Contrast(Image.fromarray(image)).enhance(factor), np.float32)
  np.testing.assert_allclose(transforms.adjust_contrast(x, factor) * 255.0, want, atol=2.0)
  grey = (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).mean()
  np.testing.assert_allclose(transforms.adjust_contrast(x, factor),
                             np.clip(factor * x + (1 - factor) * grey, 0, 1), rtol=1e-6)


@pytest.mark.parametrize("shift", [-0.2, 0.05, 0.2, 0.5])
def test_hue_rotates_like_colorsys(shift):
  image = pixels(2)
  image[0, 0] = (10, 10, 10)  # grey: hue undefined, stays grey
  image[0, 1] = (0, 0, 0)
  x = image.astype(np.float64) / 255.0
  want = np.empty_like(x)
  for idx in np.ndindex(x.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    want[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  np.testing.assert_allclose(transforms.adjust_hue(x, shift), want, atol=1e-9)


def test_color_jitter_factors_stay_in_torchvisions_ranges():
  x = (pixels(3).astype(np.float32) / 255.0) * 0.4 + 0.25  # 1.4 x 0.65 < 1: no clipping
  for seed in range(30):
    got = transforms.color_jitter(x, (0.4, 0.0, 0.0, 0.0), np.random.default_rng(seed))
    factor = float(np.median(got / x))
    assert 0.6 - 1e-6 <= factor <= 1.4 + 1e-6
    np.testing.assert_allclose(got, x * factor, rtol=1e-5)
  assert np.array_equal(transforms.color_jitter(x, (0, 0, 0, 0), np.random.default_rng(0)), x)


def test_color_jitter_runs_the_four_in_a_random_order():
  x = pixels(4).astype(np.float32) / 255.0
  rng = np.random.default_rng(7)
  got = transforms.color_jitter(x, (0.4, 0.4, 0.4, 0.2), rng)
  # Replay the draws: three factors, the hue shift, then the order.
  replay = np.random.default_rng(7)
  factors = [replay.uniform(0.6, 1.4) for _ in range(3)] + [replay.uniform(-0.2, 0.2)]
  order = replay.permutation(4)
  fns = (transforms.adjust_brightness, transforms.adjust_contrast,
         transforms.adjust_saturation, transforms.adjust_hue)
  want = x
  for k in order:
    want = fns[k](want, factors[k])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  orders = {tuple(np.random.default_rng(s).permutation(4)) for s in range(20)}
  assert len(orders) > 5


# Through the pipeline.


def records(n: int = 24) -> grain.MapDataset:
  """Variable-size RGB records, as an ImageNet split reads."""
  return grain.MapDataset.source([
      {"image": rgb(40 + 3 * i, 60 - i, seed=i), "label": i % 4, "index": i}
      for i in range(n)])


IMAGENET_RECIPE = dict(random_resized_crop=True, flip=True, color_jitter=(0.4, 0.4, 0.4, 0.2))


def test_imagenet_recipe_batches_are_deterministic_and_resume():
  p = transforms.Preprocess(32, IMAGENET.mean, IMAGENET.std, **IMAGENET_RECIPE)
  kw = dict(batch_size=4, preprocess=p, seed=3, shard_index=1, shard_count=2)
  a, b = pipeline.train_iterator(records(), **kw), pipeline.train_iterator(records(), **kw)
  for _ in range(4):
    x, y = next(a), next(b)
    assert x["image"].shape == (4, 32, 32, 3) and x["image"].dtype == np.float32
    np.testing.assert_array_equal(x["image"], y["image"])
  state = a.get_state()
  want = [next(a) for _ in range(3)]
  resumed = pipeline.train_iterator(records(), **kw)
  resumed.set_state(copy.deepcopy(state))
  for w in want:
    np.testing.assert_array_equal(next(resumed)["image"], w["image"])
  other = pipeline.train_iterator(records(), **dict(kw, seed=4))
  assert not np.array_equal(next(other)["image"], want[0]["image"])


def test_augmentation_does_not_depend_on_the_shard_count():
  p = transforms.Preprocess(32, IMAGENET.mean, IMAGENET.std, **IMAGENET_RECIPE)
  whole = next(pipeline.train_iterator(records(), batch_size=8, preprocess=p, seed=1))
  parts = [next(pipeline.train_iterator(records(), batch_size=4, preprocess=p, seed=1,
                                        shard_index=k, shard_count=2)) for k in range(2)]
  np.testing.assert_array_equal(whole["image"],
                                np.concatenate([q["image"] for q in parts]))


def test_eval_batches_refuse_a_random_preprocess():
  p = transforms.Preprocess(32, *ZERO_ONE, flip=True)
  with pytest.raises(ValueError, match="deterministic preprocess"):
    pipeline.eval_batches(records(), batch_size=4, preprocess=p)


# Validation.


def stage(**keys):
  return ml_collections.ConfigDict({**default.augmentation(), **default.evaluation(),
                                    **keys})


@pytest.mark.parametrize("keys,message", [
    (dict(resize="crop"), r"^train\.resize='crop' is not one of: shorter_side, stretch\.$"),
    (dict(eval_resize="fit"), r"^train\.eval_resize='fit' is not one of: shorter_side, "
     r"stretch\.$"),
    (dict(resize_size=20), r"^train\.resize_size=20 must be 0 \(= image_size\) or an "
     r"integer >= image_size \(32\)"),
    (dict(crop_padding=-1), r"^train\.crop_padding=-1 must be an integer in 0\.\.31\.$"),
    (dict(flip="yes"), r"^train\.flip='yes' must be True or False\.$"),
    (dict(color_jitter=(0.4, 0.4)), r"^train\.color_jitter=\(0\.4, 0\.4\) must be \(\) or 4 "
     r"non-negative numbers"),
    (dict(color_jitter=(0.4, 0.4, 0.4, 0.7)), r"hue at most 0\.5"),
    (dict(random_resized_crop=True, resize="shorter_side"),
     r"^train\.random_resized_crop crops the stored image itself"),
])
def test_bad_preprocess_keys_fail_in_one_line(keys, message):
  with pytest.raises(ValueError, match=message):
    transforms.check_stage(stage(**keys), "train", 32, CIFAR, evaluates=True)


def test_color_jitter_on_grey_images_is_refused():
  grey = datasets.get_dataset("sklearn_digits")
  with pytest.raises(ValueError, match=r"train\.color_jitter needs RGB images.*1 channel"):
    transforms.check_stage(stage(color_jitter=(0.4, 0.4, 0.4, 0.2)), "train", 8, grey, True)
  transforms.check_stage(stage(color_jitter=(0.4, 0.4, 0.4, 0.2)), "train", 8, CIFAR, True)


def test_default_and_paper_stage_keys_are_valid():
  config = default.get_config()
  for name in ("search_phase1", "search_phase2", "train", "retrieval"):
    transforms.check_stage(config[name], name, config.image_size, CIFAR,
                           evaluates=name in ("train", "retrieval"))
