"""grain input pipelines for training and evaluation, built from `config.data`.

    >>> data = build_pipelines(config.data)            # config.data starts from default_config()
    >>> train_iter = iter(data.train)                  # checkpointable: get_state() / set_state()
    >>> batch = next(train_iter)                       # host batch, fixed shapes, see below
    >>> batch = make_global_batch(batch, NamedSharding(mesh, P('data')))
    >>> video = normalize(batch['video'])              # on device, under jit
    >>> video, targets = mixup_cutmix(rng, video, batch['label'], len(data.class_names))

Host batches (per JAX process, B = config.data.batch_size):
  train: {'video': uint8 [B, T, S, S, 3], 'label': int32 [B], 'substituted': bool [B]}
  eval:  {'video': uint8 [B, V, T, S, S, 3], 'label': int32 [B], 'substituted': bool [B],
          'valid': bool [B], 'index': int32 [B]}, V = num_clips * num_crops views, clip-major
          (clip 0's crops first); 'index' is the sample's position in the eval list
          (`Pipelines.eval_name(index)` names its video).
'substituted' marks a sample whose video could not be read: in training it is replaced by the
next readable video of the list (its label comes along), in evaluation by a black clip with the
original label, which evaluation leaves out and counts (evaluate.run_eval). 'valid' is False only
for the padding of each process's last batch, so that one pass covers every eval sample exactly once
and every process runs the same number of batches. Substitutions are counted by
`Pipelines.train_substitutions` / `.eval_substitutions`: each unreadable path is logged once, with
what is wrong with it, the first 20 of them, then they are only counted; `Pipelines.metrics()`
gives the totals for the run's metrics. A run stops when the substituted share passes
config.data.max_substituted (`Pipelines.check_substituted`), and `build_pipelines` opens a sample
of each list's videos first: when none or most of them cannot be opened (a wrong
config.data.root) it stops before anything trains.

Train order: one global stream, the same whatever the number of processes: the train list
shuffled with config.data.seed, reshuffled every epoch, repeated forever, and cut into global
batches of batch_size x shard_count clips. Each process reads the rows of each global batch that
its devices hold (`train_rows`: on TPU slices they interleave with other processes' rows; by
default process i reads rows [i B, (i + 1) B), B = batch_size). Each clip's augmentation is drawn from
default_rng((seed, epoch, clip index in the train list)), so batches do not depend on the process
count or on config.data.num_workers. The iterator state counts global batches, so a restored
state replays exactly the batches that followed it, in a run with any number of processes (the
same global batch size). grain's in-process and multi-worker states differ in form: a state saved
with another num_workers is converted on restore (checkpoint.iterator_state). num_workers is
capped at the CPUs this process may use, with a warning.
Worker processes (num_workers > 0) need the caller's entry point under
`if __name__ == '__main__':`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from claver_jax.data import synthetic
from claver_jax.data.sources import (DataError, FileListSource, PreparedSource, SubsetSource,
                                     SyntheticSource, Ucf101TfdsSource, find_dataset_dir,
                                     few_shot_indices, read_labels)
from claver_jax.data.transforms import (CLIP_MEAN, CLIP_STD, MULTI_SCALES, TEST_RESIZE_RATIO,
                                        augment_train_clip, eval_short_side, normalize,
                                        spatial_crops, train_short_side)
from claver_jax.data.video import VideoError, eval_indices, train_indices
from claver_jax import fileio
from claver_jax.fileio import atomic_write_text

__all__ = ['Pipelines', 'SubstitutionLog', 'build_pipelines', 'default_config',
           'make_global_batch', 'normalize']

MAX_LOGGED = 20
SAMPLE_CHECKED = 16      # Videos of each list opened at start-up (`check_readable`).
MIN_JUDGED = 10          # Train substitutions counted before their share can stop a run.
SOURCES = ('filelist', 'tfds', 'synthetic')


def default_config() -> ml_collections.ConfigDict:
  """The default `config.data`; configs start from it and override what they need.

  source:        'filelist' (videos + list files), 'tfds' (a prepared dataset, or tfds's own
                 ucf101 with tfds_name='ucf101'), or 'synthetic' (the motion set, in memory).
  root:          filelist: folder or uncompressed tar of the videos; tfds: the directory written
                 by `python -m claver_jax.data.prepare` (tfds_name='ucf101': tfds's data_dir).
  train_list, val_list: filelist: list files ("relative/path.mp4 LABEL" lines); tfds: split
                 names. '' skips that pipeline. Unused for synthetic.
  allow_outside_root: filelist: accept list paths that leave root (absolute, or up through
                 '..'); False rejects them, naming the line.
  labels:        labels CSV (id,name). tfds: defaults to root/labels.csv. Unused for synthetic.
  num_frames:    T, frames per clip.          image_size: S, the square crop side.
  batch_size:    host batch per JAX process (train); eval_batch_size likewise for eval.
  num_workers:   grain worker processes; 0 decodes in the calling process.
  worker_buffer_size: batches each worker prepares ahead.
  read_threads, read_buffer: threads that prepare batches in each process (the caller's when
                 num_workers is 0, else each worker's), and how many batches they run ahead.
  seed:          shuffling and augmentation seed.
  max_substituted: the share of unreadable (substituted) samples a run accepts: training stops
                 once more than this share of the clips it has read were substitutes (judged from
                 10 substitutions on), an evaluation when more than this share of its videos
                 were. At start-up, a list none or most of whose sampled videos cannot be opened
                 stops the run (a wrong config.data.root), whatever this says.
  shots, shots_seed: few-shot training: keep `shots` clips of every class of the train list (0 =
                 all), drawn by `few_shot_indices` with shots_seed: the same list in every
                 process and every run. filelist and synthetic sources only. The kept list is
                 logged with a digest and, given a workdir, written to
                 WORKDIR/train_<shots>shot_seed<shots_seed>.txt (for filelist a list file: as
                 train_list with shots=0 it trains on exactly those clips).
  num_clips, num_crops: eval views (temporal clips x spatial crops); the paper tests with 4 x 3.
  eval_resize_ratio: one crop is the centre S crop of frames whose short side is resized to
                 int(ratio S): 256/224, the official test view, by default; 1.0 for models
                 trained on whole frames (MultiScaleCrop off), as the demo. 3 crops: short side S.
  mean, std:     per-channel normalisation of `normalize` (CLIP's by default).
  scales, flip_prob, jitter_prob, jitter (brightness, contrast, saturation, hue),
  grayscale_prob: train augmentation. flip_prob must be 0 on a source whose classes a
                 horizontal flip swaps (the synthetic motion set's left/right and clockwise
                 twins): configs/demo.py sets 0; > 0 there is an error.
  synthetic_videos, synthetic_frames, synthetic_size, synthetic_seed: the synthetic set: clips
                 0..synthetic_videos-1 (i % 5 == 4 go to val), frames per clip, frame side, seed.
  tfds_name:     '' for a prepared dataset; 'ucf101' for tfds's own builder (needs TensorFlow).
  """
  return ml_collections.ConfigDict(dict(
      source='filelist', root='', train_list='', val_list='', labels='',
      allow_outside_root=False, num_frames=8,
      image_size=224, batch_size=8, eval_batch_size=8, num_workers=0, worker_buffer_size=2,
      read_threads=2, read_buffer=2,
      seed=0, max_substituted=0.05, shots=0, shots_seed=0, num_clips=1, num_crops=1,
      eval_resize_ratio=TEST_RESIZE_RATIO, mean=CLIP_MEAN, std=CLIP_STD,
      scales=MULTI_SCALES,
      flip_prob=0.5, jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1), grayscale_prob=0.2,
      synthetic_videos=1200, synthetic_frames=16, synthetic_size=64, synthetic_seed=0,
      tfds_name=''))


# ---------------------------------------------------------------------------------------------
# Counting substitutions
# ---------------------------------------------------------------------------------------------
class SubstitutionLog:
  """Counts substituted samples seen by the caller; logs each unreadable path once, with its
  reason, the first MAX_LOGGED of them.

  count: substituted samples; paths: the distinct unreadable paths logged; reasons: what was
  wrong with each of them (the VideoError's message).
  """

  def __init__(self, split: str, name_of: Callable[[int], str], keep_index: bool = False):
    self.split, self._name_of, self._keep_index = split, name_of, keep_index
    self.count = 0
    self.paths: list[str] = []
    self.reasons: list[str] = []
    self._seen: set[str] = set()

  def record(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Takes the internal 'index' and 'reason' fields off a host batch (keeps 'index' as int32
    with `keep_index`) and logs its new unreadable paths."""
    indices, reasons = batch.pop('index'), batch.pop('reason')
    if self._keep_index:
      batch['index'] = indices.astype(np.int32)
    for index, reason in zip(indices[batch['substituted']], reasons[batch['substituted']]):
      self.count += 1
      path = self._name_of(int(index))
      if path in self._seen:
        continue
      self._seen.add(path)
      if len(self.paths) < MAX_LOGGED:
        self.paths.append(path)
        self.reasons.append(str(reason))
        logging.warning('Unreadable %s video, replaced by a substitute: %s', self.split, reason)
        if len(self.paths) == MAX_LOGGED:
          logging.warning('Further unreadable %s videos are counted, not logged.', self.split)
    return batch

  def summary(self) -> dict[str, int]:
    return {f'data/{self.split}_substituted': self.count}


# ---------------------------------------------------------------------------------------------
# Samples (these run in grain workers)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleLoader:
  """Reads and augments one clip of `source`; picklable for grain workers."""

  source: Any
  num_frames: int
  image_size: int
  seed: int = 0
  num_clips: int = 1
  num_crops: int = 1
  eval_resize_ratio: float = TEST_RESIZE_RATIO
  scales: tuple[float, ...] = MULTI_SCALES
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)
  grayscale_prob: float = 0.2
  max_substitution_tries: int = 8

  def _train_clip(self, source_index: int, rng: np.random.Generator) -> np.ndarray:
    with self.source.open(source_index) as video:
      indices = train_indices(video.num_frames, self.num_frames, rng)
      # Frames larger than the resize target shrink while they are converted (fewer pixels to
      # convert); smaller ones are converted as they are and resized inside the crop.
      clip = video.frames(indices, short_side=train_short_side(self.image_size), enlarge=False)
    return augment_train_clip(clip, self.image_size, rng, scales=self.scales,
                              flip_prob=self.flip_prob, jitter_prob=self.jitter_prob,
                              jitter=self.jitter, grayscale_prob=self.grayscale_prob)

  def train_sample(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    """(epoch, clip index) of the train stream -> the augmented sample (see TrainOrder); 'reason'
    says why the clip itself could not be read ('' when it could)."""
    epoch, source_index = item
    size = len(self.source)
    reason = ''
    for attempt in range(self.max_substitution_tries + 1):
      candidate = (source_index + attempt) % size
      rng = np.random.default_rng((self.seed, epoch, source_index, attempt))
      try:
        video = self._train_clip(candidate, rng)
      except VideoError as e:
        reason = reason or str(e)
        continue
      return dict(video=video, label=np.int32(self.source.label(candidate)),
                  substituted=np.bool_(attempt > 0), index=np.int64(source_index),
                  reason=np.str_(reason))
    return dict(video=np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.uint8),
                label=np.int32(self.source.label(source_index)), substituted=np.bool_(True),
                index=np.int64(source_index), reason=np.str_(reason))

  def eval_views(self, source_index: int) -> np.ndarray:
    """uint8 [V, T, S, S, 3]: num_clips deterministic clips x num_crops crops (one: the centre
    S crop of a short side of eval_resize_ratio S, 256/224 S by default; three: S crops along the
    long side of a short side S)."""
    with self.source.open(source_index) as video:
      indices = eval_indices(video.num_frames, self.num_frames, self.num_clips)
      frames = video.frames(indices.reshape(-1),
                            short_side=eval_short_side(self.image_size, self.num_crops,
                                                       self.eval_resize_ratio))
    clips = frames.reshape(self.num_clips, self.num_frames, *frames.shape[1:])
    views = np.stack([spatial_crops(clip, self.image_size, self.num_crops) for clip in clips])
    return views.reshape(-1, *views.shape[2:])

  def eval_item(self, item: tuple[int, bool]) -> dict[str, np.ndarray]:
    """(source index, valid) -> eval sample; padding (valid False) is a black clip."""
    source_index, valid = item
    num_views = self.num_clips * self.num_crops
    blank = np.zeros((num_views, self.num_frames, self.image_size, self.image_size, 3), np.uint8)
    reason = ''
    if valid:
      try:
        views = self.eval_views(source_index)
      except VideoError as e:
        views, reason = blank, str(e)
    else:
      views = blank
    return dict(video=views, label=np.int32(self.source.label(source_index) if valid else 0),
                substituted=np.bool_(bool(reason)), valid=np.bool_(valid),
                index=np.int64(source_index), reason=np.str_(reason))


@dataclasses.dataclass
class TrainOrder:
  """This process's share of the global train stream: element i -> (epoch, clip index).

  The global stream is the clips 0..num_clips-1 shuffled with `seed`, reshuffled every epoch,
  repeated forever; global batch k is its positions [k G, (k + 1) G), G = global_batch, and this
  process reads `rows` (ascending) of each. Picklable for grain workers.
  """

  num_clips: int
  global_batch: int
  rows: tuple[int, ...]
  seed: int

  def __post_init__(self):
    self._order = grain.MapDataset.range(self.num_clips).shuffle(seed=self.seed).repeat()

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    batch, row = divmod(index, len(self.rows))
    position = batch * self.global_batch + self.rows[row]
    return position // self.num_clips, int(self._order[position])


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pipelines:
  """What `build_pipelines` returns.

  train: endless grain IterDataset of train host batches; `iter(train)` is a DatasetIterator
      with get_state() / set_state() for checkpoints. None without a train list.
  eval: grain IterDataset of eval host batches; each `iter(eval)` is one full pass of
      `eval_batches` batches (`eval_pass()` iterates one and closes it). None without a val
      list. Close train / eval iterators (`.close()`) when done with them, or grain's workers
      complain at interpreter exit.
  class_names: class names in label-id order (from the labels CSV).
  num_train, num_eval: clips in the whole train / eval split (all processes).
  eval_name: an eval batch's 'index' -> the name of its video (a list file's path).
  max_substituted: config.data.max_substituted (see `check_substituted`).
  """

  train: grain.IterDataset | None
  eval: grain.IterDataset | None
  class_names: list[str]
  num_train: int
  num_eval: int
  eval_batches: int
  train_substitutions: SubstitutionLog
  eval_substitutions: SubstitutionLog
  eval_name: Callable[[int], str] = str
  max_substituted: float = 1.0

  def eval_pass(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split; closes grain's worker processes at the end."""
    iterator = iter(self.eval)
    try:
      yield from iterator
    finally:
      iterator.close()

  def metrics(self) -> dict[str, int]:
    """Totals of substituted (unreadable) videos so far, for the run's metrics."""
    return {**self.train_substitutions.summary(), **self.eval_substitutions.summary()}

  def check_substituted(self, split: str, substituted: int, total: int) -> None:
    """A DataError when `substituted` of `total` samples of `split` ('train': the clips read so
    far, judged from MIN_JUDGED substitutions on; 'eval': one whole pass) is more than
    max_substituted of them, naming the first unreadable paths and why."""
    if substituted <= self.max_substituted * total or (split == 'train' and
                                                       substituted < MIN_JUDGED):
      return
    log = self.train_substitutions if split == 'train' else self.eval_substitutions
    examples = '; '.join(log.reasons[:3]) or 'see the warnings above'
    raise DataError(f'{substituted} of {total} {split} samples were unreadable videos replaced by '
                    f'substitutes, more than config.data.max_substituted={self.max_substituted:g} '
                    f'of them; stopping. First: {examples}. Fix config.data.root or the list '
                    'files, or raise --config.data.max_substituted to go on without them.')


def _class_names(cfg: ml_collections.ConfigDict) -> list[str]:
  if cfg.source == 'synthetic':
    return list(synthetic.CLASS_NAMES)
  if cfg.source == 'tfds' and not cfg.labels:
    if cfg.tfds_name:
      return []
    return read_labels(find_dataset_dir(cfg.root) / 'labels.csv')
  if not cfg.labels:
    raise DataError('config.data.labels is empty; set it to the labels CSV (id,name).')
  return read_labels(cfg.labels)


def _make_source(cfg: ml_collections.ConfigDict, split: str, list_or_split: str,
                 num_classes: int):
  if cfg.source == 'filelist':
    return FileListSource(cfg.root, list_or_split, num_classes, cfg.allow_outside_root)
  if cfg.source == 'synthetic':
    return SyntheticSource(split, cfg.synthetic_videos, cfg.synthetic_frames, cfg.synthetic_size,
                           cfg.synthetic_seed)
  if cfg.tfds_name == 'ucf101':
    return Ucf101TfdsSource(cfg.root, list_or_split)
  if cfg.tfds_name:
    raise DataError(f'config.data.tfds_name={cfg.tfds_name!r} is not supported: use "" (a '
                    'dataset prepared by claver_jax.data.prepare) or "ucf101".')
  return PreparedSource(cfg.root, list_or_split)


def _few_shot(cfg: ml_collections.ConfigDict, source, class_names: list[str], write: bool,
              workdir: str | os.PathLike | None) -> SubsetSource:
  """The K-shot subset (cfg.shots per class, cfg.shots_seed) of a train source; logged, and
  written to the workdir when `write`."""
  if cfg.source not in ('filelist', 'synthetic'):
    raise DataError(f'config.data.shots works with source="filelist" or "synthetic", not '
                    f'{cfg.source!r}: make a list file of the split and use the filelist source.')
  where = cfg.train_list if cfg.source == 'filelist' else 'the synthetic train split'
  labels = [source.label(i) for i in range(len(source))]
  subset = SubsetSource(source, few_shot_indices(labels, class_names, cfg.shots,
                                                 cfg.shots_seed, where))
  lines = ''.join(f'{subset.name(i)} {subset.label(i)}\n' for i in range(len(subset)))
  digest = hashlib.sha256(lines.encode('utf-8')).hexdigest()[:12]
  written = ''
  if write and workdir is not None:
    path = fileio.run_path(workdir) / f'train_{cfg.shots}shot_seed{cfg.shots_seed}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, lines)
    written = f'; written to {path}'
  logging.info('Few-shot: %d clips of each of %d classes, %d of the %d clips of %s '
               '(shots_seed=%d, list sha256 %s)%s.', cfg.shots, len(class_names), len(subset),
               len(source), where, cfg.shots_seed, digest, written)
  return subset


def check_flips(flip_prob: float, source, where: str) -> None:
  """A DataError when train clips would be flipped on a source whose classes a flip swaps."""
  if flip_prob > 0 and source.flips_change_labels:
    raise DataError(f'config.data.flip_prob={flip_prob:g} on {where}, whose classes a horizontal '
                    'flip swaps (left and right, clockwise and counterclockwise): a flipped clip '
                    'would keep the wrong label. Set config.data.flip_prob=0.')


def check_readable(source, where: str, root: str, sample: int = SAMPLE_CHECKED) -> None:
  """Opens `sample` videos spread over `source`: a DataError naming the first of them when none
  or most of them cannot be opened, which is a wrong config.data.root far more often than a
  damaged dataset; a warning when some cannot."""
  picked = sorted({int(i) for i in np.linspace(0, len(source) - 1, min(sample, len(source)))})
  failures = []
  for index in picked:
    try:
      with source.open(index):
        pass
    except VideoError as e:
      failures.append(str(e))
  if len(failures) * 2 > len(picked):
    raise DataError(f'{len(failures)} of {len(picked)} videos sampled from {where} cannot be '
                    f'opened under config.data.root={root!r}: {"; ".join(failures[:3])}. Set '
                    'config.data.root to the folder (or tar) the paths of the list are relative '
                    'to.')
  if failures:
    logging.warning('%d of %d videos sampled from %s cannot be opened (%s); unreadable videos are '
                    'replaced by substitutes, up to config.data.max_substituted.', len(failures),
                    len(picked), where, failures[0])


def usable_workers(requested: int) -> int:
  """`requested` grain workers, capped at the CPUs this process may run on (with a warning):
  more decoding processes than CPUs only share them, and starve the process that feeds the
  accelerators."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
  if requested > cpus:
    logging.warning('config.data.num_workers=%d, but this host has %d CPUs for this process: '
                    'using %d workers.', requested, cpus, cpus)
  return min(requested, cpus)


def _read_options(cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
  # grain's defaults (16 threads, 500 elements ahead) would hold 500 batches in memory.
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer)


def _prefetch(ds: grain.IterDataset, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  if cfg.num_workers <= 0:
    return ds
  from absl import flags
  if not flags.FLAGS.is_parsed():   # grain reads its flags in workers; outside absl.app.run.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))


def build_pipelines(cfg: ml_collections.ConfigDict, *, shard_index: int | None = None,
                    shard_count: int | None = None, train_rows: Sequence[int] | None = None,
                    workdir: str | os.PathLike | None = None) -> Pipelines:
  """Builds the train and eval pipelines of `config.data` (see `default_config`).

  Lists and labels are read and checked here, so malformed input fails before training.
  `shard_index` / `shard_count` default to this JAX process and the process count. Shard i reads
  `train_rows` of every global train batch of B x shard_count clips (B = cfg.batch_size rows,
  ascending: `sharding.process_rows`, the rows its devices hold; default [i B, (i + 1) B)) and
  every shard_count-th eval clip from the i-th. With cfg.shots,
  shard 0 writes the K-shot train list into `workdir` when one is given.
  """
  if cfg.source not in SOURCES:
    raise DataError(f'config.data.source={cfg.source!r}; use one of {SOURCES}.')
  if not 0 <= cfg.max_substituted <= 1:
    raise DataError(f'config.data.max_substituted={cfg.max_substituted} is a share: use a value '
                    'in [0, 1].')
  if cfg.num_workers > 0:
    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = usable_workers(cfg.num_workers)
  if shard_index is None or shard_count is None:
    sharding = grain.sharding.ShardByJaxProcess()
    shard_index, shard_count = sharding.shard_index, sharding.shard_count
  class_names = _class_names(cfg)
  train_list = 'train' if cfg.source == 'synthetic' else cfg.train_list
  val_list = 'val' if cfg.source == 'synthetic' else cfg.val_list
  train_source = _make_source(cfg, 'train', train_list, len(class_names)) if train_list else None
  eval_source = _make_source(cfg, 'val', val_list, len(class_names)) if val_list else None
  if not class_names:
    class_names = (train_source or eval_source).class_names
  if cfg.source in ('filelist', 'tfds') and not cfg.tfds_name:
    for source, where in ((train_source, train_list), (eval_source, val_list)):
      if source is not None:
        check_readable(source, where, cfg.root)
  if train_source is not None and cfg.shots:
    train_source = _few_shot(cfg, train_source, class_names, shard_index == 0, workdir)
  loader_args = dict(num_frames=cfg.num_frames, image_size=cfg.image_size, seed=cfg.seed)

  train, train_log = None, SubstitutionLog(
      'train', train_source.name if train_source else str)
  if train_source is not None:
    check_flips(cfg.flip_prob, train_source, f'the {cfg.source} source {train_list!r}')
    loader = SampleLoader(train_source, scales=tuple(cfg.scales),
                          flip_prob=cfg.flip_prob, jitter_prob=cfg.jitter_prob,
                          jitter=tuple(cfg.jitter), grayscale_prob=cfg.grayscale_prob,
                          **loader_args)
    rows = tuple(range(shard_index * cfg.batch_size, (shard_index + 1) * cfg.batch_size)
                 if train_rows is None else train_rows)
    if len(rows) != cfg.batch_size or list(rows) != sorted(set(rows)):
      raise ValueError(f'train_rows must be {cfg.batch_size} ascending rows of a global batch; '
                       f'got {list(rows)[:8]}...')
    order = TrainOrder(len(train_source), cfg.batch_size * shard_count, rows, cfg.seed)
    ds = (grain.MapDataset.source(order)
          .map(loader.train_sample)
          .batch(cfg.batch_size, drop_remainder=True)
          .to_iter_dataset(_read_options(cfg)))
    train = _prefetch(ds, cfg).map(train_log.record)

  evaluation, eval_batches = None, 0
  eval_log = SubstitutionLog('eval', eval_source.name if eval_source else str, keep_index=True)
  if eval_source is not None:
    loader = SampleLoader(eval_source, num_clips=cfg.num_clips, num_crops=cfg.num_crops,
                          eval_resize_ratio=cfg.eval_resize_ratio, **loader_args)
    shard = list(range(len(eval_source)))[shard_index::shard_count]
    per_process = -(-len(eval_source) // shard_count)
    eval_batches = -(-per_process // cfg.eval_batch_size)
    padded = shard + [shard[0] if shard else 0] * (eval_batches * cfg.eval_batch_size - len(shard))
    valid = [True] * len(shard) + [False] * (len(padded) - len(shard))
    ds = (grain.MapDataset.source(list(zip(padded, valid)))
          .map(loader.eval_item)
          .batch(cfg.eval_batch_size)
          .to_iter_dataset(_read_options(cfg)))
    evaluation = _prefetch(ds, cfg).map(eval_log.record)

  return Pipelines(train=train, eval=evaluation, class_names=class_names,
                   num_train=len(train_source) if train_source else 0,
                   num_eval=len(eval_source) if eval_source else 0, eval_batches=eval_batches,
                   train_substitutions=train_log, eval_substitutions=eval_log,
                   eval_name=eval_source.name if eval_source else str,
                   max_substituted=cfg.max_substituted)


def make_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                      ) -> dict[str, jax.Array]:
  """Host batches of all processes -> global jax.Arrays, split over devices along the batch axis.

  `sharding` is e.g. NamedSharding(mesh, PartitionSpec('data')). Each process's host batch holds
  the rows its devices hold, ascending (`sharding.process_rows`; they need not be contiguous):
  jax places them there.
  """
  processes = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v,
                                                    (v.shape[0] * processes, *v.shape[1:]))
          for k, v in batch.items()}
