"""Where clips come from: a list file over a video folder or tar, a prepared array_record
dataset, or the synthetic motion set.

Every source has `len(source)`, `source.label(i)` (int), `source.name(i)` (a path for logs) and
`source.open(i)`, which returns a `video.Video` or raises `video.VideoError`, and says whether a
horizontal flip changes the class of its clips (`source.flips_change_labels`: True for the
synthetic motion set, whose left/right and clockwise twins a flip swaps). Sources are
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
import json
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from claver_jax import fileio
from claver_jax.data import synthetic
from claver_jax.data.labels import DataError, read_labels  # noqa: F401 (re-exported)
from claver_jax.data.video import ArrayVideo, InMemory, Video, VideoError, open_video

# The prepared format (`python -m claver_jax.data.prepare` writes it, PreparedSource reads it).
PREPARED_BUILDER_NAME = 'claver_video_frames'
PREPARED_VERSION = '2.0.0'  # 1.0.0: one record per video (every frame read for every clip).


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
  flips_change_labels = False

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
  flips_change_labels = True    # "moving left" mirrored is "moving right", and so on.

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

  @property
  def flips_change_labels(self) -> bool:
    return self.source.flips_change_labels

  def __len__(self) -> int:
    return len(self.indices)

  def label(self, index: int) -> int:
    return self.source.label(self.indices[index])

  def name(self, index: int) -> str:
    return self.source.name(self.indices[index])

  def open(self, index: int) -> Video:
    return self.source.open(self.indices[index])


class PreparedVideo(InMemory):
  """A video of a prepared split behind the `Video` interface: `frames` reads and decodes the
  records of the frames asked for, and no others."""

  def __init__(self, records, first: int, num_frames: int, video: int, name: str):
    self._records, self._first, self._video = records, first, video
    self.num_frames, self.name = num_frames, name

  def frames(self, indices, short_side: int | None = None, enlarge: bool = True) -> np.ndarray:
    from PIL import Image
    from claver_jax.data.video import resized_shape
    wanted = list(dict.fromkeys(int(i) for i in indices))
    if any(not 0 <= i < self.num_frames for i in wanted):
      raise IndexError(f'{self.name}: frames {wanted} asked of {self.num_frames}')
    records = self._records.__getitems__([self._first + i for i in wanted])
    decoded = {}
    for i, record in zip(wanted, records):
      if (int(record['video']), int(record['frame'])) != (self._video, i):
        raise DataError(f'{self.name}: record {self._first + i} holds frame {record["frame"]} of '
                        f'video {record["video"]}, not frame {i} of video {self._video}: the '
                        'dataset is inconsistent; prepare it again.')
      try:
        decoded[i] = Image.open(io.BytesIO(record['jpeg'])).convert('RGB')
      except OSError as e:
        raise VideoError(f'{self.name}: frame {i} is not a readable JPEG ({e})') from e
    first = decoded[wanted[0]]
    h, w = resized_shape(first.height, first.width, short_side, enlarge)
    arrays = {i: np.asarray(im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR))
              for i, im in decoded.items()}
    return np.stack([arrays[int(i)] for i in indices])


def find_dataset_dir(directory: str | os.PathLike):
  """The folder holding dataset_info.json: `directory` itself (or what its object-store link
  names) or its builder/version folder. Raises DataError for a dataset of another format."""
  directory = fileio.resolve_link(fileio.run_path(directory))
  if (directory / 'dataset_info.json').is_file():
    found = directory
  else:
    candidates = sorted(directory.glob(f'{PREPARED_BUILDER_NAME}/*/dataset_info.json'))
    if not candidates:
      raise DataError(f'{directory} holds no prepared dataset (no dataset_info.json); build one '
                      'with `python -m claver_jax.data.prepare`.')
    found = candidates[-1].parent
  version = json.loads((found / 'dataset_info.json').read_text()).get('version')
  if version != PREPARED_VERSION:
    raise DataError(f'{found} was prepared in format {version}, which stores whole videos as '
                    f'records; this version reads format {PREPARED_VERSION} (a record per frame). '
                    'Prepare it again with `python -m claver_jax.data.prepare`.')
  return found



class PreparedSource:
  """A split of a dataset written by `python -m claver_jax.data.prepare` (local or gs://): its
  videos from `<split>.videos.npz`, their frames one record each through `tfds.data_source`
  (array_record, no TensorFlow), read only when a clip samples them."""
  flips_change_labels = False

  def __init__(self, directory: str | os.PathLike, split: str):
    self.directory = find_dataset_dir(directory)
    self.split = split
    self._source = None
    index_file = self.directory / f'{split}.videos.npz'
    if not index_file.is_file():
      splits = sorted(p.name[:-len('.videos.npz')] for p in self.directory.glob('*.videos.npz'))
      raise DataError(f'{self.directory} has no split {split!r}; it has {splits}.')
    with index_file.open('rb') as f, np.load(f) as index:
      self._labels, self._ids = index['label'], index['video_id']
      self._num_frames, self._first = index['num_frames'], index['first']

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_source': None}

  def _data(self):
    if self._source is None:
      import tensorflow_datasets as tfds
      builder = tfds.builder_from_directory(str(self.directory))
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return len(self._labels)

  def label(self, index: int) -> int:
    return int(self._labels[index])

  def name(self, index: int) -> str:
    return str(self._ids[index])

  def num_frames(self, index: int) -> int:
    return int(self._num_frames[index])

  def open(self, index: int) -> Video:
    return PreparedVideo(self._data(), int(self._first[index]), int(self._num_frames[index]),
                         index, self.name(index))


class Ucf101TfdsSource:
  """tensorflow-datasets' own `ucf101` builder (an optional extra: it needs TensorFlow)."""
  flips_change_labels = False

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
