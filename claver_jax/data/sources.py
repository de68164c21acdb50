"""Where clips come from: a list file over a video folder or tar, a prepared array_record
dataset, or the synthetic motion set.

Every source has `len(source)`, `source.label(i)` (int), `source.name(i)` (a path for logs) and
`source.open(i)`, which returns a `video.Video` or raises `video.VideoError`. Sources are
picklable and open their files lazily, so grain worker processes can use them.

List files have one clip per line, `relative/path.mp4 LABEL_ID` (the path may contain spaces; the
label is the last field); blank lines are skipped, a UTF-8 byte-order mark is not part of the
first path. Paths stay inside the data root: an absolute path, or one that climbs out through
'..', is an error unless `allow_outside_root` (config.data.allow_outside_root; links inside the
root are followed). Labels files are read by
`claver_jax.data.labels.read_labels` (`id,name` CSVs, or one name a line), re-exported here.
`few_shot_indices` draws a K-shot subset of a list and `SubsetSource` serves it.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from claver_jax.data import synthetic
from claver_jax.data.labels import DataError, read_labels  # noqa: F401 (re-exported)
from claver_jax.data.video import ArrayVideo, InMemory, Video, VideoError, open_video


# ---------------------------------------------------------------------------------------------
# Metadata files
# ---------------------------------------------------------------------------------------------
def leaves_root(relative: str) -> bool:
  """True for a list path that does not name a file under the root: absolute, or climbing out
  through '..'."""
  normal = os.path.normpath(relative)
  return os.path.isabs(normal) or normal == '..' or normal.startswith('..' + os.sep)


def read_list(path: str | os.PathLike, num_classes: int | None = None,
              allow_outside_root: bool = False) -> list[tuple[str, int]]:
  """A list file -> [(relative path, label)]; errors name the file and line."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'List file {path} does not exist.')
  items = []
  with open(path, encoding='utf-8-sig') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.strip().rsplit(None, 1)
      where = f'{path}:{line_number}'
      if len(fields) != 2 or not fields[1].isdigit():
        raise DataError(f'{where}: expected "relative/path.mp4 LABEL_ID" with an integer label, '
                        f'got {line.strip()!r}.')
      label = int(fields[1])
      if not allow_outside_root and leaves_root(fields[0]):
        raise DataError(f'{where}: {fields[0]!r} is not a path inside the data root (it is '
                        "absolute or climbs out through '..'). Make it relative to the root, or "
                        'set config.data.allow_outside_root=True (prepare: '
                        '--allow_outside_root) if the list is meant to reach elsewhere.')
      if num_classes is not None and label >= num_classes:
        raise DataError(f'{where}: label {label} is not in the labels CSV, which has ids '
                        f'0..{num_classes - 1}; the list and the labels CSV disagree.')
      items.append((fields[0], label))
  if not items:
    raise DataError(f'List file {path} has no clips.')
  return items


def few_shot_indices(labels: Sequence[int], class_names: Sequence[str], shots: int, seed: int,
                     where: str = 'the train list') -> list[int]:
  """Indices of `shots` clips of every class, in list order: the K-shot subset of a split.

  Class c's clips are drawn without replacement by default_rng((seed, c)), so a class's draw
  depends only on the seed, its own clips and their order in the list, never on the process or
  the run. A class with fewer than `shots` clips is an error that names it and its count.
  """
  if shots < 1:
    raise ValueError(f'shots must be >= 1 (0 means all clips and needs no subset), got {shots}.')
  members: list[list[int]] = [[] for _ in class_names]
  for index, label in enumerate(labels):
    members[label].append(index)
  short = [(c, len(m)) for c, m in enumerate(members) if len(m) < shots]
  if short:
    listed = ', '.join(f'{class_names[c]!r} (id {c}): {n}' for c, n in short[:20])
    more = f' and {len(short) - 20} more' if len(short) > 20 else ''
    raise DataError(f'config.data.shots={shots}, but {len(short)} of {len(class_names)} classes '
                    f'have fewer clips than that in {where}: {listed}{more}. Lower shots or fix '
                    'the list.')
  chosen = []
  for c, m in enumerate(members):
    rng = np.random.default_rng((seed, c))
    chosen.extend(m[i] for i in rng.choice(len(m), shots, replace=False))
  return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
