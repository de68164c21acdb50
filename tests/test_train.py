"""Training and evaluation: the step learns, runs resume exactly, failures are handled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from claver_jax import evaluate
from claver_jax.metrics import read_metrics
from conftest import REPO

TINY = 'tests/tiny_config.py'


def main_command(workdir, *overrides):
  return [sys.executable, '-m', 'claver_jax.main', f'--config={TINY}', f'--workdir={workdir}',
          *overrides]


def run_main(workdir, *overrides, devices: int = 1, check: bool = True):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  proc = subprocess.run(main_command(workdir, *overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'main exited {proc.returncode}:\n{proc.stderr[-5000:]}')
  return proc


def start_and_wait_for_step(workdir, step: int, *overrides) -> subprocess.Popen:
  """Starts main in the background and returns once it has logged `step` (or exited)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(main_command(workdir, *overrides), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (workdir / 'metrics.jsonl').exists() and max(train_losses(workdir), default=0) >= step:
      break
    time.sleep(0.2)
  return proc


def train_losses(workdir) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def saved_steps(workdir) -> list[int]:
  """The steps of WORKDIR/checkpoints whose (asynchronous) save has finished."""
  directory = workdir / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.is_dir()) else []


# ------------------------------------------------------------------------------- evaluation
def test_eval_aggregation_by_hand():
  """A=2 description sets, V=2 views, C=3 classes: softmax per set, mean over sets, sum over
  views; top-k over videos (not divided by A, as the official code does)."""
  from types import SimpleNamespace
  video = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])                  # [B=1, V=2, E=2]
  text = jnp.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],       # set 0: [C=3, E=2]
                    [[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]])      # set 1
  expected = np.zeros(3)
  for v in np.array(video[0]):
    per_set = []
    for t in np.array(text):
      logits = 2 * t @ v                                          # exp(logit_scale) = 2
      per_set.append(np.exp(logits) / np.exp(logits).sum())
    expected += np.mean(per_set, axis=0)
  # Through the family interface, with a stand-in model whose "video" is its embedding.
  model = SimpleNamespace(video_features=lambda x: x,
                          class_logits=lambda f, t: 2 * jnp.einsum('be,ace->abc', f, t))
  got = np.asarray(evaluate.view_scores(model, video, text))[0]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got.sum() == pytest.approx(2.0)                         # V views of probabilities
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
  labels = np.array([1, 1, 2, 2])
  summary = evaluate.summarize(scores, labels, ['a', 'b', 'c'])
  assert summary['top1'] == pytest.approx(50.0)                  # videos 0 and 2
  assert summary['top5'] == pytest.approx(100.0)
  assert summary['per_class_top1'] == {'a': None, 'b': 50.0, 'c': 50.0}
  np.testing.assert_array_equal(summary['confusion'], [[0, 0, 0], [1, 1, 0], [1, 0, 1]])
  np.testing.assert_array_equal(evaluate.topk_correct(scores, labels, 2), [True, True, True, False])


# ------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The tiny config for 9 steps in one go (checkpoints every 3), through the CLI."""
  workdir = tmp_path_factory.mktemp('run') / 'uninterrupted'
  proc = run_main(workdir)
  return workdir, proc


