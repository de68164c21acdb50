"""grain pipelines over list files and the synthetic set: batches, bad input, resumable state."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from claver_jax.data import synthetic
from claver_jax.data.pipeline import build_pipelines, default_config
from claver_jax.data.sources import DataError, FileListSource, read_labels, read_list
from conftest import requires_libtpu, run_cli
from helpers import synthetic_dir, with_bad_videos


@pytest.fixture(scope='module')
def motion_dir(tmp_path_factory):
  return synthetic_dir(tmp_path_factory.mktemp('synthetic') / 'set')


def filelist_config(root, **overrides):
  cfg = default_config()
  cfg.update(dict(root=str(root), train_list=str(root / 'train.txt'),
                  val_list=str(root / 'val.txt'), labels=str(root / 'labels.csv'),
                  num_frames=4, image_size=32, batch_size=4, eval_batch_size=3))
  cfg.update(overrides)
  return cfg


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_and_eval_batches_have_the_promised_shapes(motion_dir):
  data = build_pipelines(filelist_config(motion_dir, num_clips=2, num_crops=3))
  assert data.class_names == list(synthetic.CLASS_NAMES)
  assert (data.num_train, data.num_eval) == (20, 4)
  batch = next(iter(data.train))
  assert set(batch) == {'video', 'label', 'substituted'}
  assert batch['video'].shape == (4, 4, 32, 32, 3) and batch['video'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['substituted'].dtype == bool
  assert not batch['substituted'].any()
  passes = [list(data.eval_pass()) for _ in range(2)]
  assert_batches_equal(*passes)                            # Eval is deterministic.
  batches = passes[0]
  assert len(batches) == data.eval_batches == 2
  assert batches[0]['video'].shape == (3, 6, 4, 32, 32, 3)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.tolist() == [True] * 4 + [False] * 2        # Every val clip exactly once.
  labels = np.concatenate([b['label'] for b in batches])[valid]
  expected = [int(line.split()[-1]) for line in (motion_dir / 'val.txt').read_text().splitlines()]
  assert labels.tolist() == expected


def test_processes_split_the_data_without_overlap(motion_dir):
  cfg = filelist_config(motion_dir, eval_batch_size=1)
  shards = [build_pipelines(cfg, shard_index=i, shard_count=3) for i in range(3)]
  assert len({d.eval_batches for d in shards}) == 1        # Same batch count everywhere.
  labels = sorted(int(b['label'][0]) for d in shards for b in d.eval_pass() if b['valid'][0])
  expected = sorted(int(line.split()[-1])
                    for line in (motion_dir / 'val.txt').read_text().splitlines())
  assert labels == expected


def test_global_batches_do_not_depend_on_the_process_count(motion_dir):
  """1 process reading batches of 6 and 2 or 3 processes reading their rows of them give the
  same clips, augmented alike, over epoch ends (20 clips); the iterator states agree, and a
  state saved by 2 processes resumes the stream in 1."""
  one = iter(build_pipelines(filelist_config(motion_dir, batch_size=6)).train)
  expected = take(one, 5)
  for count in (2, 3):
    shards = [iter(build_pipelines(filelist_config(motion_dir, batch_size=6 // count),
                                   shard_index=i, shard_count=count).train)
              for i in range(count)]
    parts = [take(shard, 4) for shard in shards]
    joined = [{k: np.concatenate([p[n][k] for p in parts]) for k in expected[n]}
              for n in range(4)]
    assert_batches_equal(joined, expected[:4])
    states = [shard.get_state() for shard in shards]
    assert all(state == states[0] for state in states)
  resumed = iter(build_pipelines(filelist_config(motion_dir, batch_size=6)).train)
  resumed.set_state(states[0])
  assert_batches_equal([next(resumed)], expected[4:])


def test_iterator_state_resumes_the_same_batches(motion_dir):
  data = build_pipelines(filelist_config(motion_dir, batch_size=3))
  iterator = iter(data.train)
  take(iterator, 7)                                         # Past the first epoch (20 // 3 = 6).
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = iter(build_pipelines(filelist_config(motion_dir, batch_size=3)).train)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_each_epoch_is_a_new_shuffle_of_every_clip(motion_dir):
  batches = take(iter(build_pipelines(filelist_config(motion_dir, batch_size=5)).train), 8)
  labels = np.concatenate([b['label'] for b in batches])
  listed = sorted(int(line.split()[-1]) for line in
                  (motion_dir / 'train.txt').read_text().splitlines())
  assert sorted(labels[:20].tolist()) == sorted(labels[20:40].tolist()) == listed
  assert labels[:20].tolist() != labels[20:40].tolist()


@pytest.mark.slow
def test_workers_give_the_same_batches_and_state(motion_dir):
  expected = take(iter(build_pipelines(filelist_config(motion_dir)).train), 4)
  cfg = filelist_config(motion_dir, num_workers=2)
  workers = iter(build_pipelines(cfg).train)
  try:
    assert_batches_equal(take(workers, 2), expected[:2])
    state = workers.get_state()
  finally:
    workers.close()
  resumed = iter(build_pipelines(cfg).train)
  try:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), expected[2:])
  finally:
    resumed.close()


def test_bad_videos_are_substituted_counted_and_logged_once_with_their_reason(motion_dir,
                                                                              tmp_path, caplog):
  bad = with_bad_videos(motion_dir, tmp_path / 'bad')
  data = build_pipelines(filelist_config(bad, batch_size=5, val_list=str(bad / 'train.txt'),
                                         eval_batch_size=5, max_substituted=1.0))
  with caplog.at_level(logging.WARNING):
    batches = take(iter(data.train), 8)                     # Two epochs of 20 clips.
    eval_batches = list(data.eval_pass())
  substituted = np.concatenate([b['substituted'] for b in batches])
  assert substituted.sum() == 4
  assert all(b['video'].shape == (5, 4, 32, 32, 3) for b in batches)
  assert all('reason' not in b and 'index' not in b for b in batches)
  # Eval batches keep their list positions (the score dump names videos by them).
  assert all('reason' not in b and b['index'].dtype == np.int32 for b in eval_batches)
  assert np.concatenate([b['substituted'] for b in eval_batches]).sum() == 2
  bad_rows = [b['video'][b['substituted']] for b in eval_batches]
  assert all((v == 0).all() for v in bad_rows)              # Eval substitutes are black.
  assert data.metrics() == {'data/train_substituted': 4, 'data/eval_substituted': 2}
  corrupt, missing = (line.split()[0] for line in (bad / 'train.txt').read_text().splitlines()[:2])
  assert sorted(data.train_substitutions.paths) == sorted([corrupt, missing])
  logged = sorted(r.getMessage().split(': ', 1)[1] for r in caplog.records
                  if r.getMessage().startswith('Unreadable train video'))
  assert len(logged) == 2                                   # Once each, though read twice.
  assert logged[0].startswith(f'{bad / corrupt}: ') and 'not a readable video' in logged[0]
  assert logged[1] == f'{bad / missing}: no such file'


def test_a_wrong_root_stops_at_start_naming_the_paths_tried(motion_dir, tmp_path, caplog):
  """The root one level too high: every path is missing. A root that loses a few videos only
  warns; a run then stops once more than data.max_substituted of its samples were substitutes."""
  with pytest.raises(DataError) as error:
    wrong_root = filelist_config(motion_dir)
    wrong_root.root = str(motion_dir.parent)
    build_pipelines(wrong_root)
  message = str(error.value)
  assert '\n' not in message
  first = (motion_dir / 'train.txt').read_text().split()[0]
  assert message.startswith(f'16 of 16 videos sampled from {motion_dir / "train.txt"} cannot be '
                            f"opened under config.data.root='{motion_dir.parent}': "
                            f'{motion_dir.parent / first}: no such file;')
  bad = with_bad_videos(motion_dir, tmp_path / 'bad')
  with caplog.at_level(logging.WARNING):
    data = build_pipelines(filelist_config(bad, val_list=''))
  assert 'of 16 videos sampled from' in caplog.text
  data.check_substituted('train', 9, 10)                    # Too few to judge yet.
  data.check_substituted('train', 10, 200)                  # 5%: the default share.
  data.check_substituted('eval', 1, 20)
  for split, count, total in (('train', 11, 200), ('eval', 2, 20)):
    with pytest.raises(DataError, match=rf'^{count} of {total} {split} samples were unreadable '
                       r'videos replaced by substitutes, more than config.data.max_substituted'
                       r'=0.05 of them; stopping'):
      data.check_substituted(split, count, total)


def test_worker_count_is_capped_at_the_cpus(caplog):
  import os
  from claver_jax.data.pipeline import usable_workers
  cpus = len(os.sched_getaffinity(0))
  with caplog.at_level(logging.WARNING):
    assert usable_workers(cpus) == cpus and not caplog.records
    assert usable_workers(cpus + 14) == cpus
  assert f'config.data.num_workers={cpus + 14}, but this host has {cpus} CPUs' in caplog.text


def test_synthetic_source_matches_the_written_files(motion_dir):
  cfg = filelist_config(motion_dir, source='synthetic', synthetic_videos=24,
                        synthetic_frames=8, synthetic_size=32, num_clips=1, num_crops=1,
                        flip_prob=0.0)
  data = build_pipelines(cfg)
  assert data.class_names == list(synthetic.CLASS_NAMES) and data.num_eval == 4
  in_memory = np.concatenate([b['video'] for b in data.eval_pass()])[:4]
  from_files = np.concatenate([b['video'] for b in build_pipelines(
      filelist_config(motion_dir, flip_prob=0.0)).eval_pass()])[:4]
  assert in_memory.shape == from_files.shape == (4, 1, 4, 32, 32, 3)
  assert np.abs(in_memory.astype(int) - from_files).mean() < 6   # H.264 at crf 18.


def test_flips_are_refused_on_a_source_whose_classes_they_swap(motion_dir):
  """The synthetic source declares that a horizontal flip swaps its classes: flip_prob > 0 on it,
  or on its K-shot subset, is a one-line DataError. The default stays 0.5 (real videos) and the
  demo sets 0, with no class names compared."""
  from helpers import load_config
  assert default_config().flip_prob == 0.5
  for arg in (None, 'motion_prompts'):
    assert load_config('demo', arg).data.flip_prob == 0
  cfg = filelist_config(motion_dir, source='synthetic', synthetic_videos=24, synthetic_frames=8,
                        synthetic_size=32)
  for shots in (0, 1):
    cfg.shots = shots
    with pytest.raises(DataError) as error:
      build_pipelines(cfg)
    assert str(error.value) == (
        "config.data.flip_prob=0.5 on the synthetic source 'train', whose classes a horizontal "
        'flip swaps (left and right, clockwise and counterclockwise): a flipped clip would keep '
        'the wrong label. Set config.data.flip_prob=0.')
  cfg.flip_prob = 0.0
  assert build_pipelines(cfg).num_train == 12


def test_synthetic_source_renders_each_clip_once_when_it_fits(monkeypatch):
  from claver_jax.data.sources import SyntheticSource
  made = []
  real = synthetic.make_clip
  monkeypatch.setattr(synthetic, 'make_clip', lambda i, **kw: made.append(i) or real(i, **kw))
  cached = SyntheticSource('train', 10, num_frames=4, size=16)
  first = cached.open(3).frames(range(4))
  again = cached.open(3).frames(range(4))
  assert made == [cached.indices[3]] and np.array_equal(first, again)
  np.testing.assert_array_equal(first, real(cached.indices[3], num_frames=4, size=16)[0])
  uncached = SyntheticSource('train', 10, num_frames=4, size=16, cache_bytes=0)
  uncached.open(3), uncached.open(3)
  assert made == [cached.indices[3]] * 3


@pytest.mark.parametrize('text,message', [
    ('videos/a.mp4 0\nvideos/b.mp4\n', r'train.txt:2: expected "relative/path.mp4 LABEL_ID"'),
    ('videos/a.mp4 0\n\nvideos/b.mp4 x\n', r'train.txt:3: expected'),
    ('videos/a.mp4 12\n', r'train.txt:1: label 12 is not in the labels CSV'),
])
def test_malformed_lists_give_line_numbered_errors(motion_dir, tmp_path, text, message):
  (tmp_path / 'train.txt').write_text(text)
  with pytest.raises(DataError, match=message):
    build_pipelines(filelist_config(motion_dir, train_list=str(tmp_path / 'train.txt')))


@pytest.mark.parametrize('text,message', [
    ('id,name\n0,a\n2,b\n', r'labels.csv:3: id 2: ids must be 0..1 without gaps; missing \[1\]'),
    ('id,name\n0,a\n0,b\n', r"labels.csv:3: id 0 appears twice \('a' on line 2, 'b' here\)"),
    ('0,a\nb\n', r'labels.csv:2: expected "id,name"'),
    ('ID, Name\n0,a\n1,a\n', r"labels.csv:3: the class name 'a' appears twice \(also on line 2\)"),
    ('run\njump\n\nrun\n', r"labels.csv:4: the class name 'run' appears twice"),
    ('0,a\n-1,b\n', r'labels.csv:2: id -1 is negative'),
    ('\n\n', r'has no classes'),
])
def test_malformed_labels_give_clear_errors(tmp_path, text, message):
  (tmp_path / 'labels.csv').write_text(text)
  with pytest.raises(DataError, match=message):
    read_labels(tmp_path / 'labels.csv')


@pytest.mark.parametrize('text,names', [
    ('id,name\n1,b c\n0,"a, with comma"\n', ['a, with comma', 'b c']),     # ids, not line order
    ('ID,Name\n0,a\n\n1,b\n', ['a', 'b']),                                 # any header case
    ('\ufeff0,a\n1,b\n', ['a', 'b']),                                       # BOM, no header
    ('moving left\n  moving right \n', ['moving left', 'moving right']),     # one name a line
])
def test_labels_files(tmp_path, text, names):
  (tmp_path / 'labels.csv').write_text(text, encoding='utf-8')
  assert read_labels(tmp_path / 'labels.csv') == names


def test_truncated_and_corrupt_mp4s_are_named_as_such(motion_dir, tmp_path):
  from claver_jax.data.video import VideoError, open_video
  path = motion_dir / read_list(motion_dir / 'train.txt')[0][0]
  data = path.read_bytes()
  moov = data.index(b'moov') - 4        # The index sits after the frames (no faststart).
  cases = {'half': (data[:len(data) // 2], "truncated: the file has"),
           'in the index': (data[:moov + 40], "its 'moov' box runs from byte"),
           'no index': (data[:moov], "corrupt or truncated: it has no 'moov' box"),
           'empty': (b'', 'empty: the file has 0 bytes')}
  for name, (content, message) in cases.items():
    broken = tmp_path / f'{name}.mp4'
    broken.write_bytes(content)
    with pytest.raises(VideoError, match=message):
      open_video(broken)
  # The cut that PyAV opens as "no video stream" is still reported as truncated.
  for cut in range(moov + 8, len(data), 3):
    (tmp_path / 'cut.mp4').write_bytes(data[:cut])
    try:
      open_video(tmp_path / 'cut.mp4').close()
    except VideoError as e:
      assert 'truncated' in str(e), str(e)


def test_the_pipeline_closes_every_container_it_opens(motion_dir, tmp_path, monkeypatch):
  """Closed by `with` blocks when each clip is read, not left to the garbage collector."""
  import gc
  from claver_jax.data import video
  opened, closed = [], []
  real_init, real_close = video.PyAVVideo.__init__, video.PyAVVideo.close
  monkeypatch.setattr(video.PyAVVideo, '__init__',     # Counted once opened.
                      lambda self, *a, **kw: (real_init(self, *a, **kw), opened.append(id(self)))[0])
  monkeypatch.setattr(video.PyAVVideo, 'close',
                      lambda self: (closed.append(id(self)), real_close(self))[1])
  from claver_jax.data.pipeline import SampleLoader
  from claver_jax.data.sources import FileListSource
  bad = with_bad_videos(motion_dir, tmp_path / 'bad')          # train.txt line 1 is corrupt
  source = FileListSource(bad, bad / 'train.txt', synthetic.NUM_CLASSES)
  loader = SampleLoader(source, num_frames=4, image_size=32)
  gc.disable()
  try:
    samples = [loader.train_sample((0, i)) for i in range(4)]
    views = [loader.eval_item((i, True)) for i in range(4)]
    assert samples[0]['substituted'] and not views[2]['substituted']
    assert len(opened) == 6 and sorted(closed) == sorted(opened)   # 4 train + 2 readable eval
  finally:
    gc.enable()


def test_single_view_is_the_centre_crop_of_a_short_side_of_256_over_224(tmp_path):
  """The official 1-crop test geometry, in evaluation and in predict: 64x48 gray ramps at S = 16
  are resized to 24x18 (short side int(256/224 16) = 18), then the centre 16x16 is taken. The
  old geometry (short side 16, then the centre crop) starts ~17 levels lower on each ramp."""
  from claver_jax.data.pipeline import SampleLoader
  from claver_jax.data.video import open_video
  from claver_jax.predict import load_clip_frames
  height, width, size = 48, 64, 16
  ramps = {'x': np.broadcast_to(4 * np.arange(width), (height, width)),        # along the long side
           'y': np.broadcast_to(5 * np.arange(height)[:, None], (height, width))}

  def expected(axis: str, short_side: int) -> np.ndarray:
    """The ramp's values along the crop's middle line: pixel centres mapped back to the frame."""
    scale = short_side / height
    resized = round(width * scale) if axis == 'x' else short_side
    start = (resized - size) // 2
    source = (start + np.arange(size) + 0.5) / scale - 0.5
    return (4 if axis == 'x' else 5) * source

  class Files:                              # A source over the two mp4s.
    def __init__(self, paths):
      self.paths = paths
    def __len__(self):
      return len(self.paths)
    def label(self, index):
      return 0
    def open(self, index):
      return open_video(self.paths[index])

  paths = []
  for axis, ramp in ramps.items():
    paths.append(tmp_path / f'{axis}.mp4')
    synthetic.write_mp4(paths[-1], np.repeat(np.asarray(ramp, np.uint8)[None, :, :, None], 3, -1)
                        .repeat(4, axis=0))
  loader = SampleLoader(Files(paths), num_frames=2, image_size=size)
  whole = SampleLoader(Files(paths), num_frames=2, image_size=size, eval_resize_ratio=1.0)
  for index, (axis, path) in enumerate(zip(ramps, paths)):
    for clip in (loader.eval_views(index)[0], load_clip_frames(path, 2, size)):
      assert clip.shape == (2, size, size, 3)
      line = clip[0, size // 2, :, 1] if axis == 'x' else clip[0, :, size // 2, 1]
      np.testing.assert_allclose(line, expected(axis, 18), atol=6)
      assert abs(float(line[0]) - expected(axis, size)[0]) > 10     # not the old geometry
    # data.eval_resize_ratio=1.0 (the demo: trained on whole frames): the short side S.
    for clip in (whole.eval_views(index)[0], load_clip_frames(path, 2, size, 1.0)):
      line = clip[0, size // 2, :, 1] if axis == 'x' else clip[0, :, size // 2, 1]
      np.testing.assert_allclose(line, expected(axis, size), atol=6)


def test_list_paths_may_contain_spaces(tmp_path):
  (tmp_path / 'list.txt').write_text('air drumming/x y.mp4 3\n')
  assert read_list(tmp_path / 'list.txt') == [('air drumming/x y.mp4', 3)]


def test_a_byte_order_mark_is_not_part_of_the_first_path(motion_dir, tmp_path):
  """Editors on Windows save lists with a UTF-8 BOM; read as part of the first path, that clip
  would be a silent substitution every epoch."""
  text = (motion_dir / 'train.txt').read_text()
  (tmp_path / 'train.txt').write_text('\ufeff' + text, encoding='utf-8')
  assert read_list(tmp_path / 'train.txt') == read_list(motion_dir / 'train.txt')
  data = build_pipelines(filelist_config(motion_dir, train_list=str(tmp_path / 'train.txt'),
                                         val_list=''))
  next(iter(data.train))
  assert FileListSource(motion_dir, tmp_path / 'train.txt').open(0).num_frames > 0


def test_list_paths_stay_inside_the_data_root(motion_dir, tmp_path):
  import shutil
  first = read_list(motion_dir / 'train.txt')[0][0]
  root = tmp_path / 'root'
  (root / 'sub').mkdir(parents=True)
  shutil.copy(motion_dir / first, tmp_path / 'outside.mp4')
  shutil.copy(motion_dir / first, root / 'inside.mp4')
  for path in (str(tmp_path / 'outside.mp4'), '../outside.mp4', 'sub/../../outside.mp4'):
    (tmp_path / 'list.txt').write_text(f'inside.mp4 0\n{path} 1\n')
    with pytest.raises(DataError, match=f"list.txt:2: '{path}' is not a path inside the data "
                                        'root .*config.data.allow_outside_root=True'):
      FileListSource(root, tmp_path / 'list.txt')
    assert FileListSource(root, tmp_path / 'list.txt', allow_outside_root=True).open(1)
  (tmp_path / 'list.txt').write_text('sub/../inside.mp4 0\n')       # '..' that stays inside
  assert FileListSource(root, tmp_path / 'list.txt').open(0)
  (tmp_path / 'list.txt').write_text('../outside.mp4 0\n')
  labels = str(motion_dir / 'labels.csv')
  with pytest.raises(DataError, match='allow_outside_root'):
    build_pipelines(filelist_config(root, train_list=str(tmp_path / 'list.txt'), val_list='',
                                    labels=labels))
  data = build_pipelines(filelist_config(root, train_list=str(tmp_path / 'list.txt'),
                                         val_list='', labels=labels, allow_outside_root=True))
  assert not next(iter(data.train))['substituted'].any()


def test_ucf101_through_tfds_asks_for_tensorflow(motion_dir):
  pytest.importorskip('tensorflow_datasets')
  try:
    import tensorflow  # noqa: F401
    pytest.skip('TensorFlow is installed; this test checks the error without it.')
  except ImportError:
    pass
  cfg = filelist_config(motion_dir, source='tfds', tfds_name='ucf101', labels='',
                        train_list='train', val_list='')
  with pytest.raises(DataError, match='pip install tensorflow'):
    build_pipelines(cfg)


def test_synthetic_cli_writes_a_readable_set(tmp_path):
  out = tmp_path / 'cli'
  run_cli('claver_jax.data.synthetic', f'--out={out}', '--num_videos=13', '--num_frames=6',
          '--size=32', '--width=48')
  assert read_labels(out / 'labels.csv') == list(synthetic.CLASS_NAMES)
  items = read_list(out / 'train.txt') + read_list(out / 'val.txt')
  assert len(items) == 13 and {label for _, label in items} == set(range(12))
  from claver_jax.data.video import open_video
  with open_video(out / items[0][0]) as video:
    assert video.num_frames == 6 and video.frames([0]).shape == (1, 32, 48, 3)
  proc = run_cli('claver_jax.data.synthetic', f'--out={out}', '--num_videos=1', check=False)
  assert proc.returncode != 0 and 'already exists' in proc.stderr


def test_reverse_twins_are_time_reversed_draws_of_one_family():
  for index in range(12):
    clip, label = synthetic.make_clip(index, seed=3, num_frames=6, size=32)
    assert label == index % 12 and clip.shape == (6, 32, 32, 3)
    forward = synthetic.render_forward(label // 2, np.random.default_rng((3, index)), 6, 32, 32)
    np.testing.assert_array_equal(clip, forward[::-1] if label % 2 else forward)
    np.testing.assert_array_equal(clip, synthetic.make_clip(index, seed=3, num_frames=6,
                                                            size=32)[0])
  a, b = synthetic.make_clip(0, seed=0)[0], synthetic.make_clip(12, seed=0)[0]
  assert not np.array_equal(a, b)                          # Different draws per index.


def test_make_global_batch_shards_the_batch_axis():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from claver_jax.data.pipeline import make_global_batch
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  batch = {'video': np.ones((2, 3, 4, 4, 3), np.uint8), 'label': np.array([1, 2], np.int32)}
  out = make_global_batch(batch, NamedSharding(mesh, PartitionSpec('data')))
  assert out['video'].shape == (2 * jax.process_count(), 3, 4, 4, 3)
  np.testing.assert_array_equal(out['label'], [1, 2])


@requires_libtpu
@pytest.mark.parametrize('topology', ['v4:2x2x4', 'v5e:4x4', 'v5e:8x8', 'v6e:4x4'])
def test_each_host_of_a_tpu_slice_reads_the_rows_its_chips_hold(topology):
  """On libtpu's own slice descriptions the mesh interleaves the hosts' rows of a batch; each
  host's share of the one global train order, put at its rows, is the global batch."""
  import ml_collections
  from claver_jax import sharding, topologies
  from claver_jax.data.pipeline import TrainOrder
  devices = topologies.tpu_devices(topology)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=devices)
  hosts = sorted({d.process_index for d in devices})
  global_batch, clips, seed = 2 * len(devices), 100, 3
  rows = {host: sharding.process_rows(mesh, global_batch, host) for host in hosts}
  assert sorted(r for host in hosts for r in rows[host]) == list(range(global_batch))
  contiguous = lambda r: list(r) == list(range(r[0], r[0] + len(r)))
  if topology != 'v5e:2x4':
    assert not all(contiguous(rows[host]) for host in hosts)    # interleaved: the point
  for host in hosts:                  # a host's devices hold exactly these rows
    held = {row for device, index in sharding.batch_sharding(mesh).devices_indices_map(
        (global_batch,)).items() if device.process_index == host
        for row in range(global_batch)[index[0]]}
    assert held == set(rows[host])
  one = TrainOrder(clips, global_batch, tuple(range(global_batch)), seed)
  parts = {host: TrainOrder(clips, global_batch, rows[host], seed) for host in hosts}
  per_host = global_batch // len(hosts)
  for batch in range(3):               # past an epoch end (100 clips, batches of 32 or 128)
    assembled = [None] * global_batch
    for host in hosts:
      for i, row in enumerate(rows[host]):
        assembled[row] = parts[host][batch * per_host + i]
    assert assembled == [one[batch * global_batch + r] for r in range(global_batch)]
