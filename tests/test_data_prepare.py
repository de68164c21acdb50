"""Prepared datasets: list -> tfds array_record builder -> tfds.data_source -> grain batches."""

from __future__ import annotations

import numpy as np
import pytest

from claver_jax.data import prepare as prepare_module
from claver_jax.data.pipeline import build_pipelines, default_config
from claver_jax.data.sources import PreparedSource
from claver_jax.data.video import open_video
from conftest import run_cli
from data_helpers import synthetic_dir, with_bad_videos

pytest.importorskip('PIL', reason='Pillow encodes the JPEG frames of prepared datasets')


@pytest.fixture(scope='module')
def bad_set(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepare')
  return with_bad_videos(synthetic_dir(root / 'set', num_videos=14), root / 'bad')


def test_cli_round_trip_through_data_source_and_grain(bad_set, tmp_path):
  out = tmp_path / 'prepared'
  run_cli('claver_jax.data.prepare', f'--list={bad_set / "train.txt"}',
          f'--list={bad_set / "val.txt"}', f'--root={bad_set}',
          f'--labels={bad_set / "labels.csv"}', f'--out={out}', '--short_side=24',
          '--quality=95', '--num_workers=0')
  assert len((out / 'skipped.txt').read_text().splitlines()) == 2   # Corrupt + missing.
  assert not out.with_name('prepared.cache').exists()
  source = PreparedSource(out, 'train')
  train_lines = (bad_set / 'train.txt').read_text().splitlines()
  assert len(source) == len(train_lines) - 2
  for i in range(len(source)):
    record = source._record(i)
    assert f'{record["video_id"].decode()} {record["label"]}' in train_lines
    with open_video(bad_set / record['video_id'].decode()) as video:
      assert record['num_frames'] == video.num_frames == 8
      original = video.frames([2, 5], short_side=24)
    decoded = source.open(i).frames([2, 5])
    assert decoded.shape == original.shape == (2, 24, 24, 3)
    assert np.abs(decoded.astype(int) - original).mean() < 4      # JPEG at quality 95.
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


def test_interrupted_prepare_resumes_from_its_cache(bad_set, tmp_path, monkeypatch, capsys):
  out = tmp_path / 'prepared'
  encode, calls = prepare_module._cache_one, []

  def interrupted(job):
    if len(calls) == 3:
      raise KeyboardInterrupt
    calls.append(job[1])
    return encode(job)

  monkeypatch.setattr(prepare_module, '_cache_one', interrupted)
  lists = [bad_set / 'train.txt']
  with pytest.raises(KeyboardInterrupt):
    prepare_module.prepare(lists, bad_set, bad_set / 'labels.csv', out, progress=False)
  assert not out.exists() and len(list(out.with_name('prepared.cache').glob('train/*'))) == 3
  calls.clear()
  monkeypatch.setattr(prepare_module, '_cache_one', encode)
  prepare_module.prepare(lists, bad_set, bad_set / 'labels.csv', out, progress=False)
  assert 'Resuming: 3 of 12 videos are already encoded' in capsys.readouterr().err
  assert len(PreparedSource(out, 'train')) == 12 - 2
  with pytest.raises(FileExistsError, match='already exists'):
    prepare_module.prepare(lists, bad_set, bad_set / 'labels.csv', out, progress=False)
