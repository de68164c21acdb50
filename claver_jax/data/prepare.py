r"""Prepares a video list as a tensorflow-datasets array_record dataset of JPEG frames (no
TensorFlow needed), read at random access one frame at a time.

    python -m claver_jax.data.prepare --list=train.txt --list=val.txt --root=videos/ \
        --labels=labels.csv --out=DIR [--short_side=256] [--quality=90] [--num_workers=N] \
        [--cache_dir=DIR.cache] [--max_frames=30000] [--max_pixels=...] [--max_decode_seconds=300]

Each list becomes a split named after its file (train.txt -> 'train'). Every frame of every
video is one record (`jpeg`: the frame, its short side resized to --short_side; `video`, `frame`:
whose and which), in list order; `<split>.videos.npz` beside them holds per video its `label`,
`video_id` (the list's path), `num_frames` and `first` record. A clip reads only the records of
the frames it samples (8 of a 10-s clip's 250, where whole-video records read all 250): train
clips take a random frame in each of T segments, test views T frames per temporal view, of any
T, from the same dataset. DIR also gets labels.csv, manifest.json (the settings and each list's
sha256) and skipped.txt (unreadable videos: skipped, never fatal). DIR may be gs://BUCKET/PATH.

Bounded: each video is decoded one frame at a time (decode, resize, encode), within
--max_frames, --max_pixels (frames x height x width) and --max_decode_seconds; a video past a
limit is skipped with the file and the limit named. A worker process that dies (the
out-of-memory killer, a signal) is reported with the video that killed it, which is skipped;
the rest go on.

Interrupted runs resume: each video's frames are encoded into the cache (--cache_dir, by default
DIR.cache beside a local DIR, or a folder in the temp directory for a remote one) under a key
of what determines them: the file's path, size and modification time, --short_side and
--quality. A rerun with a reordered or edited list reuses exactly the videos that did not
change. The records are written from the cache (a remote DIR is uploaded, then published in
one object write); the cache is removed on success. Read back with
`sources.PreparedSource(DIR, 'train')` or config.data.source = 'tfds'.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from claver_jax import fileio
from claver_jax.data.sources import (PREPARED_BUILDER_NAME, PREPARED_VERSION, DataError,
                                     FileListSource, find_dataset_dir, read_labels)
from claver_jax.data.video import DecodeLimits, VideoError, stream_frames

MAX_LOGGED = 20
SHARD_BYTES = 1 << 30


def split_name(list_path: str | os.PathLike) -> str:
  """train.txt -> 'train'; characters tfds rejects become '_'."""
  return re.sub(r'\W', '_', Path(list_path).stem)


def features():
  """One record: a frame's JPEG bytes, the index of its video in the split, its frame index."""
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      'jpeg': tfds.features.Tensor(shape=(), dtype=np.object_),
      'video': tfds.features.Tensor(shape=(), dtype=np.int64),
      'frame': tfds.features.Tensor(shape=(), dtype=np.int64)})


# ---------------------------------------------------------------------------------------------
# Encoding one video (in worker processes)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncodeJob:
  """One video to encode into `cache_file`: a file, or a member at [offset, offset + size) of an
  uncompressed tar."""

  name: str
  path: str
  offset: int | None
  size: int | None
  cache_file: str
  short_side: int
  quality: int
  limits: DecodeLimits


def _cache_one(job: EncodeJob) -> str | None:
  """Encodes one video's frames into its cache file; returns the error text if it cannot be read
  (also written to the `.skip` file beside, with the limits it was read under)."""
  cache_file = Path(job.cache_file)
  try:
    if job.offset is None:
      source = job.path
    else:
      with open(job.path, 'rb') as f:
        f.seek(job.offset)
        source = io.BytesIO(f.read(job.size))
    chunks = [_encode_jpeg(frame, job.quality) for frame in
              stream_frames(source, job.name, short_side=job.short_side, limits=job.limits)]
  except VideoError as e:
    _write_skip(cache_file, str(e), job.limits)
    return str(e)
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  tmp = cache_file.with_name(f'.{cache_file.name}.tmp-{os.getpid()}')
  with open(tmp, 'wb') as f:
    np.savez(f, jpeg=np.frombuffer(b''.join(chunks), np.uint8), offsets=offsets)
  os.replace(tmp, cache_file)
  return None


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _write_skip(cache_file: Path, error: str, limits: DecodeLimits) -> None:
  fileio.atomic_write_text(cache_file.with_suffix('.skip'), json.dumps(
      {'error': error, 'limits': dataclasses.asdict(limits)}))


