"""The paper's clip augmentations in numpy (host side, one clip at a time) and the device-side
normalisation.

Every random choice is drawn once per clip, so all frames of a clip get the same crop, flip,
colour jitter and grayscale. Clips stay uint8 [T, H, W, 3] until `normalize`, which runs under
jit on the device.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from claver_jax.data.video import resized_shape
from claver_jax.models.clip import CLIP_MEAN, CLIP_STD

# Per-channel mean/std on pixel values scaled to 0-1: CLIP's own (models/clip.py); ImageNet's,
# which the official CLAVER and X-CLIP pipelines use (123.675, 116.28, 103.53 / 58.395, 57.12,
# 57.375 on 0-255).
IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)
TEST_RESIZE_RATIO = 256 / 224        # The official single view: short side 256 for 224 crops.
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R 601 luma, as torchvision.


def train_short_side(image_size: int) -> int:
  """The short side a training clip is resized to before cropping: int(256 / 224 * S)."""
  return int(256 / 224 * image_size)


def eval_short_side(image_size: int, num_crops: int, ratio: float = TEST_RESIZE_RATIO) -> int:
  """The short side a test clip is resized to, as the official test pipelines do: int(256 / 224
  * S) for the single centre crop (256 for 224; `ratio` changes 256 / 224), S for several crops
  along the long side."""
  return int(ratio * image_size) if num_crops == 1 else image_size


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------
def multi_scale_crop_box(height: int, width: int, image_size: int, rng: np.random.Generator,
                         scales: Sequence[float] = MULTI_SCALES, max_distort: int = 1
                         ) -> tuple[int, int, int, int]:
  """The official pipelines' MultiScaleCrop (mmaction2's, random_crop=False): a random box
  (x0, y0, x1, y1).

  Crop sides are min(H, W) * scale (snapped to `image_size` within 3 px), height and width
  scale indices at most `max_distort` apart; the box sits at one of the 5 fixed offsets
  (num_fixed_crops=5: the four corners and the centre, on a grid of quarter steps).
  """
  base = min(height, width)
  sizes = [int(base * s) for s in scales]
  sizes = [image_size if abs(s - image_size) < 3 else s for s in sizes]
  pairs = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes)
           if abs(i - j) <= max_distort]
  crop_w, crop_h = pairs[rng.integers(len(pairs))]
  w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
  offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
  ox, oy = offsets[rng.integers(len(offsets))]
  x0, y0 = ox * w_step, oy * h_step
  return x0, y0, x0 + crop_w, y0 + crop_h


def crop_resize(clip: np.ndarray, box: tuple[float, float, float, float], image_size: int,
                flip: bool = False) -> np.ndarray:
  """uint8 [T, H, W, 3] -> the box (x0, y0, x1, y1; pixel edges, may be fractional) of every
  frame resized bilinearly to [T, S, S, 3], mirrored left-right when `flip` (done by PIL per
  frame: a strided numpy flip copies 4x slower)."""
  from PIL import Image
  x0, y0, x1, y1 = box
  frames = []
  for frame in clip:
    image = Image.fromarray(frame)
    if (x1 - x0, y1 - y0) == (image_size, image_size) and all(float(v).is_integer() for v in box):
      image = image.crop(tuple(int(v) for v in box))
    else:
      image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
    if flip:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    frames.append(np.asarray(image))
  return np.stack(frames)


def spatial_crops(clip: np.ndarray, image_size: int, num_crops: int) -> np.ndarray:
  """uint8 [T, H, W, 3] resized to `eval_short_side(S, num_crops)` -> [num_crops, T, S, S, 3].

  One crop is the centre S x S crop (of a short side of 256/224 S: the official single view; of
  any short side >= S).
  n > 1 crops need a short side of S: they are evenly spaced along the long side from one end to
  the other (3: start, centre, end).
  """
  _, height, width, _ = clip.shape
  if num_crops == 1:
    if min(height, width) < image_size:
      raise ValueError(f'spatial_crops: a {height}x{width} clip has no {image_size} px centre crop.')
    y0, x0 = (height - image_size) // 2, (width - image_size) // 2
    return clip[None, :, y0:y0 + image_size, x0:x0 + image_size]
  if min(height, width) != image_size:
    raise ValueError(f'spatial_crops expects a short side of {image_size}, got {height}x{width}.')
  starts = np.linspace(0, max(height, width) - image_size, num_crops).round().astype(int)
  if height > width:
    return np.stack([clip[:, s:s + image_size] for s in starts])
  return np.stack([clip[:, :, s:s + image_size] for s in starts])


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------
def _gray(x: np.ndarray) -> np.ndarray:
  return x @ _GRAY


def _hue_matrix(hue: float) -> np.ndarray:
  """A 3x3 RGB matrix rotating hue by `hue` turns, through the YIQ chroma plane."""
  to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    np.float32)
  c, s = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
  rotate = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
  return (np.linalg.inv(to_yiq) @ rotate @ to_yiq).astype(np.float32)


def color_jitter(clip: np.ndarray, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> np.ndarray:
  """torchvision's ColorJitter applied to each frame, as the official pipelines do (one call per
  frame: every frame draws its own factors and order).

  Per frame: brightness, contrast and saturation factors uniform in [max(0, 1 - a), 1 + a], the
  hue shift in [-hue, hue] turns, applied in a random order. Contrast blends the frame towards
  its mean gray level; the hue shift is a rotation of the YIQ chroma plane, a linear stand-in
  for torchvision's HSV shift. All four are affine in RGB, so each frame's composition is one
  3x3 matrix plus an offset, applied in a single pass and clipped once (torchvision rounds and
  clips after each step, which differs only where a step saturates a pixel).
  uint8 [T, H, W, 3] -> uint8 [T, H, W, 3].
  """
  frames = clip.shape[0]
  low = lambda a: max(0.0, 1 - a)
  factors = np.stack([rng.uniform(low(brightness), 1 + brightness, frames),
                      rng.uniform(low(contrast), 1 + contrast, frames),
                      rng.uniform(low(saturation), 1 + saturation, frames),
                      rng.uniform(-hue, hue, frames)], axis=1)                  # [T, 4]
  orders = np.stack([rng.permutation(4) for _ in range(frames)])             # [T, 4]
  eye = np.eye(3)
  gray = _GRAY.astype(np.float64)
  x = clip.astype(np.float32)
  pixels = x.reshape(frames, -1, 3)
  # Per-frame mean colour [T, 3] as a matmul: numpy's strided mean over H*W is ~20x slower.
  means = (np.ones(pixels.shape[1], np.float32) @ pixels / pixels.shape[1]).astype(np.float64)
  matrices, offsets = np.empty((frames, 3, 3)), np.empty((frames, 3))
  for t in range(frames):
    matrix, offset = eye, np.zeros(3)                              # x -> matrix @ x + offset
    for op in orders[t]:
      f = factors[t, op]
      if op == 0:                                                  # brightness
        step, shift = f * eye, 0.0
      elif op == 1:                                                # contrast, the frame's mean
        step, shift = f * eye, (1 - f) * ((matrix @ means[t] + offset) @ gray)
      elif op == 2:                                                # saturation
        step, shift = f * eye + (1 - f) * np.outer(np.ones(3), gray), 0.0
      else:                                                        # hue
        step, shift = _hue_matrix(f).astype(np.float64), 0.0
      matrix, offset = step @ matrix, step @ offset + shift
    matrices[t], offsets[t] = matrix, offset
  x = (pixels @ matrices.transpose(0, 2, 1).astype(np.float32)).reshape(x.shape)
  x += offsets.astype(np.float32)[:, None, None, :]
  np.clip(x, 0, 255, out=x)
  return (x + 0.5).astype(np.uint8)


def grayscale(clip: np.ndarray) -> np.ndarray:
  """uint8 [T, H, W, 3] -> its luma repeated over the 3 channels."""
  return np.repeat((_gray(clip.astype(np.float32)) + 0.5).astype(np.uint8)[..., None], 3, -1)


# ---------------------------------------------------------------------------------------------
# Whole-clip transforms
# ---------------------------------------------------------------------------------------------
def augment_train_clip(clip: np.ndarray, image_size: int, rng: np.random.Generator, *,
                       scales: Sequence[float] = MULTI_SCALES, flip_prob: float = 0.5,
                       jitter_prob: float = 0.8,
                       jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
                       grayscale_prob: float = 0.2) -> np.ndarray:
  """The training augmentation of a clip of any size.

  Resize the short side to `train_short_side(S)` -> MultiScaleCrop -> resize to S x S ->
  horizontal flip -> colour jitter -> grayscale, each drawn once for the clip. The crop box is
  drawn on the resized frame, as TSN does, and mapped back onto the clip, so the two resizes are
  one resampling of the clip's own pixels. uint8 [T, H, W, 3] -> uint8 [T, S, S, 3].
  """
  height, width = clip.shape[1:3]
  resized_h, resized_w = resized_shape(height, width, train_short_side(image_size))
  box = multi_scale_crop_box(resized_h, resized_w, image_size, rng, scales)
  if (resized_h, resized_w) != (height, width):
    sx, sy = width / resized_w, height / resized_h
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  clip = crop_resize(clip, box, image_size, flip=rng.random() < flip_prob)
  if rng.random() < jitter_prob:
    clip = color_jitter(clip, rng, *jitter)
  if rng.random() < grayscale_prob:
    clip = grayscale(clip)
  return np.ascontiguousarray(clip)


def normalize(video, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
  """Jittable, device side: uint8 [..., 3] -> float32 (x / 255 - mean) / std."""
  import jax.numpy as jnp
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (jnp.asarray(video, jnp.float32) / 255.0 - mean) / std
