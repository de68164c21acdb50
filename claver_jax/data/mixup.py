"""Mixup / CutMix with label smoothing for the train step (jittable, device side).

    >>> video, targets = mixup_cutmix(rng, video, labels, num_classes)   # inside the jitted step

As in the official code (timm's batch mode), samples are mixed in pairs with one lambda for the
whole batch; the pairs are neighbours (2k, 2k + 1; the last sample of an odd batch is its own
partner) where timm pairs i with B - 1 - i: the batch is shuffled, so both are random pairs, and
neighbours stay on one device when the batch is split over devices in even shares (mixing moves
no data) and do not depend on the device count. With probability `switch_prob` it is CutMix
(lambda ~ Beta(1, 1), one box for every frame of every clip, lambda corrected to the box's true
area after clipping), otherwise Mixup (lambda ~ Beta(.8, .8)). Targets are label-smoothed
one-hots mixed with the same lambda, so each row sums to 1. An alpha of 0 turns its branch off
(timm's rule): with mixup_alpha=0 every step is CutMix, with cutmix_alpha=0 every step is Mixup,
and with both 0 the clips pass unchanged with label-smoothed targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int [B] -> float32 [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C off."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def neighbours(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B, ...]: rows 2k and 2k + 1 swapped (the last row of an odd B stays)."""
  even = x.shape[0] - x.shape[0] % 2
  swapped = x[:even].reshape(even // 2, 2, *x.shape[1:])[:, ::-1].reshape(x[:even].shape)
  return jnp.concatenate([swapped, x[even:]]) if even < x.shape[0] else swapped


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
  """A box of area ~ (1 - lam) H W at a uniform random centre, clipped to the image.

  Returns (mask bool [H, W], True inside the box; lam corrected to 1 - box area / (H W)).
  """
  ry, rx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return mask, 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)


def mixup_cutmix(rng: jax.Array, video: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """video float [B, T, H, W, C], labels int [B] -> (mixed video, soft targets float32 [B, C]).

  See the module docstring. Targets sum to 1 along C.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0 '
                     '(0 turns that branch off).')
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return video, targets
  rng_switch, rng_mix, rng_cut, rng_box = jax.random.split(rng, 4)
  _, _, height, width, _ = video.shape
  partner = neighbours(video)
  if cutmix_alpha > 0:
    lam_cut = jax.random.beta(rng_cut, cutmix_alpha, cutmix_alpha)
    mask, lam_box = cutmix_box(rng_box, lam_cut, height, width)
    cut = jnp.where(mask[None, None, :, :, None], partner, video)
  if mixup_alpha > 0:
    lam_mix = jax.random.beta(rng_mix, mixup_alpha, mixup_alpha)
    mixed_up = lam_mix.astype(video.dtype) * video + (1 - lam_mix).astype(video.dtype) * partner
  if mixup_alpha == 0:
    mixed, lam = cut, lam_box
  elif cutmix_alpha == 0:
    mixed, lam = mixed_up, lam_mix
  else:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
    mixed = jnp.where(use_cutmix, cut, mixed_up)
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
  return mixed, lam * targets + (1 - lam) * neighbours(targets)
