r"""The synthetic motion set: 12 classes that only motion tells apart, in 6 reverse-time twins.

    python -m claver_jax.data.synthetic --out=DIR --num_videos=N [--num_frames=16] [--size=64] \
        [--width=W] [--seed=0] [--fps=8] [--overwrite]

writes N mp4 clips (H.264 through PyAV) under DIR/videos/, with DIR/train.txt, DIR/val.txt
(`videos/<class>/<index>.mp4 LABEL` lines; clip i goes to val when i % 5 == 4) and DIR/labels.csv,
so the file-list pipeline runs end to end. `make_clip(index, seed=...)` generates the same clips
in memory.

Clip i has label i % 12 and is drawn from np.random.default_rng((seed, i)): striped shapes with
an off-centre marker dot, light on a dark ground or dark on a light one, over a faintly textured
background with fresh pixel noise in every frame. The rotating classes use a one-armed pointer,
whose angle is unambiguous over a full turn (a square's repeats every quarter turn); it starts
near 12 o'clock (ROTATION_START_SPREAD). Class 2k + 1 is literally the time reversal of a clip drawn
like class 2k, so within a twin the multiset of frames has the same distribution: a model blind
to frame order is at chance within each pair, one that models time is not.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

CLASS_NAMES = (
    'moving left', 'moving right', 'moving up', 'moving down', 'growing', 'shrinking',
    'rotating clockwise', 'rotating counterclockwise', 'fading in', 'fading out',
    'two objects approaching', 'two objects separating')
NUM_CLASSES = len(CLASS_NAMES)
SHAPES = ('disk', 'square', 'diamond', 'ellipse')   # Rotation uses a 'pointer'.
# The rotating pointer starts within ROTATION_START_SPREAD * pi of 12 o'clock and turns by
# ROTATION_SWEEP * pi over the clip, so which way it turns shows in where it starts and ends, as
# a translation does. From a uniformly random start only a relation between frames tells the
# two directions apart, and the demo's tiny model, from scratch, did not learn that in budget.
ROTATION_START_SPREAD = 1 / 3
ROTATION_SWEEP = (0.5, 0.9)


def is_val(index: int) -> bool:
  """The fixed split: clip `index` belongs to val when index % 5 == 4 (5 is coprime with 12)."""
  return index % 5 == 4


def split_indices(num_videos: int, split: str) -> list[int]:
  """Clip indices of 'train' or 'val' among the first `num_videos`."""
  if split not in ('train', 'val'):
    raise ValueError(f'Unknown synthetic split {split!r}: use "train" or "val".')
  return [i for i in range(num_videos) if is_val(i) == (split == 'val')]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A static float32 [H, W, 3] texture: a mid-range colour plus three low-frequency gratings."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  base = rng.uniform(70, 180, size=3).astype(np.float32)
  texture = np.zeros((height, width, 3), np.float32)
  for _ in range(3):
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(4, 10, size=3)
    grating = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase)
    texture += grating[..., None] * amplitude
  return base + texture


def _object(rng: np.random.Generator, background: np.ndarray, shape: str | None = None) -> dict:
  """A striped object whose colour contrasts with the background: dark on a light ground,
  light on a dark one."""
  colour = rng.uniform(0, 255, size=3) * 0.35
  if background.mean() < 125:
    colour += 165
  return dict(shape=shape or SHAPES[rng.integers(len(SHAPES))], colour=colour.astype(np.float32),
              stripe_angle=rng.uniform(0, np.pi), stripe_period=rng.uniform(0.5, 0.9))


def _render(frames: np.ndarray, obj: dict, radius: float, cx: np.ndarray, cy: np.ndarray,
            scale: np.ndarray, angle: np.ndarray, opacity: np.ndarray) -> None:
  """Composites one object onto float32 [T, H, W, 3] `frames`; per-frame pose arrays are [T]."""
  t, height, width, _ = frames.shape
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  s = (scale * radius)[:, None, None]
  u, v = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s      # Object units, radius 1.
  shape = obj['shape']
  if shape == 'disk':
    distance = np.hypot(u, v) - 1
  elif shape == 'square':
    distance = np.maximum(abs(u), abs(v)) - 0.85
  elif shape == 'diamond':
    distance = (abs(u) + abs(v) - 1.2) / math.sqrt(2)
  elif shape == 'ellipse':
    distance = np.hypot(u, v / 0.6) - 1
  else:             # 'pointer': a hub with one arm, so its angle is unambiguous over 2 pi.
    arm = np.hypot(u - np.clip(u, 0, 1), v) - 0.3
    distance = np.minimum(np.hypot(u, v) - 0.5, arm)
  alpha = np.clip(0.5 - distance * s, 0, 1) * opacity[:, None, None]
  stripes = np.sin(2 * np.pi * (u * math.cos(obj['stripe_angle']) + v * math.sin(
      obj['stripe_angle'])) / obj['stripe_period']) > 0
  shade = np.where(stripes, 1.0, 0.65).astype(np.float32)
  shade = np.where(np.hypot(u - 0.6, v) < 0.28, 0.25, shade)         # The orientation marker.
  colour = shade[..., None] * obj['colour']
  frames *= 1 - alpha[..., None]
  frames += alpha[..., None] * colour


def make_clip(index: int, *, seed: int = 0, num_frames: int = 16,
              size: int | tuple[int, int] = 64) -> tuple[np.ndarray, int]:
  """Clip `index` of the set: (uint8 [T, H, W, 3], label). `size` is S or (H, W)."""
  height, width = (size, size) if isinstance(size, int) else size
  if num_frames < 2 or min(height, width) < 16:
    raise ValueError(f'Synthetic clips need num_frames >= 2 and a size >= 16, got {num_frames} '
                     f'frames of {height}x{width}.')
  label = index % NUM_CLASSES
  clip = render_forward(label // 2, np.random.default_rng((seed, index)), num_frames, height,
                        width)
  return (clip[::-1].copy() if label % 2 else clip), label


def render_forward(pair: int, rng: np.random.Generator, num_frames: int, height: int,
                   width: int) -> np.ndarray:
  """A clip of twin pair `pair`'s even (forward) class, uint8 [T, H, W, 3]; the odd class is
  its time reversal."""
  side = min(height, width)
  background = _background(rng, height, width)
  frames = np.broadcast_to(background, (num_frames, height, width, 3)).copy()
  u = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
  ones = np.ones(num_frames, np.float32)
  if pair == 5:   # Two objects approaching.
    radius = rng.uniform(0.1, 0.13) * side
    phi = rng.uniform(0, 2 * np.pi)
    mx, my = width / 2 + rng.uniform(-.05, .05) * side, height / 2 + rng.uniform(-.05, .05) * side
    gap, gap_end = rng.uniform(0.6, 0.7) * side, rng.uniform(0.26, 0.32) * side
    half = (gap + (gap_end - gap) * u) / 2
    for sign in (1, -1):
      _render(frames, _object(rng, background), radius, mx + sign * half * math.cos(phi),
              my + sign * half * math.sin(phi), ones, rng.uniform(0, 2 * np.pi) * ones, ones)
  else:
    radius = rng.uniform(0.15, 0.2) * side
    cx, cy = (rng.uniform(0.3, 0.7) * width) * ones, (rng.uniform(0.3, 0.7) * height) * ones
    scale, angle, opacity = ones, rng.uniform(0, 2 * np.pi) * ones, ones
    shape = None
    if pair in (0, 1):   # Moving left / moving up: travel d from a start that keeps it in frame.
      extent = width if pair == 0 else height
      distance = rng.uniform(0.4, 0.55) * extent
      start = rng.uniform(radius + distance, extent - radius)
      if pair == 0:
        cx = start - distance * u
      else:
        cy = start - distance * u
    elif pair == 2:      # Growing.
      scale = rng.uniform(0.35, 0.55) + (rng.uniform(1.4, 1.8) - 0.45) * u
    elif pair == 3:      # Rotating clockwise on screen (y points down: angle increases).
      start = -0.5 + rng.uniform(-1, 1) * ROTATION_START_SPREAD    # -pi/2 points up.
      angle = (start + rng.uniform(*ROTATION_SWEEP) * u) * np.pi
      shape = 'pointer'
    else:                # Fading in.
      opacity = u
    _render(frames, _object(rng, background, shape), radius, cx, cy, scale, angle, opacity)
  frames += rng.normal(0, 6, size=frames.shape).astype(np.float32)
  return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
  """uint8 [T, H, W, 3] (H, W even) -> an H.264 yuv420p mp4 at `path`."""
  import av
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=fps, options={'crf': str(crf)})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode())


def relative_path(index: int) -> str:
  label = index % NUM_CLASSES
  return f'videos/{CLASS_NAMES[label].replace(" ", "_")}/{index:06d}.mp4'


def write_dataset(out: str | Path, num_videos: int, *, num_frames: int = 16,
                  size: int | tuple[int, int] = 64, seed: int = 0, fps: int = 8,
                  overwrite: bool = False, progress: bool = True) -> Path:
  """Writes the set as mp4 files + train.txt, val.txt, labels.csv under `out` (atomically)."""
  from tqdm import tqdm
  from claver_jax.fileio import atomic_directory
  height, width = (size, size) if isinstance(size, int) else size
  if height % 2 or width % 2:
    raise ValueError(f'H.264 in yuv420p needs an even height and width, got {height}x{width}.')
  if num_videos < 1:
    raise ValueError(f'--num_videos must be at least 1, got {num_videos}.')
  with atomic_directory(out, overwrite=overwrite) as tmp:
    lines = {'train': [], 'val': []}
    for name in CLASS_NAMES:
      (tmp / 'videos' / name.replace(' ', '_')).mkdir(parents=True)
    for index in tqdm(range(num_videos), desc='synthetic clips', disable=not progress):
      clip, label = make_clip(index, seed=seed, num_frames=num_frames, size=(height, width))
      write_mp4(tmp / relative_path(index), clip, fps=fps)
      lines['val' if is_val(index) else 'train'].append(f'{relative_path(index)} {label}\n')
    for split, split_lines in lines.items():
      (tmp / f'{split}.txt').write_text(''.join(split_lines))
    (tmp / 'labels.csv').write_text(
        'id,name\n' + ''.join(f'{i},{n}\n' for i, n in enumerate(CLASS_NAMES)))
  return Path(out)


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    out = write_dataset(f.out, f.num_videos, num_frames=f.num_frames,
                        size=(f.size, f.width or f.size), seed=f.seed, fps=f.fps,
                        overwrite=f.overwrite)
  except (ValueError, FileExistsError) as e:
    sys.exit(f'error: {e}')
  print(f'Wrote {f.num_videos} clips of {f.num_frames} frames to {out} '
        f'({len(split_indices(f.num_videos, "train"))} train, '
        f'{len(split_indices(f.num_videos, "val"))} val).')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('out', None, 'Output directory (must not exist).', required=True)
  flags.DEFINE_integer('num_videos', None, 'Number of clips (label = index % 12).', required=True)
  flags.DEFINE_integer('num_frames', 16, 'Frames per clip.')
  flags.DEFINE_integer('size', 64, 'Frame height (and width unless --width), even.')
  flags.DEFINE_integer('width', 0, 'Frame width, even; 0 means --size.')
  flags.DEFINE_integer('seed', 0, 'Seed: clip i is drawn from default_rng((seed, i)).')
  flags.DEFINE_integer('fps', 8, 'Frame rate written into the mp4s.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists (once complete).')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
