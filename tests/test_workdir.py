"""A run's claim on its workdir: one run at a time, room to write, a resume under its own config,
checkpoint faults, config values that cannot work. (The whole-run versions are in test_train.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from claver_jax import checkpoint, run_config
from claver_jax.run_config import ConfigError, check_config
from claver_jax.workdir import WorkdirError, WorkdirLock, check_room
from conftest import REPO, run_cli

TINY = 'tests/tiny_config.py'


def tiny_config():
  import tiny_config as tiny
  return tiny.get_config()


# ------------------------------------------------------------------------------- one run at a time
def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom pathlib import Path\n'
       'from claver_jax.workdir import WorkdirLock\n'
       'lock = WorkdirLock(Path(sys.argv[1]))\nprint("locked", flush=True)\ntime.sleep(60)\n',
       str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    with pytest.raises(WorkdirError, match=f'in use by another run \\(host {socket.gethostname()}'
                                           f', pid {holder.pid}, started '):
      WorkdirLock(tmp_path)
  finally:
    holder.send_signal(signal.SIGKILL)          # No release, no cleanup: the kernel drops it.
    holder.wait()
  lock = WorkdirLock(tmp_path)                  # A dead holder never blocks the next run.
  assert f'"pid": {os.getpid()}' in (tmp_path / '.lock').read_text()
  lock.release()
  WorkdirLock(tmp_path).release()


# ------------------------------------------------------------------------------- room to write
@pytest.mark.slow
def test_a_workdir_that_cannot_be_written_is_one_line_before_anything_is_built(tmp_path):
  (tmp_path / 'a_file').write_text('not a directory')
  proc = run_cli('claver_jax.main', f'--config={TINY}', f'--workdir={tmp_path / "a_file" / "run"}',
                 check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and lines[-1].startswith('error: Cannot write to '), proc.stderr
  assert 'Trainable parameters' not in proc.stderr and 'Texts:' not in proc.stderr


def in_private_mounts(script: str, mounts: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
  """Runs python `script` in a mount namespace of its own (unshare), with tmpfs mounts
  {directory name under tmp_path: mount options}; skips where namespaces are not allowed."""
  if shutil.which('unshare') is None:
    pytest.skip('unshare (util-linux) is not installed')
  setup = []
  for name, options in mounts.items():
    (tmp_path / name).mkdir()
    setup.append(f'mount -t tmpfs -o {options} tmpfs {tmp_path / name}')
  command = ' && '.join(setup + [f'"{sys.executable}" -c "$0" "{tmp_path}"'])
  user = [] if os.geteuid() == 0 else ['--map-root-user']
  probe = subprocess.run(['unshare', '--mount', *user, 'true'], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f'no private mount namespace here: {probe.stderr.decode().strip()}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(['unshare', '--mount', *user, 'sh', '-c', command,
                         textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_read_only_full_and_nearly_full_file_systems_are_found_at_start(tmp_path):
  script = '''
      import sys
      from pathlib import Path
      from claver_jax.workdir import WorkdirError, check_room
      root = Path(sys.argv[1])
      with open(root / 'full' / 'filler', 'wb') as f:      # Fill it up.
        try:
          while True:
            f.write(b'0' * 65536)
        except OSError:
          pass
      for name in ('read_only', 'full', 'small'):
        try:
          check_room(root / name / 'run')
          print(name, 'ok')
        except WorkdirError as e:
          print(name, e)
  '''
  proc = in_private_mounts(script, {'read_only': 'ro,size=1m', 'full': 'size=2m',
                                    'small': 'size=16m'}, tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = dict(line.split(' ', 1) for line in proc.stdout.strip().splitlines())
  assert 'Cannot write to' in lines['read_only'] and 'Read-only file system' in lines['read_only']
  assert 'Cannot write to' in lines['full'] and 'No space left' in lines['full']
  assert 'MiB free, less than the 64 MiB' in lines['small']


@pytest.mark.slow
def test_a_failed_asynchronous_save_is_reported_at_once(tmp_path):
  """A checkpoint that fills the disk in orbax's background thread: the loop's check after the
  next step raises, naming the step (orbax itself would say so at the next save)."""
  script = '''
      import sys, time
      import grain, jax.numpy as jnp, ml_collections, numpy as np
      from claver_jax.checkpoint import Checkpointer, CheckpointError
      checkpointer = Checkpointer(sys.argv[1] + '/disk')
      data = iter(grain.MapDataset.range(10).to_iter_dataset())
      weights = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024), np.float32))
      checkpointer.save(7, {'w': weights}, data, ml_collections.ConfigDict())  # 4 MB > 1 MB
      start = time.time()
      try:
        while time.time() - start < 30:
          checkpointer.check_background_save()    # As the train loop does after each step.
          time.sleep(0.05)
        print('no error')
      except CheckpointError as e:
        print(e)
  '''
  proc = in_private_mounts(script, {'disk': 'size=1m'}, tmp_path)
  last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
  assert last.startswith('The checkpoint of step 7 could not be written to '), last
  assert 'No space left on device' in last and 'Check the disk and resume' in last


# ------------------------------------------------------------------------------- resuming
def test_resume_compares_what_is_trained_and_ignores_how_it_runs():
  import json
  config = tiny_config()
  saved = json.loads(config.to_json_best_effort())
  changed = tiny_config()
  changed.optim.lr = 0.5
  changed.model.temporal = 'joint'
  changed.train.batch_size = 16
  changed.data.seed = 3
  changed.data.num_workers = 4                  # How it runs: not compared.
  changed.log_every_steps = 7
  changed.model.remat = True
  changed.data.root = '/moved/data'
  assert run_config.resume_differences(saved, changed) == [
      "model.temporal: 'kmt' -> 'joint'", 'data.seed: 0 -> 3', 'optim.lr: 0.001 -> 0.5',
      'train.batch_size: 8 -> 16']
  changed.mode = 'eval'                          # Evaluating: the model must be the same.
  assert run_config.resume_differences(saved, changed) == ["model.temporal: 'kmt' -> 'joint'"]
  del saved['optim']['lr']                       # A key an older version did not have.
  changed.mode = 'train'
  assert 'optim.lr' not in ' '.join(run_config.resume_differences(saved, changed))


def test_iterator_states_convert_between_worker_counts():
  """grain's in-process state counts batches; a multi-worker one counts them per worker (batch k
  from worker k % W). 5 batches read, as grain itself records them with 0, 1 and 3 workers."""
  def workers(*counts, cycle):
    return {'next_index_in_cycle': cycle, 'next_index_in_datasets': len(counts),
            'iterators_in_use_indices': list(range(len(counts))),
            'iterators_in_use_states': [{'next_index': c} for c in counts],
            'exhausted': [0] * len(counts), 'future_states': {}}
  recorded = {0: {'next_index': 5}, 1: workers(5, cycle=0), 3: workers(2, 2, 1, cycle=2)}
  fresh = {0: {'next_index': 0}, 1: workers(0, cycle=0), 3: workers(0, 0, 0, cycle=0)}
  for saved in recorded.values():
    assert checkpoint.batches_read(saved) == 5
    for count, template in fresh.items():
      assert checkpoint.iterator_state(template, saved) == recorded[count]
  assert checkpoint.iterator_state(fresh[3], {'next_index': 7})['iterators_in_use_states'] == [
      {'next_index': 3}, {'next_index': 2}, {'next_index': 2}]


# ------------------------------------------------------------------------------- config values
@pytest.mark.parametrize('key,value,message', [
    ('log_every_steps', 0, 'config.log_every_steps=0 must be an integer >= 1 \\(1 logs every'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps=0 must be an integer >= 1'),
    ('checkpoint.keep', 0, 'config.checkpoint.keep=0 must be .* resume and a SIGTERM need'),
    ('checkpoint.keep_best', -1, 'config.checkpoint.keep_best=-1'),
    ('eval_every_steps', -5, 'config.eval_every_steps=-5'),
    ('train.batch_size', 0, 'config.train.batch_size=0'),
    ('train.grad_accum_steps', 0, 'config.train.grad_accum_steps=0'),
    ('eval.num_clips', 0, 'config.eval.num_clips=0'),
    ('data.num_frames', 0, 'config.data.num_frames=0'),
    ('data.num_workers', -1, 'config.data.num_workers=-1'),
    ('data.read_threads', 0, 'config.data.read_threads=0'),
    ('text.sets_per_step', 0, 'config.text.sets_per_step=0'),
    ('data.jitter_prob', 1.5, 'config.data.jitter_prob=1.5 must be a probability'),
    ('data.flip_prob', -0.1, 'config.data.flip_prob=-0.1 must be a probability'),
    ('optim.lr', -1e-3, 'config.optim.lr=-0.001, .* >= 0'),
    ('train.epochs', 0, 'config.train.epochs=0 must be > 0'),
    ('optim.grad_clip_norm', 0.0, 'config.optim.grad_clip_norm=0.0 must be > 0'),
    ('data.scales', (1.0, 0.0), 'config.data.scales=\\(1.0, 0.0\\)'),
    ('data.eval_resize_ratio', 0.5, 'config.data.eval_resize_ratio=0.5 must be >= 1'),
    ('mesh.data', 0, 'config.mesh.data=0'),
])
def test_values_that_cannot_work_are_rejected(key, value, message):
  config = tiny_config()
  node = config
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    check_config(config)


def test_every_config_and_preset_passes_the_value_checks():
  """The shipped recipes themselves pass (check_values only: some recipes need an init)."""
  import importlib.util
  checked = 0
  for path in sorted((REPO / 'configs').glob('*.py')):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in (None, 'B16,16,kmct', 'L14_336,32', 'B16,8,xclip', 'B16,32,pretrain', 'shots=2',
                'motion_prompts', 'xclip'):
      try:
        config = module.get_config(arg)
      except ValueError:                         # Not a preset of this recipe.
        continue
      run_config.check_values(config)
      checked += 1
  assert checked >= 10
  check_room(REPO.parent)                        # And a normal directory has room.