def _read_skip(skip_file: Path, limits: DecodeLimits) -> str | None:
  """The error a previous run recorded under the same limits (None: try the video again)."""
  try:
    recorded = json.loads(skip_file.read_text())
  except (OSError, ValueError):
    return None
  return recorded['error'] if recorded.get('limits') == dataclasses.asdict(limits) else None


def cache_key(job_source: tuple[str, str | None], short_side: int, quality: int) -> str:
  """sha256 (24 hex digits) of what determines a video's encoded frames: the file's resolved path
  (and tar member), size and modification time, and the encoding settings."""
  path, member = job_source
  try:
    stat = os.stat(path)
    identity = [stat.st_size, stat.st_mtime_ns]
  except OSError:
    identity = ['missing']
  text = json.dumps([PREPARED_VERSION, os.path.realpath(path), member, *identity, short_side,
                     quality])
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:24]


def _jobs(source: FileListSource, cache: Path, short_side: int, quality: int,
          limits: DecodeLimits) -> list[EncodeJob]:
  """One EncodeJob per clip of `source`, in list order."""
  members = source._tar_members() if source.is_tar else {}
  jobs = []
  for index in range(len(source)):
    relative = source.name(index)
    if source.is_tar:
      member = os.path.normpath(relative)
      offset, size = members.get(member, (None, None))
      path, name = str(source.root), f'{source.root}:{relative}'
      key = cache_key((path, member), short_side, quality)
      if offset is None:           # A missing member reads as a missing file.
        path = str(cache / f'{key}.missing')
    else:
      path = name = str(source.root / relative)
      offset = size = None
      key = cache_key((path, None), short_side, quality)
    jobs.append(EncodeJob(name, path, offset, size, str(cache / f'{key}.npz'), short_side,
                          quality, limits))
  return jobs


# ---------------------------------------------------------------------------------------------
# A pool that says when a worker dies
# ---------------------------------------------------------------------------------------------
class WorkerDied(RuntimeError):
  """The process running a job died (the out-of-memory killer, a signal) before it returned."""


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], num_workers: int
             ) -> Iterator[tuple[int, Any]]:
  """Yields (i, fn(jobs[i])) for every job, in completion order, in `num_workers` spawned
  processes (0: in this one). When a worker dies, the jobs that were running are rerun one at a
  time, each in a fresh process: the one that kills its process again yields (i, WorkerDied),
  the others their results; then the pool starts anew for the rest. `fn` must be importable."""
  if num_workers <= 0:
    for i, job in enumerate(jobs):
      yield i, fn(job)
    return
  context = multiprocessing.get_context('spawn')
  pending = list(range(len(jobs)))[::-1]
  while pending:
    suspects: list[int] = []
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      in_flight: dict[concurrent.futures.Future, int] = {}
      while (pending or in_flight) and not suspects:
        while pending and len(in_flight) < 2 * num_workers:
          i = pending.pop()
          in_flight[pool.submit(fn, jobs[i])] = i
        done, _ = concurrent.futures.wait(in_flight, return_when='FIRST_COMPLETED')
        for future in done:
          i = in_flight.pop(future)
          try:
            result = future.result()
          except concurrent.futures.process.BrokenProcessPool:
            suspects = sorted([i, *in_flight.values()])
            break
          yield i, result
    for i in suspects:
      with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as alone:
        try:
          yield i, alone.submit(fn, jobs[i]).result()
        except concurrent.futures.process.BrokenProcessPool:
          yield i, WorkerDied('the worker process died while decoding it (killed by a signal, '
                              'e.g. the out-of-memory killer); lower the limits or '
                              '--num_workers, or leave it out')


