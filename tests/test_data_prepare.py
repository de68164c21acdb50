"""Prepared datasets: list -> per-frame array_record records -> tfds.data_source -> grain
batches; the content-keyed cache, decoding limits, and a pool that reports a dead worker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from claver_jax.data import prepare as prepare_module
from claver_jax.data.pipeline import build_pipelines, default_config
from claver_jax.data.sources import PREPARED_VERSION, PreparedSource
from claver_jax.data.video import DecodeLimits, VideoError, open_video, stream_frames
from conftest import run_cli
import helpers
from helpers import black_video, synthetic_dir, with_bad_videos

pytest.importorskip('PIL', reason='Pillow encodes the JPEG frames of prepared datasets')


@pytest.fixture(scope='module')
def bad_set(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepare')
  return with_bad_videos(synthetic_dir(root / 'set', num_videos=14), root / 'bad')


def assert_records_match_their_videos(source: PreparedSource, root, list_lines: list[str]):
  """Every video of `source` has its list line's label and its own file's frames."""
  for i in range(len(source)):
    assert f'{source.name(i)} {source.label(i)}' in list_lines
    with open_video(root / source.name(i)) as video:
      assert source.num_frames(i) == video.num_frames == 8
      original = video.frames([2, 5], short_side=24)
    decoded = source.open(i).frames([2, 5])
    assert decoded.shape == original.shape == (2, 24, 24, 3)
    assert np.abs(decoded.astype(int) - original).mean() < 4      # JPEG at quality 95.


def test_cli_round_trip_through_data_source_and_grain(bad_set, tmp_path):
  out = tmp_path / 'prepared'
  run_cli('claver_jax.data.prepare', f'--list={bad_set / "train.txt"}',
          f'--list={bad_set / "val.txt"}', f'--root={bad_set}',
          f'--labels={bad_set / "labels.csv"}', f'--out={out}', '--short_side=24',
          '--quality=95', '--num_workers=0')
  assert len((out / 'skipped.txt').read_text().splitlines()) == 2   # Corrupt + missing.
  assert not out.with_name('prepared.cache').exists()
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['format'] == PREPARED_VERSION and manifest['short_side'] == 24
  source = PreparedSource(out, 'train')
  train_lines = (bad_set / 'train.txt').read_text().splitlines()
  assert len(source) == len(train_lines) - 2
  assert_records_match_their_videos(source, bad_set, train_lines)
  cfg = default_config()
  cfg.update(dict(source='tfds', root=str(out), train_list='train', val_list='val',
                  num_frames=4, image_size=16, batch_size=4, eval_batch_size=4))
  data = build_pipelines(cfg)
  assert data.class_names[0] == 'moving left' and data.num_eval == 2
  batch = next(iter(data.train))
  assert batch['video'].shape == (4, 4, 16, 16, 3) and not batch['substituted'].any()
  eval_batches = list(data.eval_pass())
  assert eval_batches[0]['video'].shape == (4, 1, 4, 16, 16, 3)
  assert eval_batches[0]['valid'].tolist() == [True, True, False, False]


def test_a_clip_reads_only_the_records_of_its_frames(bad_set, tmp_path):
  out = prepare_module.prepare([bad_set / 'val.txt'], bad_set, bad_set / 'labels.csv',
                               tmp_path / 'prepared', short_side=24, progress=False)
  source = PreparedSource(out, 'val')
  video = source.open(1)
  read = []
  records = video._records
  getitems = records.__getitems__
  records.__getitems__ = lambda keys: read.extend(keys) or getitems(keys)
  frames = video.frames([6, 1, 6, 3])
  assert frames.shape[0] == 4 and (frames[0] == frames[2]).all()
  assert sorted(read) == [int(source._first[1]) + i for i in (1, 3, 6)]   # Nothing else.
  with pytest.raises(ValueError, match='prepared in format 1.0.0'):
    info = json.loads((out / 'dataset_info.json').read_text())
    (out / 'dataset_info.json').write_text(json.dumps({**info, 'version': '1.0.0'}))
    PreparedSource(out, 'val')


def test_interrupted_prepare_then_a_reordered_list_keeps_every_label(bad_set, tmp_path,
                                                                      monkeypatch, capsys):
  """Issue 24.3: the cache is keyed by each video's file and the settings, not its list line."""
  out = tmp_path / 'prepared'
  encode, calls = prepare_module._cache_one, []

  def interrupted(job):
    if len(calls) == 3:
      raise KeyboardInterrupt
    calls.append(job.name)
    return encode(job)

  monkeypatch.setattr(prepare_module, '_cache_one', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare_module.prepare([bad_set / 'train.txt'], bad_set, bad_set / 'labels.csv', out,
                           short_side=24, quality=95, progress=False)
  cache = out.with_name('prepared.cache')
  assert not out.exists() and len([*cache.glob('*.npz'), *cache.glob('*.skip')]) == 3
  reordered = tmp_path / 'lists' / 'train.txt'
  reordered.parent.mkdir()
  lines = (bad_set / 'train.txt').read_text().splitlines()
  reordered.write_text('\n'.join(lines[::-1]) + '\n')
  monkeypatch.setattr(prepare_module, '_cache_one', encode)
  prepare_module.prepare([reordered], bad_set, bad_set / 'labels.csv', out, short_side=24,
                         quality=95, progress=False)
  assert 'Resuming: 3 of 12 videos are already encoded' in capsys.readouterr().err
  source = PreparedSource(out, 'train')
  assert [source.name(i) for i in range(len(source))] == [
      line.rsplit(' ', 1)[0] for line in lines[::-1][:-2]]        # List order; 2 unreadable.
  assert_records_match_their_videos(source, bad_set, lines)
  with pytest.raises(FileExistsError, match='already exists'):
    prepare_module.prepare([reordered], bad_set, bad_set / 'labels.csv', out, progress=False)


def test_video_bombs_stop_at_the_limits_naming_the_file(tmp_path):
  """Issue 24.8: frames, frames x pixels and seconds are capped per video, streamed frame by
  frame; the skipped file and the limit are named."""
  many = black_video(tmp_path / 'many.mp4', 400, 16, 16)
  large = black_video(tmp_path / 'large.mp4', 12, 720, 1280)
  with pytest.raises(VideoError, match=r'many\.mp4: more than 100 frames'):
    list(stream_frames(many, limits=DecodeLimits(max_frames=100)))
  with pytest.raises(VideoError, match=r'large\.mp4: more than 9216000 pixels'):
    list(stream_frames(large, limits=DecodeLimits(max_pixels=10 * 720 * 1280)))
  with pytest.raises(VideoError, match=r'many\.mp4: decoding took more than 1e-09 s'):
    list(stream_frames(many, limits=DecodeLimits(max_seconds=1e-9)))
  with pytest.raises(VideoError, match=r'many\.mp4: more than 100 frames'):
    open_video(many, limits=DecodeLimits(max_frames=100))      # The training reader too.
  frames = stream_frames(large, short_side=36)                  # One frame at a time, resized.
  assert next(frames).shape == (36, 64, 3)
  frames.close()
  (tmp_path / 'list.txt').write_text('many.mp4 0\nlarge.mp4 1\n')
  (tmp_path / 'labels.csv').write_text('id,name\n0,a\n1,b\n')
  out = prepare_module.prepare([tmp_path / 'list.txt'], tmp_path, tmp_path / 'labels.csv',
                               tmp_path / 'out', short_side=16, progress=False,
                               limits=DecodeLimits(max_frames=100))
  assert 'many.mp4: more than 100 frames' in (out / 'skipped.txt').read_text()
  source = PreparedSource(out, 'list')
  assert len(source) == 1 and source.name(0) == 'large.mp4' and source.num_frames(0) == 12


def test_every_decoding_error_is_a_video_error(tmp_path, monkeypatch):
  """PyAV's BlockingIOError (what it raised under a memory limit) escaped the handler."""
  import av
  video = black_video(tmp_path / 'v.mp4', 4, 16, 16)
  real_open = av.open

  class Failing:
    def __init__(self, container):
      self._container = container
      self.streams = container.streams

    def decode(self, *args):
      raise BlockingIOError(11, 'Resource temporarily unavailable')

    def close(self):
      self._container.close()

  monkeypatch.setattr(av, 'open', lambda *a, **k: Failing(real_open(*a, **k)))
  with pytest.raises(VideoError, match=r'v\.mp4: cannot decode frame 0 \(BlockingIOError'):
    list(stream_frames(video))


def test_a_dead_worker_is_reported_and_its_video_skipped(bad_set, tmp_path, monkeypatch):
  results = dict(prepare_module.run_jobs(helpers.square_or_die, [1, 2, 3, 4], 2))
  assert isinstance(results.pop(2), prepare_module.WorkerDied)
  assert results == {0: 1, 1: 4, 3: 16}
  lines = (bad_set / 'val.txt').read_text().splitlines()
  (tmp_path / 'die.mp4').write_bytes((bad_set / lines[0].rsplit(' ', 1)[0]).read_bytes())
  (tmp_path / 'videos').symlink_to(bad_set / 'videos')
  (tmp_path / 'val.txt').write_text('\n'.join(lines + ['die.mp4 3']) + '\n')
  monkeypatch.setattr(prepare_module, '_cache_one', helpers.cache_one_or_die)
  out = prepare_module.prepare([tmp_path / 'val.txt'], tmp_path, bad_set / 'labels.csv',
                               tmp_path / 'out', short_side=24, num_workers=2, progress=False)
  assert 'die.mp4: the worker process died' in (out / 'skipped.txt').read_text()
  assert len(PreparedSource(out, 'val')) == len(lines)
