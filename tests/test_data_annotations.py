"""Annotation converters: Kinetics CSV, UCF-101 and HMDB-51 splits -> list files + labels.csv."""

from __future__ import annotations

import pytest

from claver_jax.data.annotations import hmdb51, kinetics, ucf101
from claver_jax.data.sources import DataError, read_labels, read_list
from conftest import run_cli


def test_kinetics_csv(tmp_path):
  src = tmp_path / 'train.csv'
  src.write_text('label,youtube_id,time_start,time_end,split\n'
                 'air drumming,abc,10,20,train\nabseiling,xyz,0,10,train\n')
  items, names = kinetics(src)
  assert names == ['abseiling', 'air drumming']
  assert items == [('air drumming/abc_000010_000020.mp4', 1),
                   ('abseiling/xyz_000000_000010.mp4', 0)]
  with pytest.raises(DataError, match=r'train.csv:3: class .abseiling. is not in the labels'):
    kinetics(src, ['air drumming'])


def test_ucf101_cli(tmp_path):
  src = tmp_path / 'ucfTrainTestlist'
  src.mkdir()
  (src / 'classInd.txt').write_text('1 ApplyEyeMakeup\n2 Archery\n')
  (src / 'trainlist01.txt').write_text('Archery/v_Archery_g08_c01.avi 2\n'
                                       'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n')
  (src / 'testlist01.txt').write_text('Archery/v_Archery_g01_c01.avi\n')
  splits, names = ucf101(src, 1)
  assert names == ['ApplyEyeMakeup', 'Archery']
  assert splits['test'] == [('Archery/v_Archery_g01_c01.avi', 1)]
  out = tmp_path / 'lists'
  run_cli('claver_jax.data.annotations', '--format=ucf101', f'--src={src}', f'--out={out}')
  assert read_labels(out / 'labels.csv') == names
  assert read_list(out / 'train.txt', 2) == [('Archery/v_Archery_g08_c01.avi', 1),
                                             ('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi', 0)]


def test_hmdb51_splits(tmp_path):
  (tmp_path / 'cartwheel_test_split1.txt').write_text('a.avi 1\nb.avi 2\nc.avi 0\n')
  (tmp_path / 'brush_hair_test_split1.txt').write_text('d.avi 2\n')
  splits, names = hmdb51(tmp_path, 1)
  assert names == ['brush hair', 'cartwheel']
  assert splits == {'train': [('cartwheel/a.avi', 1)],
                    'test': [('brush_hair/d.avi', 0), ('cartwheel/b.avi', 1)]}
  (tmp_path / 'cartwheel_test_split1.txt').write_text('a.avi 7\n')
  with pytest.raises(DataError, match=r'cartwheel_test_split1.txt:1: expected'):
    hmdb51(tmp_path, 1)