# ---------------------------------------------------------------------------------------------
# Writing the records
# ---------------------------------------------------------------------------------------------
def _write_split(name: str, source: FileListSource, jobs: list[EncodeJob], out: Path,
                 progress: bool):
  """Writes split `name`: its frames as array_record shards in `out` (local) and its
  `<name>.videos.npz`. Returns its tfds SplitInfo."""
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm
  frame_features = features()
  labels, video_ids, num_frames, first = [], [], [], [0]
  shard_paths, shard_lengths, total_bytes = [], [], 0
  writer, shard_bytes = None, 0
  ready = [(i, job) for i, job in enumerate(jobs) if Path(job.cache_file).is_file()]
  for video, (index, job) in enumerate(tqdm(ready, desc=f'writing {name}', disable=not progress)):
    with np.load(job.cache_file) as encoded:
      jpeg, offsets = encoded['jpeg'], encoded['offsets']
    if writer is None or shard_bytes > SHARD_BYTES:
      if writer is not None:
        writer.close()
      shard_paths.append(out / f'.{name}-shard{len(shard_paths):05d}')
      shard_lengths.append(0)
      writer, shard_bytes = ArrayRecordWriter(str(shard_paths[-1]), 'group_size:1'), 0
    for frame in range(len(offsets) - 1):
      record = frame_features.serialize_example(
          {'jpeg': jpeg[offsets[frame]:offsets[frame + 1]].tobytes(), 'video': video,
           'frame': frame})
      writer.write(record)
      shard_bytes += len(record)
    total_bytes += int(offsets[-1])
    shard_lengths[-1] += len(offsets) - 1
    labels.append(source.label(index))
    video_ids.append(source.name(index))
    num_frames.append(len(offsets) - 1)
    first.append(first[-1] + num_frames[-1])
  if writer is not None:
    writer.close()
  template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=PREPARED_BUILDER_NAME,
                                           split=name, filetype_suffix='array_record')
  for shard, path in enumerate(shard_paths):
    os.replace(path, template.sharded_filepath(shard_index=shard, num_shards=len(shard_paths)))
  np.savez(out / f'{name}.videos.npz', label=np.asarray(labels, np.int32),
                   video_id=np.asarray(video_ids, dtype=str), num_frames=np.asarray(num_frames),
                   first=np.asarray(first, np.int64))
  return tfds.core.SplitInfo(name=name, shard_lengths=shard_lengths, num_bytes=total_bytes,
                             filename_template=template)


def _sha256(path: str | os.PathLike) -> str:
  return hashlib.sha256(fileio.run_path(path).read_bytes()).hexdigest()


