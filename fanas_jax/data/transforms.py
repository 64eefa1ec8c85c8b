"""Per-example image preprocessing as plain data: what a stage does to an image.

A `Preprocess` is built from a stage config (`train_preprocess`,
`eval_preprocess`) and checked by `check_stage` with one-line errors naming the
config key. Applied to a uint8 HWC image it runs, in order:

1. geometry: `random_resized_crop` (torchvision's RandomResizedCrop to S x S),
   or resize (`resize`='stretch': to R x R; 'shorter_side': the shorter side to
   R, keeping the aspect ratio, as torchvision's Resize(R)) then a centre crop of
   S x S (torchvision's CenterCrop). S = image_size, R = resize_size or S.
2. `crop_padding` p > 0: zero-pad by p and take a random S x S window.
3. `flip`: a horizontal flip with probability 1/2.
4. to float in [0, 1]; `color_jitter` (brightness, contrast, saturation, hue)
   with torchvision's ColorJitter semantics (factors drawn uniformly, the four
   adjustments in a random order, tensor formulas);
5. normalisation by the dataset's mean and std.

Every random draw comes from the generator passed in, so an example's
augmentation is a function of that generator's seed alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from fanas_jax.data.datasets import DatasetSpec

RESIZE_MODES = ("shorter_side", "stretch")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """uint8 HWC image -> float32 image_size x image_size x C (see the module)."""
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  resize: str = "stretch"
  resize_size: int = 0
  random_resized_crop: bool = False
  crop_padding: int = 0
  flip: bool = False
  color_jitter: tuple[float, ...] = ()

  @property
  def is_random(self) -> bool:
    return bool(self.random_resized_crop or self.crop_padding or self.flip
                or any(self.color_jitter))

  def __call__(self, image: np.ndarray,
               rng: np.random.Generator | None = None) -> np.ndarray:
    if rng is None and self.is_random:
      raise ValueError("A random preprocess needs a random generator.")
    size = self.image_size
    if self.random_resized_crop:
      i, j, h, w = rrc_box(image.shape[0], image.shape[1], rng)
      image = resize(image[i:i + h, j:j + w], size, size)
    else:
      image = center_crop(self._resized(image), size)
    if self.crop_padding > 0:
      image = padded_crop(image, self.crop_padding, rng)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    x = image.astype(np.float32) / np.float32(255.0)
    if any(self.color_jitter):
      x = color_jitter(x, self.color_jitter, rng)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(
        self.std, np.float32)

  def _resized(self, image: np.ndarray) -> np.ndarray:
    target = self.resize_size or self.image_size
    if self.resize == "stretch":
      return resize(image, target, target)
    return resize(image, *shorter_side_size(image.shape[0], image.shape[1],
                                            target))


def train_preprocess(cfg: Any, image_size: int, spec: DatasetSpec) -> Preprocess:
  """A stage's training preprocess from its config keys (absent: no-op)."""
  return Preprocess(
      image_size=image_size, mean=tuple(spec.mean), std=tuple(spec.std),
      resize=cfg.get("resize", "stretch"),
      resize_size=cfg.get("resize_size", 0),
      random_resized_crop=cfg.get("random_resized_crop", False),
      crop_padding=cfg.get("crop_padding", 0), flip=cfg.get("flip", False),
      color_jitter=tuple(cfg.get("color_jitter", ())))


def eval_preprocess(cfg: Any, image_size: int, spec: DatasetSpec) -> Preprocess:
  """A stage's evaluation preprocess: eval_resize / eval_resize_size only."""
  return Preprocess(
      image_size=image_size, mean=tuple(spec.mean), std=tuple(spec.std),
      resize=cfg.get("eval_resize", "stretch"),
      resize_size=cfg.get("eval_resize_size", 0))


def _check_resize(cfg: Any, prefix: str, stage: str, image_size: int) -> None:
  mode, size = cfg.get(f"{prefix}resize", "stretch"), cfg.get(
      f"{prefix}resize_size", 0)
  if mode not in RESIZE_MODES:
    raise ValueError(f"{stage}.{prefix}resize={mode!r} is not one of: "
                     f"{', '.join(RESIZE_MODES)}.")
  if not isinstance(size, int) or isinstance(size, bool) or (
      size and size < image_size) or size < 0:
    raise ValueError(
        f"{stage}.{prefix}resize_size={size!r} must be 0 (= image_size) or an "
        f"integer >= image_size ({image_size}): a centre crop of {image_size} "
        "is taken from it.")


