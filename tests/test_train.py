"""Training and evaluation: the step learns, runs resume exactly, failures are handled."""

from __future__ import annotations

import os
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


def test_a_run_writes_what_it_promises(uninterrupted):
  workdir, proc = uninterrupted
  rows = read_metrics(workdir)
  steps = sorted(train_losses(workdir))
  assert steps == list(range(1, 10))                              # 72 clips / batch 8
  assert all({'train/loss', 'train/lr'} <= set(r) for r in rows if 'train/loss' in r)
  val = [r for r in rows if 'val/top1' in r]
  assert val and {'val/top5', 'data/train_substituted', 'data/eval_substituted'} <= set(val[-1])
  assert list(workdir.glob('events.out.tfevents.*'))             # TensorBoard
  assert (workdir / 'eval' / 'confusion.png').is_file()
  assert (workdir / 'eval' / 'per_class.json').is_file()
  assert (workdir / 'model' / 'config.json').is_file()           # loadable by claver_jax.models.load
  assert (workdir / 'tokenizer' / 'vocab.json').is_file()
  assert 'Done.' in proc.stdout


def test_killed_run_resumes_with_identical_losses(uninterrupted, tmp_path):
  expected = train_losses(uninterrupted[0])
  workdir = tmp_path / 'killed'
  proc = start_and_wait_for_step(workdir, 5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert max(train_losses(workdir)) >= 5, 'the run did not get far enough to be killed mid-way'
  run_main(workdir)
  got = train_losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)],
                             rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'term'
  proc = start_and_wait_for_step(workdir, 2, '--config.checkpoint_every_steps=100')
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: saved step' in stderr
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert saved and max(saved) >= 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
  import shutil
  workdir = tmp_path / 'nan'
  shutil.copytree(uninterrupted[0], workdir)
  # More epochs from step 9, with a learning rate that blows the weights up.
  proc = run_main(workdir, '--config.train.epochs=3', '--config.optim.lr=1e12',
                  '--config.optim.warmup_epochs=0', check=False)
  assert proc.returncode != 0
  assert 'not finite' in proc.stderr or 'loss is nan' in proc.stderr
  assert 'last good checkpoint (step 9) is kept' in proc.stderr
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert max(saved) == 9


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='simulated CPU devices')
def test_eight_devices_give_the_same_losses_as_one(uninterrupted, tmp_path):
  workdir = tmp_path / 'mesh'
  run_main(workdir, '--config.mesh.data=4', '--config.mesh.fsdp=2', '--config.train.max_steps=4',
           devices=8)
  got = train_losses(workdir)
  expected = train_losses(uninterrupted[0])
  assert sorted(got) == [1, 2, 3, 4]
  # Same data, same steps (the schedule differs only after max_steps cuts the run).
  np.testing.assert_allclose([got[s] for s in (1, 2)], [expected[s] for s in (1, 2)], rtol=1e-4)


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
  used, real = [], predict.prompt_tokens
  monkeypatch.setattr(predict, 'prompt_tokens',
                      lambda *a, **kw: used.append(kw['templates']) or real(*a, **kw))
  in_process = predict.predict(uninterrupted[0], video, labels, top_k=3)
  assert used == [OBJECT_TEMPLATES]
  assert [r['label'] for r in in_process] == [r['label'] for r in result]
  assert all(r['label'] in labels for r in result)
  scores = [r['score'] for r in result]
  assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
  label_file = tmp_path / 'labels.csv'
  label_file.write_text('id,name\n' + ''.join(f'{i},{n}\n' for i, n in enumerate(labels)))
  table = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}/model',
                  f'--video={video}', f'--label_file={label_file}').stdout.splitlines()
  assert table[0].split() == ['label', 'score'] and len(table) == 6     # header + top 5
  broken = tmp_path / 'broken.mp4'
  broken.write_bytes(b'not a video')
  bad = run_cli('claver_jax.predict', f'--checkpoint={uninterrupted[0]}', f'--video={broken}',
                '--labels', 'a', 'b', check=False)
  assert bad.returncode != 0 and 'error:' in bad.stderr


def test_eval_mode_needs_something_to_evaluate(tmp_path):
  proc = run_main(tmp_path / 'empty', '--config.mode=eval', check=False)
  assert proc.returncode != 0 and 'nothing to evaluate' in proc.stderr