class FileListSource:
  """Clips of a list file, in a folder or an uncompressed tar (members read in place)."""

  def __init__(self, root: str | os.PathLike, list_path: str | os.PathLike,
               num_classes: int | None = None, allow_outside_root: bool = False):
    self.root = Path(root)
    self.items = read_list(list_path, num_classes, allow_outside_root)
    self.is_tar = self.root.is_file()
    if not self.is_tar and not self.root.is_dir():
      raise DataError(f'Video root {self.root} is neither a folder nor a tar archive; set '
                      'config.data.root.')
    if self.is_tar and not tarfile.is_tarfile(self.root):
      raise DataError(f'Video root {self.root} is a file but not a tar archive.')
    self._members: dict[str, tuple[int, int]] | None = None

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_members': None}   # Each process indexes the tar itself.

  def __len__(self) -> int:
    return len(self.items)

  def label(self, index: int) -> int:
    return self.items[index][1]

  def name(self, index: int) -> str:
    return self.items[index][0]

  def _tar_members(self) -> dict[str, tuple[int, int]]:
    if self._members is None:
      with tarfile.open(self.root, 'r:') as tar:
        self._members = {os.path.normpath(m.name): (m.offset_data, m.size)
                         for m in tar if m.isfile()}
    return self._members

  def open(self, index: int) -> Video:
    relative = self.items[index][0]
    if not self.is_tar:
      return open_video(self.root / relative, name=str(self.root / relative))
    name = f'{self.root}:{relative}'
    member = self._tar_members().get(os.path.normpath(relative))
    if member is None:
      raise VideoError(f'{name}: no such member in the tar archive')
    offset, size = member
    with open(self.root, 'rb') as f:
      f.seek(offset)
      data = f.read(size)
    return open_video(io.BytesIO(data), name=name)


class SyntheticSource:
  """The synthetic motion set's `split` among its first `num_videos` clips, made in memory.

  Each clip is made on first use and kept while the whole split fits in `cache_bytes` (in each
  process: grain workers keep their own), so later epochs cost no rendering. 0 keeps nothing.
  """

  def __init__(self, split: str, num_videos: int, num_frames: int = 16, size: int = 64,
               seed: int = 0, cache_bytes: int = 2 << 30):
    self.indices = synthetic.split_indices(num_videos, split)
    if not self.indices:
      raise DataError(f'The synthetic {split} split of {num_videos} clips is empty; raise '
                      'config.data.synthetic_videos.')
    self.num_frames, self.size, self.seed = num_frames, size, seed
    height, width = (size, size) if isinstance(size, int) else size
    split_bytes = len(self.indices) * num_frames * height * width * 3
    self._cache: dict[int, np.ndarray] | None = {} if split_bytes <= cache_bytes else None

  def __len__(self) -> int:
    return len(self.indices)

  def label(self, index: int) -> int:
    return self.indices[index] % synthetic.NUM_CLASSES

  def name(self, index: int) -> str:
    return f'synthetic:{self.indices[index]}'

  def open(self, index: int) -> Video:
    clip = None if self._cache is None else self._cache.get(index)
    if clip is None:
      clip, _ = synthetic.make_clip(self.indices[index], seed=self.seed,
                                    num_frames=self.num_frames, size=self.size)
      clip.setflags(write=False)       # Shared by every later epoch.
      if self._cache is not None:
        self._cache[index] = clip
    return ArrayVideo(clip)


