r"""Prepares a video list as a tensorflow-datasets array_record dataset (no TensorFlow needed).

    python -m claver_jax.data.prepare --list=train.txt --list=val.txt --root=videos/ \
        --labels=labels.csv --out=DIR [--short_side=256] [--quality=90] [--num_workers=N]

Each list becomes a split named after its file (train.txt -> 'train'). Each record holds a
clip's frames as JPEGs with the short side resized to --short_side ('jpeg': uint8 [bytes],
concatenated; 'offsets': int64 [N + 1], frame i is jpeg[offsets[i]:offsets[i + 1]]), its
'label', its 'video_id' (the list's path) and 'num_frames' (the source's frame count). DIR also
gets labels.csv, and skipped.txt listing unreadable videos (skipped, never fatal).

Interrupted runs resume: the frames of each video are encoded into DIR.cache/ first (one file per
video, written atomically) and reused by the next run; the records are written from that cache
into DIR atomically, and the cache is removed on success. Read back with
`sources.PreparedSource(DIR, 'train')` or config.data.source = 'tfds'.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from claver_jax.data.sources import DataError, FileListSource, read_labels
from claver_jax.data.video import VideoError

BUILDER_NAME = 'claver_video_frames'
MAX_LOGGED = 20


def find_dataset_dir(directory: str | os.PathLike) -> Path:
  """The folder holding dataset_info.json: `directory` itself or its builder/version folder."""
  directory = Path(directory)
  if (directory / 'dataset_info.json').is_file():
    return directory
  found = sorted(directory.glob(f'{BUILDER_NAME}/*/dataset_info.json'))
  if not found:
    raise DataError(f'{directory} holds no prepared dataset (no dataset_info.json); build one '
                    'with `python -m claver_jax.data.prepare`.')
  return found[-1].parent


def split_name(list_path: str | os.PathLike) -> str:
  """train.txt -> 'train'; characters tfds rejects become '_'."""
  return re.sub(r'\W', '_', Path(list_path).stem)


def _cache_one(job: tuple[FileListSource, int, Path, int, int]) -> str | None:
  """Encodes one video into the cache; returns the error text if it cannot be read."""
  source, index, cache_file, short_side, quality = job
  try:
    with source.open(index) as video:
      frames = video.frames(range(video.num_frames), short_side)
    encoded = _encode_frames(frames, quality)
  except VideoError as e:
    cache_file.with_suffix('.skip').write_text(str(e))
    return str(e)
  tmp = cache_file.with_name(f'.{cache_file.name}.tmp')
  with open(tmp, 'wb') as f:
    np.savez(f, **encoded)
  os.replace(tmp, cache_file)
  return None


def _encode_frames(frames: np.ndarray, quality: int) -> dict[str, np.ndarray]:
  from PIL import Image
  chunks = []
  for frame in frames:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format='JPEG', quality=quality)
    chunks.append(np.frombuffer(buffer.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  return dict(jpeg=np.concatenate(chunks), offsets=offsets, num_frames=np.int64(len(frames)))


def _builder_class():
  import tensorflow_datasets as tfds

  class ClaverVideoFrames(tfds.core.GeneratorBasedBuilder):
    """Videos as JPEG frames; records come from the per-video cache of `prepare`."""

    VERSION = tfds.core.Version('1.0.0')
    name = BUILDER_NAME
    # Nothing is downloaded, so no checksums file is looked up beside the code; finding the
    # code's path needs `importlib_resources`, which tfds does not always install.
    code_path = None

    def __init__(self, *, splits: dict[str, tuple[FileListSource, Path]], **kwargs):
      self._splits = splits
      super().__init__(**kwargs)

    def _info(self):
      features = tfds.features.FeaturesDict({
          'jpeg': tfds.features.Tensor(shape=(None,), dtype=np.uint8),
          'offsets': tfds.features.Tensor(shape=(None,), dtype=np.int64),
          'label': tfds.features.Tensor(shape=(), dtype=np.int64),
          'video_id': tfds.features.Text(),
          'num_frames': tfds.features.Tensor(shape=(), dtype=np.int64)})
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   description='Video clips as JPEG frames (claver_jax).')

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(source, cache)
              for split, (source, cache) in self._splits.items()}

    def _generate_examples(self, source: FileListSource, cache: Path):
      for index in range(len(source)):
        cache_file = cache / f'{index:08d}.npz'
        if not cache_file.is_file():
          continue   # Skipped: unreadable.
        with np.load(cache_file) as encoded:
          yield index, {'jpeg': encoded['jpeg'], 'offsets': encoded['offsets'],
                        'label': source.label(index), 'video_id': source.name(index),
                        'num_frames': int(encoded['num_frames'])}

  return ClaverVideoFrames


def prepare(lists: Sequence[str | os.PathLike], root: str | os.PathLike,
            labels: str | os.PathLike, out: str | os.PathLike, *, short_side: int = 256,
            quality: int = 90, num_workers: int = 0, overwrite: bool = False,
            progress: bool = True, allow_outside_root: bool = False) -> Path:
  """Builds the prepared dataset at `out`; see the module docstring. Returns `out`."""
  from tqdm import tqdm
  from claver_jax.fileio import atomic_directory
  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose another path or pass --overwrite.')
  class_names = read_labels(labels)
  splits = {}
  for list_path in lists:
    name = split_name(list_path)
    if name in splits:
      raise DataError(f'Two lists give the split name {name!r}; rename one of the files.')
    splits[name] = FileListSource(root, list_path, len(class_names), allow_outside_root)
  cache_root = out.with_name(out.name + '.cache')
  jobs, skipped = [], []
  for name, source in splits.items():
    (cache_root / name).mkdir(parents=True, exist_ok=True)
    for index in range(len(source)):
      cache_file = cache_root / name / f'{index:08d}.npz'
      if cache_file.with_suffix('.skip').is_file():
        skipped.append(f'{source.name(index)}: {cache_file.with_suffix(".skip").read_text()}')
      elif not cache_file.is_file():
        jobs.append((source, index, cache_file, short_side, quality))
  total = sum(len(s) for s in splits.values())
  if len(jobs) < total:
    print(f'Resuming: {total - len(jobs)} of {total} videos are already encoded in {cache_root}.',
          file=sys.stderr)
  if num_workers > 0:
    import multiprocessing
    pool = multiprocessing.get_context('spawn').Pool(num_workers)
    results = pool.imap_unordered(_cache_one, jobs, chunksize=4)
  else:
    pool, results = None, map(_cache_one, jobs)
  try:
    for error in tqdm(results, total=len(jobs), desc='encoding videos', disable=not progress):
      if error is not None:
        skipped.append(error)
        if len(skipped) <= MAX_LOGGED:
          logging.warning('Skipping an unreadable video: %s', error)
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  if len(skipped) > MAX_LOGGED:
    logging.warning('%d unreadable videos skipped in all (listed in skipped.txt).', len(skipped))
  builder_class = _builder_class()
  with atomic_directory(out, overwrite=overwrite) as tmp:
    builder = builder_class(splits={n: (s, cache_root / n) for n, s in splits.items()},
                            data_dir=str(tmp), file_format='array_record')
    builder.download_and_prepare(download_dir=str(tmp / '.downloads'))
    shutil.rmtree(tmp / '.downloads', ignore_errors=True)
    shutil.copyfile(labels, tmp / 'labels.csv')
    (tmp / 'skipped.txt').write_text(''.join(f'{s}\n' for s in skipped))
  shutil.rmtree(cache_root, ignore_errors=True)
  return out


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    out = prepare(f.list, f.root, f.labels, f.out, short_side=f.short_side, quality=f.quality,
                  num_workers=f.num_workers, overwrite=f.overwrite,
                  allow_outside_root=f.allow_outside_root)
  except (DataError, FileExistsError) as e:
    sys.exit(f'error: {e}')
  skipped = (out / 'skipped.txt').read_text().splitlines()
  print(f'Wrote {out} (splits: {", ".join(split_name(p) for p in f.list)}; '
        f'{len(skipped)} unreadable videos skipped).')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_multi_string('list', None, 'A list file ("path LABEL" lines); repeat for more '
                            'splits, each named after its file.', required=True)
  flags.DEFINE_string('root', None, 'Folder or uncompressed tar holding the videos.',
                      required=True)
  flags.DEFINE_string('labels', None, 'Labels CSV (id,name).', required=True)
  flags.DEFINE_string('out', None, 'Output directory (must not exist).', required=True)
  flags.DEFINE_integer('short_side', 256, 'Frames are resized so their short side is this.')
  flags.DEFINE_integer('quality', 90, 'JPEG quality.')
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Encoding processes; 0 in-process.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists (once complete).')
  flags.DEFINE_bool('allow_outside_root', False, 'Accept list paths outside --root (absolute, '
                    "or up through '..').")


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