def prepare(lists: Sequence[str | os.PathLike], root: str | os.PathLike,
            labels: str | os.PathLike, out: str | os.PathLike, *, short_side: int = 256,
            quality: int = 90, num_workers: int = 0, overwrite: bool = False,
            cache_dir: str | os.PathLike | None = None, limits: DecodeLimits = DecodeLimits(),
            progress: bool = True, allow_outside_root: bool = False):
  """Builds the prepared dataset at `out`; see the module docstring. Returns `out`."""
  from tqdm import tqdm
  out = fileio.run_path(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose another path or pass --overwrite.')
  class_names = read_labels(labels)
  splits: dict[str, FileListSource] = {}
  for list_path in lists:
    name = split_name(list_path)
    if name in splits:
      raise DataError(f'Two lists give the split name {name!r}; rename one of the files.')
    if name == 'all':
      raise DataError(f'{list_path} gives the split name "all", which tensorflow-datasets '
                      'reserves for every split together; rename the file.')
    splits[name] = FileListSource(root, list_path, len(class_names), allow_outside_root)
  cache = Path(cache_dir) if cache_dir else default_cache_dir(out)
  cache.mkdir(parents=True, exist_ok=True)
  split_jobs = {n: _jobs(s, cache, short_side, quality, limits) for n, s in splits.items()}
  todo, skipped = {}, []
  for name, jobs in split_jobs.items():
    for job in jobs:
      error = _read_skip(Path(job.cache_file).with_suffix('.skip'), limits)
      if error is not None:
        skipped.append(error)
      elif not Path(job.cache_file).is_file():
        todo.setdefault(job.cache_file, job)       # A video listed twice is encoded once.
  total = len({j.cache_file for jobs in split_jobs.values() for j in jobs})
  if len(todo) < total:
    print(f'Resuming: {total - len(todo)} of {total} videos are already encoded in {cache}.',
          file=sys.stderr)
  jobs = list(todo.values())
  results = run_jobs(_cache_one, jobs, num_workers)
  for i, error in tqdm(results, total=len(jobs), desc='encoding videos', disable=not progress):
    if isinstance(error, WorkerDied):
      error = f'{jobs[i].name}: {error}'
      _write_skip(Path(jobs[i].cache_file), error, limits)
    if error is not None:
      skipped.append(error)
      if len(skipped) <= MAX_LOGGED:
        logging.warning('Skipping an unreadable video: %s', error)
  if len(skipped) > MAX_LOGGED:
    logging.warning('%d unreadable videos skipped in all (listed in skipped.txt).', len(skipped))
  manifest = {'format': PREPARED_VERSION, 'short_side': short_side, 'quality': quality,
              'limits': dataclasses.asdict(limits), 'root': str(root),
              'lists': {n: {'file': str(p), 'sha256': _sha256(p)}
                        for n, p in zip(splits, lists)},
              'labels_sha256': _sha256(labels)}
  import tensorflow_datasets as tfds
  with fileio.staged_directory(out, overwrite=overwrite, stage=cache / '.staging') as tmp:
    split_infos = [_write_split(n, splits[n], split_jobs[n], tmp, progress) for n in splits]
    tfds.folder_dataset.write_metadata(data_dir=tmp, features=features(),
                                       split_infos=split_infos, version=PREPARED_VERSION,
                                       check_data=False,
                                       description='Video frames as JPEGs (claver_jax).')
    (tmp / 'labels.csv').write_bytes(fileio.run_path(labels).read_bytes())
    (tmp / 'skipped.txt').write_text(''.join(f'{s}\n' for s in skipped))
    (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
  shutil.rmtree(cache, ignore_errors=True)
  return out


def default_cache_dir(out) -> Path:
  """DIR.cache beside a local DIR; for a remote one, a folder of the temp directory named after
  it (the same for a rerun, so that it resumes)."""
  if not fileio.is_remote(out):
    return Path(out).with_name(Path(out).name + '.cache')
  digest = hashlib.sha256(str(out).encode('utf-8')).hexdigest()[:12]
  return Path(tempfile.gettempdir()) / f'claver_prepare-{Path(str(out)).name}-{digest}'


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  limits = DecodeLimits(f.max_frames, f.max_pixels, f.max_decode_seconds)
  try:
    out = prepare(f.list, f.root, f.labels, f.out, short_side=f.short_side, quality=f.quality,
                  num_workers=f.num_workers, overwrite=f.overwrite,
                  cache_dir=f.cache_dir or None, limits=limits,
                  allow_outside_root=f.allow_outside_root)
  except (DataError, FileExistsError, ValueError) as e:
    sys.exit(f'error: {e}')
  skipped = (find_dataset_dir(out) / 'skipped.txt').read_text().splitlines()
  print(f'Wrote {out} (splits: {", ".join(split_name(p) for p in f.list)}; '
        f'{len(skipped)} unreadable videos skipped).')


def define_flags() -> None:
  from absl import flags
  limits = DecodeLimits()
  flags.DEFINE_multi_string('list', None, 'A list file ("path LABEL" lines); repeat for more '
                            'splits, each named after its file.', required=True)
  flags.DEFINE_string('root', None, 'Folder or uncompressed tar holding the videos.',
                      required=True)
  flags.DEFINE_string('labels', None, 'Labels CSV (id,name).', required=True)
  flags.DEFINE_string('out', None, 'Output directory (must not exist); may be gs://BUCKET/PATH.',
                      required=True)
  flags.DEFINE_integer('short_side', 256, 'Frames are resized so their short side is this.')
  flags.DEFINE_integer('quality', 90, 'JPEG quality.')
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Encoding processes; 0 in-process.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists (once complete).')
  flags.DEFINE_bool('allow_outside_root', False, 'Accept list paths outside --root (absolute, '
                    "or up through '..').")
  flags.DEFINE_string('cache_dir', '', 'Where encoded videos wait (a local folder; default: '
                      'OUT.cache, or a folder of the temp directory for a remote OUT).')
  flags.DEFINE_integer('max_frames', limits.max_frames, 'Skip a video with more frames.')
  flags.DEFINE_integer('max_pixels', limits.max_pixels, 'Skip a video whose frames hold more '
                       'pixels in all (frames x height x width, before resizing).')
  flags.DEFINE_float('max_decode_seconds', limits.max_seconds, 'Skip a video whose decoding '
                     'takes longer.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