@pytest.mark.slow
def test_a_run_writes_what_it_promises(uninterrupted):
  workdir, proc = uninterrupted
  rows = read_metrics(workdir)
  steps = sorted(train_losses(workdir))
  assert steps == list(range(1, 10))                              # 72 clips / batch 8
  assert all({'train/loss', 'train/lr'} <= set(r) for r in rows if 'train/loss' in r)
  # Every row: the wall clock and the epoch (72 clips: 9 steps an epoch); train rows: the time a
  # step took and how long of it the loop waited for its input.
  assert [r['epoch'] for r in rows if 'train/loss' in r] == [round(s / 9, 4) for s in steps]
  assert all(r['time'] > 1.6e9 for r in rows) and [r['time'] for r in rows] == sorted(
      r['time'] for r in rows)
  assert all(0 <= r['data/wait_s'] <= r['train/step_s'] for r in rows if 'train/loss' in r)
  val = [r for r in rows if 'val/top1' in r]
  assert val and {'val/top5', 'val/mean_class_acc', 'data/train_substituted',
                  'data/eval_substituted'} <= set(val[-1])
  assert val[-1]['step'] == 9 and val[-1]['views'] == '1x1'
  assert list(workdir.glob('events.out.tfevents.*'))             # TensorBoard
  for kind in ('latest', 'best'):                                # the last and the best eval
    for name in ('confusion.png', 'per_class.png', 'confused_pairs.png'):
      assert (workdir / 'eval' / kind / name).is_file()
    reports = json.loads((workdir / 'eval' / kind / 'per_class.json').read_text())
    assert (reports['step'], reports['views'], reports['top1']) == (9, '1x1', val[-1]['val/top1'])
  assert (workdir / 'model' / 'config.json').is_file()           # loadable by claver_jax.models.load
  assert (workdir / 'tokenizer' / 'vocab.json').is_file()
  run_config = json.loads((workdir / 'config.json').read_text())  # the run's config, readable
  assert run_config['config_file'] == TINY and run_config['config']['train']['batch_size'] == 8
  assert run_config['run']['total_steps'] == 9
  assert (workdir / 'report.md').is_file() and (workdir / 'report.html').is_file()
  assert 'Done.' in proc.stdout
  assert 'End of run.' in proc.stderr and f'Report: {workdir / "report.md"}' in proc.stderr
  lr = [r['train/lr'] for r in rows if 'train/lr' in r][-1]
  assert f'train/lr {lr:.2e}' in proc.stdout                    # not rounded to 0.0


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(uninterrupted, tmp_path):
  """While the run holds its workdir (paused), a second run on it stops at once naming its host
  and pid; once it is SIGKILLed, its lock does not block the resume, which restores a checkpoint
  saved before the kill and goes on with the uninterrupted run's losses."""
  import socket
  expected = train_losses(uninterrupted[0])
  workdir = tmp_path / 'killed'
  proc = start_and_wait_for_step(workdir, 5)
  deadline = time.time() + 120             # Step 3's save finishes in the background, after it.
  while not saved_steps(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.1)
  proc.send_signal(signal.SIGSTOP)
  second = run_main(workdir, check=False)
  lines = second.stderr.strip().splitlines()
  assert second.returncode == 1 and lines[-1].startswith(
      f'error: {workdir} is in use by another run (host {socket.gethostname()}, pid {proc.pid}'
  ), second.stderr[-3000:]
  assert 'Trainable parameters' not in second.stderr          # It stopped before building.
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at, saved = max(train_losses(workdir)), saved_steps(workdir)
  assert killed_at >= 5 and saved, 'the run did not get far enough to be killed mid-way'
  resumed = run_main(workdir)
  # It restored the last checkpoint saved before the kill (every 3 steps), not a start from step
  # 0, which would give the same deterministic losses and rewrite every row.
  start = re.findall(r'Resuming from step (\d+)', resumed.stderr)
  assert start == [str(saved[-1])] and 0 < saved[-1] <= killed_at, resumed.stderr[-3000:]
  got = train_losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)],
                             rtol=1e-5)


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_and_a_resume_keeps_its_config(uninterrupted,
                                                                               tmp_path):
  """A copy of the 9-step run with step 9's arrays truncated. Resumed under another lr: stopped
  before anything is built, naming the key. Resumed with 2 data workers instead of 0 (how it
  runs, not what it trains): step 9 is named, set aside, step 6 restores, and steps 7-9 give the
  uninterrupted run's losses."""
  import shutil
  workdir = shutil.copytree(uninterrupted[0], tmp_path / 'corrupt')
  for blob in (workdir / 'checkpoints' / '9' / 'state').rglob('d/*'):
    blob.write_bytes(blob.read_bytes()[:len(blob.read_bytes()) // 2])
  proc = run_main(workdir, '--config.optim.lr=0.5', check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and lines[-1] == (
      f'error: {workdir} holds a run trained with another config (step 9): optim.lr: 0.001 -> '
      '0.5. Resuming would mix two trainings: use another --workdir, or pass '
      '--config.resume_anyway=True to continue anyway.'), proc.stderr[-3000:]
  proc = run_main(workdir, '--config.data.num_workers=2')
  assert 'Checkpoint step 9 in' in proc.stderr and 'cannot be read' in proc.stderr
  assert (workdir / 'corrupt_checkpoints' / '9').is_dir()
  assert 'Resuming from step 6' in proc.stderr
  # The failed restore's abandoned reads were drained: no traceback from them, then or at exit.
  assert 'Traceback' not in proc.stderr and 'Event loop is closed' not in proc.stderr, proc.stderr
  expected, got = train_losses(uninterrupted[0]), train_losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in (7, 8, 9)], [expected[s] for s in (7, 8, 9)],
                             rtol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  """SIGTERM mid-run (100 epochs of 9 steps, so that a fast machine cannot finish first)."""
  workdir = tmp_path / 'term'
  proc = start_and_wait_for_step(workdir, 2, '--config.checkpoint_every_steps=1000',
                                 '--config.train.epochs=100', '--config.eval_every_steps=1000')
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: saved step' in stderr
  saved = saved_steps(workdir)
  assert saved and max(saved) >= 2
  assert not (workdir / 'report.md').exists()        # no report on the way out of a SIGTERM
  from claver_jax import report                      # but one on demand, saying where it stopped
  report.main([str(workdir)])
  text = (workdir / 'report.md').read_text()
  last = max(train_losses(workdir))
  assert last < 900 and f'Stopped at step {last} of 900' in text and 'No evaluation yet.' in text
  assert '![training curves' in text and (workdir / 'eval' / 'curves.png').is_file()


@pytest.mark.slow
def test_sigterm_during_an_evaluation_saves_and_exits_within_30_s(tmp_path):
  """The demo config, evaluated at step 2 (1200 clips): SIGTERM between its batches stops the
  evaluation, saves step 2 and exits 0; the evaluation is marked to be redone on resume."""
  import threading
  workdir = tmp_path / 'demo'
  command = main_command(workdir, '--config.eval_every_steps=2', '--config.train.max_steps=4')
  command[command.index(f'--config={TINY}')] = '--config=configs/demo.py'
  proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  stderr, evaluating = [], threading.Event()

  def read():
    for line in proc.stderr:
      stderr.append(line)
      if 'Evaluating step 2' in line:
        evaluating.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert evaluating.wait(timeout=300), ''.join(stderr)[-3000:]
  time.sleep(2)                                      # Inside the batches.
  signalled = time.time()
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  elapsed = time.time() - signalled
  reader.join(timeout=10)
  text = ''.join(stderr)
  assert proc.returncode == 0 and elapsed < 30, (elapsed, text[-3000:])
  assert 'SIGTERM during the evaluation of step 2' in text and 'SIGTERM: saved step 2' in text
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2]
  assert not [r for r in read_metrics(workdir) if 'val/top1' in r]
  progress = json.loads((workdir / 'checkpoints' / '2' / 'progress' / 'metadata').read_text())
  assert progress['eval_pending'] is True


@pytest.mark.slow
def test_non_finite_step_stops_the_run_there_and_keeps_the_last_good_checkpoint(uninterrupted,
                                                                                tmp_path):
  """lr 1e12 from step 9: the first step whose loss or gradient is not finite is found on the
  device, whether the loss is read every step or every 100; nothing from it on is saved or
  exported."""
  import re
  import shutil
  from claver_jax.models.io import read_model_config
  blow_up = ('--config.train.epochs=3', '--config.optim.lr=1e12', '--config.optim.warmup_epochs=0')
  found = {}
  for log_every in (1, 100):
    workdir = shutil.copytree(uninterrupted[0], tmp_path / f'log{log_every}')
    proc = run_main(workdir, *blow_up, f'--config.log_every_steps={log_every}',
                    '--config.checkpoint_every_steps=1000', '--config.eval_every_steps=1000',
                    '--config.resume_anyway=True', check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and 'not finite at step' in last, proc.stderr[-3000:]
    found[log_every] = int(re.search(r'not finite at step (\d+)', last).group(1))
    saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert max(saved) < found[log_every]
    assert f'the last good checkpoint ({workdir}/checkpoints/{max(saved)}) is kept' in last
    assert read_model_config(workdir / 'model')[2]['source']['step'] == 9     # not replaced
  assert found[1] == found[100] and 9 < found[1] < 27


@pytest.mark.slow
def test_a_resume_drops_a_torn_metrics_line_redoes_a_stopped_evaluation_and_keeps_the_best(
    uninterrupted, tmp_path):
  """A copy of the 9-step run whose last metrics line was torn by a SIGKILL and whose step-9
  evaluation a SIGTERM stopped (as test_sigterm_during_an_evaluation... leaves step 2), resumed
  for 9 more steps at lr 0: the torn line is dropped with a warning, step 9 is evaluated first,
  and since the unchanged model is not better, WORKDIR/model stays step 9's (before, the best
  restarted at -1 on every resume and the first evaluation always exported)."""
  import shutil
  from claver_jax.models.io import read_model_config
  workdir = shutil.copytree(uninterrupted[0], tmp_path / 'resumed')
  metrics = workdir / 'metrics.jsonl'
  whole = metrics.read_text()
  metrics.write_text(whole + '{"step": 10, "train/lo')
  progress = workdir / 'checkpoints' / '9' / 'progress' / 'metadata'
  progress.write_text(json.dumps({**json.loads(progress.read_text()), 'eval_pending': True}))
  proc = run_main(workdir, '--config.train.epochs=2', '--config.optim.lr=0',
                  '--config.resume_anyway=True')
  assert f'{metrics}:{whole.count(chr(10)) + 1}: dropped a torn last line' in proc.stderr
  rows = read_metrics(workdir)
  assert rows[:whole.count('\n')] == [json.loads(line) for line in whole.splitlines()]
  top1 = [(r['step'], r['val/top1']) for r in rows if 'val/top1' in r]
  assert [step for step, _ in top1] == [9, 9, 18] and len({v for _, v in top1}) == 1
  assert read_model_config(workdir / 'model')[2]['source']['step'] == 9


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
  from claver_jax.metrics import MetricsFileError, MetricWriter
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
  with pytest.raises(MetricsFileError, match=r'metrics.jsonl:2: not a JSON line'):
    MetricWriter(tmp_path, resume_step=3)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='simulated CPU devices')
@pytest.mark.slow
def test_eight_devices_give_the_same_losses_as_one(uninterrupted, tmp_path):
  workdir = tmp_path / 'mesh'
  run_main(workdir, '--config.mesh.data=4', '--config.mesh.fsdp=2', '--config.train.max_steps=4',
           devices=8)
  got = train_losses(workdir)
  expected = train_losses(uninterrupted[0])
  assert sorted(got) == [1, 2, 3, 4]
  # Same data, same steps (the schedule differs only after max_steps cuts the run).
  np.testing.assert_allclose([got[s] for s in (1, 2)], [expected[s] for s in (1, 2)], rtol=1e-4)


@pytest.mark.slow
def test_predict_on_a_synthetic_mp4(uninterrupted, tmp_path, monkeypatch):
  import json as json_lib
  from claver_jax.data import synthetic
  from conftest import run_cli
  clip, label = synthetic.make_clip(7, num_frames=8, size=32)
  video = tmp_path / 'clip.mp4'
  synthetic.write_mp4(video, clip)
  labels = list(synthetic.CLASS_NAMES[:6]) + ['juggling fire']   # any label set: open vocabulary
  proc = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}', f'--video={video}',
                 '--labels', *labels, '--top_k=3', '--json')
  result = json_lib.loads(proc.stdout)
  assert [set(r) for r in result] == [{'label', 'score'}] * 3
  # The model directory records the run's templates (the demo's 'objects'); predict uses them.
  from claver_jax import predict
  from claver_jax.text.prompts import OBJECT_TEMPLATES
  meta = json_lib.loads((uninterrupted[0] / 'model' / 'config.json').read_text())
  assert meta['source']['templates'] == list(OBJECT_TEMPLATES)
  assert meta['source']['eval_resize_ratio'] == 1.0        # the demo's whole-frame test view
  used, real = [], predict.prompt_tokens
  monkeypatch.setattr(predict, 'prompt_tokens',
                      lambda *a, **kw: used.append(kw['templates']) or real(*a, **kw))
  in_process = predict.predict(uninterrupted[0], video, labels, top_k=3)
  assert used == [OBJECT_TEMPLATES]
  assert [r['label'] for r in in_process] == [r['label'] for r in result]
  assert all(r['label'] in labels for r in result)
  scores = [r['score'] for r in result]
  assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
  label_file = tmp_path / 'labels.csv'        # Any-case header, ids out of line order.
  label_file.write_text('ID,Name\n' + ''.join(f'{i},{n}\n' for i, n in reversed(list(
      enumerate(labels)))))
  table = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}/model',
                  f'--video={video}', f'--label_file={label_file}').stdout.splitlines()
  assert table[0].split() == ['video', 'rank', 'label', 'probability'] and len(table) == 6
  assert table[1].startswith(str(video))                      # header + top 5, ranks 1..5
  rows = [re.fullmatch(r'\S*\s+(\d)  (.+?)\s+(\d\.\d{4})', line).groups() for line in table[1:]]
  assert [int(rank) for rank, _, _ in rows] == [1, 2, 3, 4, 5]
  assert {label for _, label, _ in rows} <= set(labels)
  broken = tmp_path / 'broken.mp4'                   # Cut inside its index: PyAV sees no stream.
  data = video.read_bytes()
  broken.write_bytes(data[:data.index(b'moov') + 60])
  bad = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}', f'--video={broken}',
                '--labels', 'a', 'b', check=False)
  assert bad.returncode != 0
  assert f"error: {broken}: truncated: the file has" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_predict_and_the_prompts_check_read_labels_files_as_training_does(uninterrupted, tmp_path):
  """One parser: ids and an `ID,Name` header honoured, duplicate names an error with file:line,
  in predict's --label_file (see also test_predict_on_a_synthetic_mp4) and the prompts
  checker's --labels as in training's read_labels."""
  from claver_jax.data import synthetic
  from claver_jax.data.sources import read_labels
  from conftest import run_cli
  clip, _ = synthetic.make_clip(7, num_frames=8, size=32)
  video = tmp_path / 'clip.mp4'
  synthetic.write_mp4(video, clip)
  good = tmp_path / 'good.csv'
  good.write_text('ID,Name\n1,moving right\n0,moving left\n')
  assert read_labels(good) == ['moving left', 'moving right']
  check = run_cli('claver_jax.text.prompts', '--check=synthetic_motion', f'--labels={good}',
                  check=False)
  assert 'coverage: 2/2 classes' in check.stdout
  twice = tmp_path / 'twice.csv'
  twice.write_text('0,moving left\n1,moving right\n2,moving left\n')
  with pytest.raises(ValueError, match='twice.csv:3: the class name'):
    read_labels(twice)
  for proc in (run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}',
                       f'--video={video}', f'--label_file={twice}', check=False),
               run_cli('claver_jax.text.prompts', '--check=synthetic_motion',
                       f'--labels={twice}', check=False)):
    assert proc.returncode != 0
    assert f"error: {twice}:3: the class name 'moving left' appears twice" in proc.stderr