def _check_jitter(jitter: Any, stage: str, channels: int) -> None:
  jitter = tuple(jitter)
  if not jitter:
    return
  if len(jitter) != 4 or not all(
      isinstance(v, (int, float)) and v >= 0 for v in jitter) or jitter[3] > 0.5:
    raise ValueError(
        f"{stage}.color_jitter={jitter!r} must be () or 4 non-negative numbers "
        "(brightness, contrast, saturation, hue), hue at most 0.5.")
  if channels != 3:
    raise ValueError(f"{stage}.color_jitter needs RGB images; the stage's "
                     f"dataset has {channels} channel(s): use ().")


def check_stage(cfg: Any, stage: str, image_size: int, spec: DatasetSpec,
                evaluates: bool) -> None:
  """The preprocessing keys of one stage config, one line per problem."""
  _check_resize(cfg, "", stage, image_size)
  if evaluates:
    _check_resize(cfg, "eval_", stage, image_size)
  for key in ("flip", "random_resized_crop"):
    if not isinstance(cfg.get(key, False), bool):
      raise ValueError(f"{stage}.{key}={cfg.get(key)!r} must be True or False.")
  padding = cfg.get("crop_padding", 0)
  if not isinstance(padding, int) or isinstance(padding, bool) or not (
      0 <= padding < image_size):
    raise ValueError(f"{stage}.crop_padding={padding!r} must be an integer in "
                     f"0..{image_size - 1}.")
  if cfg.get("random_resized_crop", False) and (
      cfg.get("resize", "stretch") != "stretch" or cfg.get("resize_size", 0)):
    raise ValueError(
        f"{stage}.random_resized_crop crops the stored image itself: leave "
        f"{stage}.resize='stretch' and {stage}.resize_size=0.")
  _check_jitter(cfg.get("color_jitter", ()), stage, spec.channels)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 HWC to height x width.

  Integer upscaling replicates pixels (nearest), which is exact; any other size
  uses PIL bilinear (antialiased when shrinking), one channel at a time.
  """
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  if height % h == 0 and width % w == 0:
    return np.repeat(np.repeat(image, height // h, axis=0), width // w, axis=1)
  return np.stack([
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
          (width, height), Image.Resampling.BILINEAR))
      for c in range(image.shape[-1])
  ], axis=-1)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision's Resize(size): the shorter side to size, the longer truncated."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's CenterCrop(size) of an image at least size x size."""
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def padded_crop(image: np.ndarray, padding: int,
                rng: np.random.Generator) -> np.ndarray:
  """A random window of the image's size from the image zero-padded by p."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + h, left:left + w]


def rrc_box(height: int, width: int, rng: np.random.Generator,
            scale: tuple[float, float] = RRC_SCALE,
            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) of torchvision's RandomResizedCrop.get_params.

  Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in
  `ratio`; if none fits, the largest centred crop within `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (int(rng.integers(0, height - h + 1)),
              int(rng.integers(0, width - w + 1)), h, w)
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def grayscale(x: np.ndarray) -> np.ndarray:
  """torchvision's rgb_to_grayscale of float HWC: [H, W, 1]."""
  return (0.2989 * x[..., :1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


def _blend(x: np.ndarray, other: Any, factor: float) -> np.ndarray:
  return np.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
  return _blend(x, 0.0, factor)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
  return _blend(x, grayscale(x).mean(), factor)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
  return _blend(x, grayscale(x), factor)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the hue by `shift` turns (torchvision's HSV round trip)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(axis=-1), x.min(axis=-1)
  v, delta = maxc, maxc - minc
  s = delta / np.where(maxc == 0, 1.0, maxc)
  d = np.where(delta == 0, 1.0, delta)
  rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
  h = np.where(maxc == r, bc - gc,
               np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
  h = (h + shift) % 1.0
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  i = i.astype(np.int64) % 6
  choices = [np.stack(c, axis=-1) for c in
             ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
  return np.select([(i == k)[..., None] for k in range(6)], choices).astype(
      x.dtype)


def color_jitter(x: np.ndarray, strength: tuple[float, ...],
                 rng: np.random.Generator) -> np.ndarray:
  """torchvision's ColorJitter(brightness, contrast, saturation, hue) on [0, 1].

  Factors are uniform in [max(0, 1 - v), 1 + v] (hue: a shift in [-v, v]);
  the four adjustments run in a random order; a zero strength is skipped.
  """
  brightness, contrast, saturation, hue = strength
  factors = [None if v == 0 else rng.uniform(max(0.0, 1.0 - v), 1.0 + v)
             for v in (brightness, contrast, saturation)]
  factors.append(None if hue == 0 else rng.uniform(-hue, hue))
  adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  for k in rng.permutation(4):
    if factors[k] is not None:
      x = adjust[k](x, factors[k])
  return x.astype(np.float32)
