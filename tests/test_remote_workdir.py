"""gs:// run paths against a Cloud Storage server on 127.0.0.1 (tests/fake_gcs.py): the clients a
real run uses (gcsfs through etils.epath, orbax's TensorStore, array_record's reader) talk HTTP
to it, so a run, a resume, a model export and a prepared dataset take the code paths they take
on a bucket. Other URL schemes are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claver_jax import fileio
from conftest import REPO
from fake_gcs import FakeGcs

pytest.importorskip('gcsfs', reason='gs:// paths need gcsfs (the tpu extra)')
BUCKET = 'fake-bucket'


@pytest.fixture
def gcs():
  with FakeGcs() as server:
    yield server


def main(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'claver_jax.main', '--config=tests/tiny_config.py',
                         f'--workdir={workdir}', *overrides], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_paths_are_local_or_gs_and_other_schemes_are_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.run_path('runs/a') == tmp_path / 'runs' / 'a'
  assert fileio.run_path(f'file://{tmp_path}/b') == tmp_path / 'b'
  remote = fileio.run_path('gs://bucket/runs/a')
  assert str(remote / 'metrics.jsonl') == 'gs://bucket/runs/a/metrics.jsonl'
  for url in ('s3://bucket/run', 'hf://user/run', 'http://host/run'):
    with pytest.raises(ValueError, match=r'cannot be written here.*gs://BUCKET/PATH'):
      fileio.run_path(url)
  proc = main('s3://bucket/run')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: s3://bucket/run: s3:// paths cannot be written here')
  assert not (REPO / 's3:').exists()


@pytest.mark.slow
def test_object_store_directories_are_published_by_one_link_object(gcs):
  out = fileio.run_path(f'gs://{BUCKET}/model')
  for version in (1, 2):
    with fileio.atomic_directory(out, overwrite=True) as new:
      (new / 'config.json').write_text(json.dumps({'version': version}))
  assert (out / fileio.LINK).read_text() == '.model.versions/v000002'
  assert json.loads((fileio.resolve_link(out) / 'config.json').read_text()) == {'version': 2}
  with pytest.raises(RuntimeError), fileio.atomic_directory(out, overwrite=True) as new:
    (new / 'config.json').write_text('{"version": 3, "cut": "short"')
    raise RuntimeError('killed while writing')
  assert json.loads((fileio.resolve_link(out) / 'config.json').read_text()) == {'version': 2}

  def versions():
    return sorted({n.split('/')[1] for n in gcs.names(BUCKET) if n.startswith('.model')})

  assert versions() == ['v000001', 'v000002']           # The version cut short is gone.
  with fileio.atomic_directory(out, overwrite=True) as new:
    (new / 'config.json').write_text(json.dumps({'version': 4}))
  # The current version and the one before it stay (a reader may be reading it); no other.
  assert versions() == ['v000002', 'v000003']
  assert json.loads((fileio.resolve_link(out) / 'config.json').read_text()) == {'version': 4}
  assert [n for n in gcs.names(BUCKET) if not n.startswith('.model')] == ['model/LINK']
  with pytest.raises(FileExistsError):
    with fileio.atomic_directory(out):
      pass


def test_a_dataset_prepared_on_gcs_reads_back(gcs, tmp_path):
  from claver_jax.data import prepare
  from claver_jax.data.sources import PreparedSource
  from claver_jax.data.video import open_video
  from helpers import synthetic_dir
  root = synthetic_dir(tmp_path / 'set', num_videos=5)
  url = f'gs://{BUCKET}/k400'
  prepare.prepare([root / 'val.txt'], root, root / 'labels.csv', url, short_side=24,
                  progress=False)
  assert f'k400/{fileio.LINK}' in gcs.names(BUCKET)
  source = PreparedSource(url, 'val')
  with open_video(root / source.name(0)) as video:
    original = video.frames([1, 6], short_side=24)
  assert abs(source.open(0).frames([1, 6]).astype(int) - original).mean() < 6
  assert not Path(url).exists() and not (tmp_path / 'gs:').exists()   # No local stand-in.


# Slow (~40 s): two runs of the tiny config through the CLI.
@pytest.mark.slow
def test_a_run_on_gcs_writes_everything_there_and_resumes(gcs):
  from claver_jax.metrics import read_metrics
  from claver_jax.models import load
  workdir = f'gs://{BUCKET}/runs/tiny'
  first = main(workdir, '--config.train.max_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  second = main(workdir, '--config.train.max_steps=6', '--config.resume_anyway=True')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from step 4 in gs://fake-bucket/runs/tiny' in second.stderr
  names = gcs.names(BUCKET)
  for expected in ('runs/tiny/checkpoints/6/commit_success.txt', 'runs/tiny/metrics.jsonl',
                   'runs/tiny/config.json', 'runs/tiny/report.md', 'runs/tiny/report.html',
                   'runs/tiny/eval/latest/per_class.json', 'runs/tiny/eval/latest/confusion.png',
                   'runs/tiny/eval/best/per_class.json', 'runs/tiny/eval/curves.png',
                   f'runs/tiny/tokenizer/{fileio.LINK}', f'runs/tiny/model/{fileio.LINK}'):
    assert expected in names, (expected, sorted(names))
  assert any(n.startswith('runs/tiny/.tokenizer.versions/') and n.endswith('/merges.txt')
             for n in names)
  assert any(n.startswith('runs/tiny/events.out.tfevents.') for n in names)
  steps = [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  model = load(f'{workdir}/model')
  assert type(model).__name__ == 'CLAVER'
  assert not (REPO / 'gs:').exists()           # The bug: Path('gs://b/x').absolute() is local.
