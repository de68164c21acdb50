r"""Input throughput in clips/s per core and per host, next to what the accelerators consume.

    python -m benchmarks.input_pipeline [--seconds=10] [--fps=25] [--num_videos=24] \
        [--batches=12] [--clip_frames=8] [--workers=0,2] [--formats=mp4,prepared] \
        [--host_cores=N]

Writes synthetic mp4s at 320x240 (H.264, --seconds at --fps: Kinetics' clips are 10 s, 250-300
frames), prepares them (`claver_jax.data.prepare`: a JPEG record per frame, short side 256), and
measures clips/s of
  * bare decoding: PyAV decodes every frame of each file and converts the T sampled frames to
    RGB arrays (the least any reader of an mp4 does);
  * the train pipeline (TSN sampling + the paper's augmentations at 224 px + batching) through
    grain with one reading thread per process, from the mp4s ('mp4') and from the prepared
    dataset ('prepared': it reads and decodes only the T sampled frames' records), for each
    count of grain worker processes in --workers (0: in-process, one core).
Then it prints, per format, clips/s per core (the in-process rate) and per host (per core x
--host_cores, which defaults to this machine's count: scaling with cores is assumed linear; the
worker counts show how it held on this machine), next to what the accelerators consume and the
cores that would take.

What an accelerator consumes, from FLOPs (nothing here runs one): a train step of K400 B/16 8f
KMT costs 3 x 402 GFLOPs per clip (forward + backward ~ 3 x the forward pass; 402 is XLA's count
of one view, `python -m claver_jax.flops --config=configs/k400.py:B16,8`). At 40% MFU:
  8 x H100 SXM (989 TFLOP/s dense bf16 each):  8 x 989e12 x 0.4 / 1.206e12 = 2,625 clips/s;
  a v5e host of 4 chips (197 TFLOP/s bf16 each): 4 x 197e12 x 0.4 / 1.206e12 =   261 clips/s.
(The issue's ~4,500 and ~440 take the paper's 122 G multiply-adds per view, 244 GFLOPs, which
counts less than XLA does: see docs/performance.md: FLOPs.) --flops_per_clip overrides the cost.
`measure(...)` is the entry point for other scripts (benchmarks.accelerator_smoke).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 224
TRAIN_FLOPS_PER_CLIP = 3 * 402e9          # K400 B/16 8f KMT, forward + backward, per clip.
MFU = 0.4
ACCELERATORS = {'8 x H100 SXM': 8 * 989e12, 'v5e host (4 chips)': 4 * 197e12}


def clips_per_second_needed(peak_flops: float, flops_per_clip: float = TRAIN_FLOPS_PER_CLIP,
                            mfu: float = MFU) -> float:
  """Clips/s that accelerators of `peak_flops` in all consume at `mfu`."""
  return peak_flops * mfu / flops_per_clip


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


def pipeline(root: Path, num_workers: int, batches: int, clip_frames: int,
             prepared: Path | None = None) -> float:
  """Clips/s of the train pipeline over the mp4s in `root` (or the `prepared` dataset), after its
  first batch (worker start-up excluded)."""
  from claver_jax.data.pipeline import build_pipelines, default_config
  cfg = default_config()
  cfg.update(dict(root=str(root), train_list=str(root / 'clips.txt'),
                  labels=str(root / 'labels.csv'), num_frames=clip_frames, image_size=IMAGE_SIZE,
                  batch_size=8, num_workers=num_workers, read_threads=1, read_buffer=1,
                  flip_prob=0.0))
  if prepared is not None:
    cfg.update(dict(source='tfds', root=str(prepared), train_list='clips', labels=''))
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


def measure(*, seconds: float = 10, fps: int = 25, num_videos: int = 24, batches: int = 12,
            clip_frames: int = 8, workers: tuple[int, ...] = (0,),
            formats: tuple[str, ...] = ('mp4', 'prepared'), bare: bool = True,
            progress: bool = False) -> dict[str, float]:
  """Clips/s on this host, measured in one run on synthetic 320x240 clips of `seconds` at `fps`.

  Returns {'bare_decode': r} (with `bare`) and {'FORMAT/WORKERS': r} for each format in
  `formats` ('mp4': the train pipeline over the mp4s; 'prepared': over a dataset prepared from
  them) and each grain worker count in `workers` (0: in-process, one core).
  """
  from claver_jax.data import prepare, synthetic
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.write_dataset(Path(tmp) / 'videos', num_videos,
                                   num_frames=int(round(seconds * fps)), size=(240, 320),
                                   fps=fps, progress=progress)
    (root / 'clips.txt').write_text((root / 'train.txt').read_text() +
                                  (root / 'val.txt').read_text())
    paths = [root / line.rsplit(' ', 1)[0]
             for line in (root / 'clips.txt').read_text().splitlines()]
    if bare:
      rounds = max(1, -(-batches * 8 // len(paths)))
      bare_decode(paths[:2], 1, clip_frames)                # Warm-up.
      rates['bare_decode'] = bare_decode(paths, rounds, clip_frames)
    prepared = None
    if 'prepared' in formats:
      prepared = prepare.prepare([root / 'clips.txt'], root, root / 'labels.csv',
                                 Path(tmp) / 'prepared', num_workers=min(2, os.cpu_count() or 1),
                                 progress=progress)
    for fmt in formats:
      for count in workers:
        rates[f'{fmt}/{count}'] = pipeline(root, count, batches, clip_frames,
                                           prepared if fmt == 'prepared' else None)
  return rates


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  workers = tuple(int(w) for w in f.workers.split(','))
  formats = tuple(f.formats.split(','))
  cores = f.host_cores or os.cpu_count() or 1
  print(f'{f.num_videos} videos, 320x240, {f.seconds:g} s at {f.fps} fps '
        f'({int(round(f.seconds * f.fps))} frames); T={f.clip_frames}, {IMAGE_SIZE} px, batch 8; '
        f'{os.cpu_count()} CPUs here')
  rates = measure(seconds=f.seconds, fps=f.fps, num_videos=f.num_videos, batches=f.batches,
                  clip_frames=f.clip_frames, workers=workers, formats=formats)
  decode = rates['bare_decode']
  print(f'bare PyAV decode (mp4):    {decode:7.1f} clips/s')
  for fmt in formats:
    for count in workers:
      rate = rates[f'{fmt}/{count}']
      per_worker = f' ({rate / count:.1f} per worker)' if count else ''
      print(f'pipeline {fmt:8s} {count:2d} workers: {rate:7.1f} clips/s{per_worker}, '
            f'{rate / decode:.2f}x bare decoding')
  needs = {name: clips_per_second_needed(peak, f.flops_per_clip)
           for name, peak in ACCELERATORS.items()}
  print(f'consumed at {MFU:.0%} MFU, {f.flops_per_clip / 1e12:.3f} TFLOP per clip: ' +
        ', '.join(f'{name} {rate:,.0f} clips/s' for name, rate in needs.items()))
  for fmt in formats:
    if f'{fmt}/0' not in rates:
      continue
    per_core = rates[f'{fmt}/0']
    cores_needed = ', '.join(f'{name} {rate / per_core:,.0f}' for name, rate in needs.items())
    print(f'{fmt}: {per_core:.1f} clips/s per core, {per_core * cores:,.0f} per host of {cores} '
          f'cores; cores needed: {cores_needed}')
  if 'mp4/0' in rates:
    print(f'pipeline/decode throughput ratio: {rates["mp4/0"] / decode:.2f}')
  if 'mp4/0' in rates and 'prepared/0' in rates:
    print(f'prepared/mp4 throughput ratio: {rates["prepared/0"] / rates["mp4/0"]:.2f}')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_integer('num_videos', 24, 'Synthetic mp4s to write.')
  flags.DEFINE_float('seconds', 10, 'Length of each video (Kinetics: 10 s).')
  flags.DEFINE_integer('fps', 25, 'Frames per second of each video.')
  flags.DEFINE_integer('batches', 12, 'Timed batches of 8 clips per measurement.')
  flags.DEFINE_integer('clip_frames', 8, 'T: frames sampled per clip.')
  flags.DEFINE_string('workers', '0,2', 'Comma-separated grain worker counts to measure.')
  flags.DEFINE_string('formats', 'mp4,prepared', 'Comma-separated inputs to measure: mp4 '
                      '(decoded by the pipeline), prepared (a claver_jax.data.prepare dataset).')
  flags.DEFINE_integer('host_cores', 0, 'Cores of the host to project per-host rates to '
                       '(0: this machine\'s).')
  flags.DEFINE_float('flops_per_clip', TRAIN_FLOPS_PER_CLIP, 'Train FLOPs per clip of the '
                     'accelerators fed (default: K400 B/16 8f KMT, forward + backward).')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
