r"""Input pipeline throughput against bare PyAV decoding of the same files, in one run.

    python -m benchmarks.input_pipeline [--num_videos=24] [--num_frames=75] [--batches=12] \
        [--clip_frames=8] [--workers=0,2]

Writes synthetic mp4s at 320x240 (H.264, --num_frames frames each) to a temporary folder, then
measures clips/s for
  * bare decoding: PyAV decodes every frame of each file and converts the T = 8 sampled frames
    to RGB arrays (the least any reader of these files does);
  * the train pipeline (decode + TSN sampling + the paper's augmentations at 224 px + batching)
    through grain with one reading thread per process, for each count of grain worker processes
    in --workers (0: in-process), with clips/s per worker.
--clip_frames sets T (8; the few-shot and zero-shot configs use 32). The last line is
`pipeline/decode throughput ratio: X.XX`, in-process pipeline over bare decoding: both use one
core, so the ratio is the pipeline's overhead (or its saving from decoding only the sampled
frames). Goal: >= 0.80. The worker counts show how throughput grows with the cores given to
it, which sets config.data.num_workers (configs/k400.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 224


def bare_decode(paths: list[Path], rounds: int, clip_frames: int) -> float:
  """Clips/s of PyAV decoding every frame, converting T TSN-sampled frames to rgb24 arrays."""
  import av
  from claver_jax.data.video import train_indices
  rng = np.random.default_rng(0)
  start, clips = time.perf_counter(), 0
  for _ in range(rounds):
    for path in paths:
      with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
      wanted = train_indices(len(frames), clip_frames, rng)
      arrays = [frames[i].to_ndarray(format='rgb24') for i in wanted]
      assert len(arrays) == clip_frames
      clips += 1
  return clips / (time.perf_counter() - start)


def pipeline(root: Path, num_workers: int, batches: int, clip_frames: int) -> float:
  """Clips/s of the train pipeline, after its first batch (worker start-up excluded)."""
  from claver_jax.data.pipeline import build_pipelines, default_config
  cfg = default_config()
  cfg.update(dict(root=str(root), train_list=str(root / 'all.txt'),
                  labels=str(root / 'labels.csv'), num_frames=clip_frames, image_size=IMAGE_SIZE,
                  batch_size=8, num_workers=num_workers, read_threads=1, read_buffer=1,
                  flip_prob=0.0))
  iterator = iter(build_pipelines(cfg).train)
  try:
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
    assert batch['video'].shape == (8, clip_frames, IMAGE_SIZE, IMAGE_SIZE, 3)
    return batches * 8 / (time.perf_counter() - start)
  finally:
    iterator.close()


def main(argv: list[str]) -> None:
  from absl import flags
  from claver_jax.data import synthetic
  del argv
  f = flags.FLAGS
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.write_dataset(Path(tmp) / 'videos', f.num_videos, num_frames=f.num_frames,
                                   size=(240, 320), fps=25, progress=False)
    (root / 'all.txt').write_text((root / 'train.txt').read_text() + (root / 'val.txt').read_text())
    paths = [root / line.rsplit(' ', 1)[0] for line in (root / 'all.txt').read_text().splitlines()]
    print(f'{len(paths)} videos, 320x240, {f.num_frames} frames; T={f.clip_frames}, '
          f'{IMAGE_SIZE} px, batch 8; {os.cpu_count()} CPUs')
    rounds = max(1, -(-f.batches * 8 // len(paths)))
    bare_decode(paths[:2], 1, f.clip_frames)                # Warm-up.
    decode = bare_decode(paths, rounds, f.clip_frames)
    print(f'bare PyAV decode:        {decode:7.1f} clips/s')
    rates = {}
    for workers in (int(w) for w in f.workers.split(',')):
      rates[workers] = pipeline(root, workers, f.batches, f.clip_frames)
      per_worker = f' ({rates[workers] / workers:.1f} per worker)' if workers else ''
      print(f'pipeline, {workers:2d} workers:    {rates[workers]:7.1f} clips/s{per_worker}, '
            f'{rates[workers] / decode:.2f}x bare decoding in one process')
  if 0 in rates:
    print(f'pipeline/decode throughput ratio: {rates[0] / decode:.2f}')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_integer('num_videos', 24, 'Synthetic mp4s to write.')
  flags.DEFINE_integer('num_frames', 75, 'Frames per video (3 s at 25 fps).')
  flags.DEFINE_integer('batches', 12, 'Timed batches of 8 clips per measurement.')
  flags.DEFINE_integer('clip_frames', 8, 'T: frames sampled per clip.')
  flags.DEFINE_string('workers', '0,2', 'Comma-separated grain worker counts to measure.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