@pytest.mark.slow
def test_model_directory_is_complete_at_every_instant_of_an_export(uninterrupted, tmp_path,
                                                                  monkeypatch):
  """WORKDIR/model while the run exports a new best: checked after every rename, exchange and
  removal the export makes, from a copied workdir (model/ a real directory) on."""
  import json as json_lib
  import shutil
  from claver_jax import fileio
  from claver_jax.models import load
  from claver_jax.models.build import export_model
  from claver_jax.text import load_tokenizer
  workdir = shutil.copytree(uninterrupted[0], tmp_path / 'copy')
  out = workdir / 'model'
  assert (uninterrupted[0] / 'model').is_symlink() and not out.is_symlink()
  model, tokenizer = load(out), load_tokenizer(out)
  checks = []

  def assert_complete(what):
    source = json_lib.loads((out / 'config.json').read_text())['source']
    assert (out / 'params' / '_METADATA').is_file() and (out / 'tokenizer').is_dir(), what
    checks.append((what, source['step']))

  def checked(name, real):
    def call(*args, **kwargs):
      result = real(*args, **kwargs)
      assert_complete(name)
      return result
    return call

  for module, name in ((os, 'replace'), (os, 'rename'), (shutil, 'rmtree'), (fileio, 'exchange')):
    monkeypatch.setattr(module, name, checked(name, getattr(module, name)))
  for step in (100, 200, 300):
    export_model(model, tokenizer, out, {'step': step}, ((0.5,) * 3, (0.25,) * 3))
    assert_complete('after')
    assert checks[-1][1] == step and load(out).cfg == model.cfg
  assert {'replace', 'exchange', 'rmtree'} <= {what for what, _ in checks}
  assert out.is_symlink() and out.resolve().parent == workdir / '.model.versions'
  assert len(list((workdir / '.model.versions').iterdir())) == 2     # this one and the one before