class SubsetSource:
  """The clips `indices` of another source, in that order (e.g. a K-shot draw of a train list)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def label(self, index: int) -> int:
    return self.source.label(self.indices[index])

  def name(self, index: int) -> str:
    return self.source.name(self.indices[index])

  def open(self, index: int) -> Video:
    return self.source.open(self.indices[index])


class JpegVideo(InMemory):
  """A prepared record's JPEG frames behind the `Video` interface; decodes only what is asked."""

  def __init__(self, jpeg: np.ndarray, offsets: np.ndarray, name: str):
    self._jpeg, self._offsets, self.name = jpeg, offsets, name
    self.num_frames = len(offsets) - 1
    if self.num_frames < 1:
      raise VideoError(f'{name}: the record holds no frames')

  def frames(self, indices, short_side: int | None = None, enlarge: bool = True) -> np.ndarray:
    from PIL import Image
    decoded = {}
    for i in dict.fromkeys(int(i) for i in indices):
      data = self._jpeg[self._offsets[i]:self._offsets[i + 1]].tobytes()
      try:
        decoded[i] = Image.open(io.BytesIO(data)).convert('RGB')
      except OSError as e:
        raise VideoError(f'{self.name}: frame {i} is not a readable JPEG ({e})') from e
    from claver_jax.data.video import resized_shape
    first = next(iter(decoded.values()))
    h, w = resized_shape(first.height, first.width, short_side, enlarge)
    arrays = {i: np.asarray(im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR))
              for i, im in decoded.items()}
    return np.stack([arrays[int(i)] for i in indices])


class PreparedSource:
  """A split of a dataset written by `python -m claver_jax.data.prepare`, read through
  `tfds.data_source` (array_record, no TensorFlow)."""

  def __init__(self, directory: str | os.PathLike, split: str):
    from claver_jax.data.prepare import find_dataset_dir
    self.directory = find_dataset_dir(directory)
    self.split = split
    self._source = None
    self._cached: tuple[int, dict] | None = None
    self._length = len(self._data())

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_source': None, '_cached': None}

  def _data(self):
    if self._source is None:
      import tensorflow_datasets as tfds
      builder = tfds.builder_from_directory(str(self.directory))
      if self.split not in builder.info.splits:
        raise DataError(f'{self.directory} has no split {self.split!r}; it has '
                        f'{sorted(builder.info.splits)}.')
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._length

  def _record(self, index: int) -> dict:
    if self._cached is None or self._cached[0] != index:   # label() then open() read once.
      self._cached = (index, self._data()[index])
    return self._cached[1]

  def label(self, index: int) -> int:
    return int(self._record(index)['label'])

  def name(self, index: int) -> str:
    return _text(self._record(index)['video_id'])

  def open(self, index: int) -> Video:
    record = self._record(index)
    return JpegVideo(record['jpeg'], record['offsets'], _text(record['video_id']))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Ucf101TfdsSource:
  """tensorflow-datasets' own `ucf101` builder (an optional extra: it needs TensorFlow)."""

  def __init__(self, data_dir: str | os.PathLike | None, split: str):
    try:
      import tensorflow  # noqa: F401  (tfds decodes ucf101's Video feature with TensorFlow.)
    except ImportError as e:
      raise DataError('config.data.tfds_name="ucf101" reads tfds\'s own ucf101 builder, whose '
                      'Video feature needs TensorFlow: `pip install tensorflow`. Or prepare '
                      'UCF-101 from its videos with `python -m claver_jax.data.prepare`, which '
                      'needs no TensorFlow.') from e
    import tensorflow_datasets as tfds
    self._source = tfds.data_source('ucf101', split=split, data_dir=data_dir or None)
    self._names = tfds.builder('ucf101', data_dir=data_dir or None).info.features['label'].names

  @property
  def class_names(self) -> list[str]:
    return list(self._names)

  def __len__(self) -> int:
    return len(self._source)

  def label(self, index: int) -> int:
    return int(self._source[index]['label'])

  def name(self, index: int) -> str:
    return f'ucf101:{index}'

  def open(self, index: int) -> Video:
    return ArrayVideo(np.asarray(self._source[index]['video']))
