"""Small on-disk video datasets for the data tests (written with PyAV, a few KB each)."""

from __future__ import annotations

import shutil
from pathlib import Path

from claver_jax.data import synthetic


def synthetic_dir(out: Path, num_videos: int = 24, num_frames: int = 8, size: int = 32) -> Path:
  """The synthetic motion set as mp4s + train.txt, val.txt, labels.csv under `out`."""
  return synthetic.write_dataset(out, num_videos, num_frames=num_frames, size=size,
                                 progress=False)


def with_bad_videos(src: Path, out: Path) -> Path:
  """A copy of a synthetic dir whose train.txt line 1 is corrupt and line 2 missing."""
  shutil.copytree(src, out)
  lines = (out / 'train.txt').read_text().splitlines()
  corrupt, missing = (line.rsplit(' ', 1)[0] for line in lines[:2])
  (out / corrupt).write_bytes(b'\x00\x00\x00\x18ftypmp42 this is not a video')
  (out / missing).unlink()
  return out


def black_video(path: Path, num_frames: int, height: int, width: int) -> Path:
  """A "video bomb" in small: `num_frames` black frames, which H.264 stores in a few bytes each."""
  import numpy as np
  synthetic.write_mp4(path, np.zeros((num_frames, height, width, 3), np.uint8), fps=25, crf=51)
  return path


def square_or_die(value: int) -> int:
  """value ** 2, except that 3 kills its own process as the out-of-memory killer would."""
  import os
  import signal
  if value == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  return value * value


def cache_one_or_die(job):
  """prepare's encoder, except that a video whose name contains 'die' kills its process."""
  from claver_jax.data import prepare
  if 'die' in job.name:
    square_or_die(3)
  return prepare._cache_one(job)
def synthetic_train_config(**overrides):
  """config.data for a few small clips of the in-memory synthetic set (no files)."""
  from claver_jax.data.pipeline import default_config
  cfg = default_config()
  cfg.update(dict(source='synthetic', synthetic_videos=30, synthetic_frames=4, synthetic_size=16,
                  num_frames=4, image_size=16, batch_size=8, eval_batch_size=4, flip_prob=0.0))
  cfg.update(overrides)
  return cfg