@pytest.mark.slow
def test_config_errors_are_one_line_and_write_nothing(tmp_path):
  """A misspelt key, a recipe without the checkpoint it starts from, keys that cannot work
  together: one line on stderr, exit 2, no workdir."""
  workdir = tmp_path / 'never'
  cases = {
      ('--config.model.temporall=kmt',):
          "error: --config.model.temporall: config.model has no key 'temporall'; did you mean "
          "'config.model.temporal'?",
      ('--config.init.clip=/some/clip',):
          "error: config.text.tokenizer='train' learns a new vocabulary, but the text tower of "
          'config.init.clip',
      ('--config=configs/ucf101.py:shots=2',):
          'error: This recipe starts from config.init.checkpoint: the paper\'s Kinetics-400 model '
          'of 20 epochs at 32 frames: the WORKDIR of a `configs/k400.py:B16,32,pretrain` run',
  }
  cases[('--config.checkpoint.keep=0',)] = (
      'error: config.checkpoint.keep=0 must be an integer >= 1 (the latest checkpoint is what a '
      'resume and a SIGTERM need).')
  for overrides, message in cases.items():
    proc = run_main(workdir, *overrides, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(message), lines[0]
    assert not workdir.exists()


@pytest.mark.slow
def test_init_checkpoint_takes_the_weights_only(uninterrupted, tmp_path):
  """From another run's workdir (its WORKDIR/model): step 1, the schedule from its start, the
  source untouched. Cutmix only (mixup_alpha 0) trains with finite losses."""
  source = uninterrupted[0]
  before = sorted(p.name for p in (source / 'checkpoints').iterdir())
  workdir = tmp_path / 'from_checkpoint'
  run_main(workdir, f'--config.init.checkpoint={source}', '--config.text.tokenizer=',
           '--config.train.max_steps=2', '--config.train.cutmix_alpha=1.0')
  rows = [r for r in read_metrics(workdir) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2]
  assert rows[0]['train/lr'] == 0.0                          # warmup starts again at 0
  assert all(np.isfinite(r['train/loss']) for r in rows)
  assert sorted(p.name for p in (source / 'checkpoints').iterdir()) == before
  assert not (workdir / 'tokenizer').exists()               # the checkpoint's vocabulary


@pytest.mark.slow
def test_an_eval_run_has_its_own_rows_reports_and_score_dump(uninterrupted, tmp_path):
  """config.mode=eval on a finished run, 1 clip x 2 crops, with eval.dump_scores: an eval/* row
  with its step and views beside the training's val/* row, reports in eval/step9_1x2/ (the
  training's latest and best untouched), and per-video scores whose top-1 is the row's."""
  import shutil
  from claver_jax.data import synthetic
  workdir = shutil.copytree(uninterrupted[0], tmp_path / 'copy', symlinks=True)
  latest = (workdir / 'eval' / 'latest' / 'per_class.json').read_text()
  run_main(workdir, '--config.mode=eval', '--config.eval.num_crops=2',
           '--config.eval.dump_scores=True')
  rows = read_metrics(workdir)
  row = rows[-1]
  assert row['step'] == 9 and row['views'] == '1x2' and not any(k.startswith('val/') for k in row)
  assert {'eval/top1', 'eval/top5', 'eval/mean_class_acc'} <= set(row)
  assert [r['views'] for r in rows if 'val/top1' in r] == ['1x1']   # the training's, kept
  directory = workdir / 'eval' / 'step9_1x2'
  reports = json.loads((directory / 'per_class.json').read_text())
  assert (reports['step'], reports['views'], reports['top1']) == (9, '1x2', row['eval/top1'])
  assert (workdir / 'eval' / 'latest' / 'per_class.json').read_text() == latest
  dump = np.load(directory / 'scores.npz')                      # no pickles
  val = synthetic.split_indices(96, 'val')
  assert sorted(dump['video']) == sorted(f'synthetic:{i}' for i in val)
  labels = [int(v.split(':')[1]) % synthetic.NUM_CLASSES for v in dump['video']]
  np.testing.assert_array_equal(dump['label'], labels)
  assert dump['scores'].shape == (len(val), 12) and list(dump['class_names']) == list(
      synthetic.CLASS_NAMES)
  np.testing.assert_allclose(dump['scores'].sum(axis=1), 2.0, rtol=1e-5)   # 2 views
  assert (int(dump['step']), str(dump['views'])) == (9, '1x2')
  top1 = 100 * np.mean(dump['scores'].argmax(axis=1) == dump['label'])
  assert top1 == pytest.approx(row['eval/top1'])
  text = (workdir / 'report.md').read_text()
  assert '| eval run | 9 | 1x2 |' in text and '| val, best | 9 | 1x1 |' in text
  assert 'Finished: 9 of 9 steps.' in text                      # the training's config.json kept
  assert json.loads((workdir / 'config.json').read_text())['config']['mode'] == 'train'


@pytest.mark.slow
def test_each_evaluation_counts_its_own_substitutes(tmp_path):
  """A val list of 24 with one unreadable video, evaluated at steps 1 and 2: each row counts 1
  (the counter is reset per evaluation, not a running total). About 20 s."""
  from helpers import synthetic_dir
  data = synthetic_dir(tmp_path / 'data', num_videos=120, num_frames=8, size=32)
  first = (data / 'val.txt').read_text().splitlines()[0].rsplit(' ', 1)[0]
  (data / first).write_bytes(b'not a video')
  workdir = tmp_path / 'run'
  run_main(workdir, '--config.data.source=filelist', f'--config.data.root={data}',
           f'--config.data.train_list={data / "train.txt"}',
           f'--config.data.val_list={data / "val.txt"}',
           f'--config.data.labels={data / "labels.csv"}',
           '--config.train.max_steps=2', '--config.eval_every_steps=1')
  evals = [r for r in read_metrics(workdir) if 'val/top1' in r]
  assert [(r['step'], r['data/eval_substituted']) for r in evals] == [(1, 1), (2, 1)]


@pytest.mark.slow
def test_predict_over_a_folder_and_a_list_in_one_process(uninterrupted, tmp_path, monkeypatch):
  """One model load and one compiled step for every video of a folder (batches of 2, the last
  padded); a list file with labels; an unreadable video skipped with its reason; CSV and JSON out;
  exit status 1 when a video could not be read."""
  import csv
  from claver_jax import evaluate, predict
  from claver_jax.data import synthetic
  from conftest import run_cli
  folder = tmp_path / 'videos'
  for i in range(5):
    clip, _ = synthetic.make_clip(i, num_frames=8, size=32)
    (folder / ('sub' if i % 2 else '')).mkdir(parents=True, exist_ok=True)
    synthetic.write_mp4(folder / ('sub' if i % 2 else '') / f'clip{i}.mp4', clip)
  (folder / 'broken.mp4').write_bytes(b'not a video')
  labels = list(synthetic.CLASS_NAMES[:4])
  loads, traces = [], []
  real_load, real_scores = predict.load_video_model, evaluate.view_scores
  monkeypatch.setattr(predict, 'load_video_model', lambda *a, **kw: loads.append(1) or
                      real_load(*a, **kw))
  monkeypatch.setattr(evaluate, 'view_scores', lambda *a: traces.append(1) or real_scores(*a))
  videos, single = predict.video_inputs(folder)
  assert not single and [v.name for v in videos] == ['broken.mp4', 'clip0.mp4', 'clip2.mp4',
                                                     'clip4.mp4', 'clip1.mp4', 'clip3.mp4']
  results = predict.predict_many(uninterrupted[0], videos, labels, top_k=2, batch_size=2)
  assert loads == [1] and traces == [1]              # one load, one compile for 5 videos
  assert 'not a readable video' in results[0]['error']
  alone = predict.predict(uninterrupted[0], folder / 'clip2.mp4', labels, top_k=2)
  [batched] = [r['predictions'] for r in results if r['video'].endswith('clip2.mp4')]
  assert [p['label'] for p in batched] == [p['label'] for p in alone]
  np.testing.assert_allclose([p['score'] for p in batched], [p['score'] for p in alone],
                             rtol=1e-4)
  listed = tmp_path / 'list.txt'                     # the training lists' format
  listed.write_text('clip0.mp4 0\n# a comment\n\nsub/clip1.mp4 1\n')
  assert predict.video_inputs(listed, folder) == ([folder / 'clip0.mp4', folder / 'sub/clip1.mp4'],
                                                  False)
  out = tmp_path / 'out.csv'
  proc = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}', f'--video={folder}',
                 '--labels', *labels, '--top_k=2', f'--output={out}', check=False)
  assert proc.returncode == 1 and '1 of 6 videos could not be read' in proc.stderr
  table = proc.stdout.splitlines()
  assert table[0].split() == ['video', 'rank', 'label', 'probability']
  assert re.match(r'broken\.mp4 +error: not a readable video', table[1])
  assert table[2].startswith('clip0.mp4 ')
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 1 + 5 * 2 and rows[0]['error'] and rows[1]['rank'] == '1'
  as_json = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}',
                    f'--video={listed}', f'--root={folder}', '--labels', *labels, '--json')
  result = json.loads(as_json.stdout)
  assert [r['video'] for r in result] == [str(folder / 'clip0.mp4'), str(folder / 'sub/clip1.mp4')]
  assert all(len(r['predictions']) == 4 for r in result)


@pytest.mark.slow
def test_eval_mode_needs_something_to_evaluate(tmp_path):
  proc = run_main(tmp_path / 'empty', '--config.mode=eval', check=False)
  assert proc.returncode != 0 and 'nothing to evaluate' in proc.stderr


def test_cadence_is_every_multiple_of_a_jobs_intervals_and_the_last_step():
  """The loop logs, evaluates and saves at step s when s is a multiple of one of the job's
  intervals (checkpoints: checkpoint_every_steps and the epoch), and at the last step."""
  from claver_jax.train import Cadence
  cadence = Cadence(10, {'log': (3,), 'eval': (5,), 'checkpoint': (4, 5)})
  due = {job: [s for s in range(1, 11) if cadence.due(job, s)] for job in cadence.intervals}
  assert due == {'log': [3, 6, 9, 10], 'eval': [5, 10], 'checkpoint': [4, 5, 8, 10]}
