"""Multi-process runs: starting jax.distributed, barriers, and a SIGTERM stop all processes share.

One JAX process runs per host (a TPU VM worker, a Slurm task, a process of
launch/local_multiprocess.sh); each drives its local devices, and jax.devices() lists the devices
of all of them. `initialize` must run before anything else uses JAX. It starts jax.distributed
  * explicitly, from coordinator_address / num_processes / process_id (main.py's flags, or the
    environment variables CLAVER_COORDINATOR_ADDRESS, CLAVER_NUM_PROCESSES, CLAVER_PROCESS_ID);
  * automatically on Cloud TPU VMs and GKE TPU pods, in Slurm job steps of more than one task,
    and under Open MPI's mpirun: jax.distributed.initialize() reads the rest from there;
  * not at all otherwise: one process, as before.
CLAVER_LOCAL_DEVICE_IDS (e.g. "0,1,2,3,4,5,6,7") lists the GPUs a process drives; without it,
Slurm and Open MPI give each process one GPU (JAX's default: one task per GPU).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

ENV_COORDINATOR = 'CLAVER_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'CLAVER_NUM_PROCESSES'
ENV_PROCESS_ID = 'CLAVER_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'CLAVER_LOCAL_DEVICE_IDS'
_SLURM_STEP = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')


def running_in_cloud_tpu_vm() -> bool:
  """What `import jax` found when libtpu saw TPU chips. JAX keeps it in a private module: if a
  JAX release moves it, this is False and a TPU VM run is started as on any machine (pass
  --coordinator_address, --num_processes and --process_id, or the CLAVER_* variables)."""
  try:
    from jax._src import cloud_tpu_init
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def detected_cluster() -> str | None:
  """The multi-process environment jax.distributed can configure itself from, or None."""
  if running_in_cloud_tpu_vm():
    return 'Cloud TPU'
  if all(v in os.environ for v in _SLURM_STEP) and int(os.environ['SLURM_NTASKS']) > 1:
    return 'Slurm'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and int(os.environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1:
    return 'Open MPI'
  return None


def _env_ints(name: str, default: list[int] | None) -> list[int] | None:
  """A comma-separated list of integers from the environment variable `name`."""
  value = os.environ.get(name, '').strip()
  if not value:
    return default
  try:
    return [int(v) for v in value.split(',')]
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer (or a comma-separated list of them, '
                     f'for {ENV_LOCAL_DEVICE_IDS}).') from None


def initialize(coordinator_address: str = '', num_processes: int = 0,
               process_id: int = -1) -> str:
  """Starts jax.distributed when this is one process of several; returns how the run is set up.

  Empty arguments fall back to the CLAVER_* environment variables, then to auto-detection.
  Returns 'single process', 'explicit' or the detected environment ('Cloud TPU', 'Slurm', ...).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, '')
  num_processes = num_processes or _env_ints(ENV_NUM_PROCESSES, [0])[0]
  process_id = process_id if process_id >= 0 else _env_ints(ENV_PROCESS_ID, [-1])[0]
  local_device_ids = _env_ints(ENV_LOCAL_DEVICE_IDS, None)
  explicit = {'--coordinator_address': bool(coordinator_address),
              '--num_processes': num_processes > 0, '--process_id': process_id >= 0}
  if any(explicit.values()):
    if not all(explicit.values()):
      missing = ', '.join(k for k, given in explicit.items() if not given)
      raise ValueError(f'Multi-process runs need all of --coordinator_address, --num_processes '
                       f'and --process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, '
                       f'{ENV_PROCESS_ID}); missing: {missing}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes}).')
    how = 'explicit'
  else:
    how = detected_cluster()
    if how is None:
      return 'single process'
  # CPU devices talk to other processes through gloo (it must be chosen before the CPU backend
  # starts); TPU and GPU collectives do not use it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address or None, num_processes or None,
                             process_id if process_id >= 0 else None,
                             local_device_ids=local_device_ids)
  return how


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name`; nothing in a one-process run."""
  if is_multiprocess():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False,
                     versioned: bool = False) -> Iterator[Path]:
  """`fileio.atomic_directory` for a directory that every process writes into together (an orbax
  save of sharded arrays). Every process must enter it; all yield the same new directory (on a
  file system they share), each fsyncs it once written, and process 0 puts it in place once
  every process is done (a rename, or with `versioned` a new version behind the `out` symlink).
  In a one-process run it is fileio.atomic_directory."""
  from claver_jax import fileio
  if not is_multiprocess():
    with fileio.atomic_directory(out, overwrite=overwrite, versioned=versioned) as new:
      yield new
    return
  out = fileio.run_path(out)
  versioned = versioned or fileio.is_remote(out)     # Object stores: see fileio.
  if out.exists() and not overwrite:     # The same answer on every process: no one waits.
    raise FileExistsError(f'{out} already exists; choose another output path or pass --overwrite.')
  lead = jax.process_index() == 0
  if versioned:                          # Process 0's number, so that all write to one place.
    from jax.experimental import multihost_utils
    number = int(multihost_utils.broadcast_one_to_all(
        np.int32(fileio.next_version(out) if lead else 0)))
    new = fileio.versions_dir(out) / fileio.version_name(number)
  else:
    new = out.parent / f'.{out.name}.tmp-multiprocess'
  if lead:
    fileio.remove_tree(new)                       # Left by a run that died while writing.
    new.mkdir(parents=True)
  barrier(f'atomic_directory_start:{out}')
  yield new
  fileio.fsync_tree(new)                 # Each process flushes what it wrote.
  barrier(f'atomic_directory_written:{out}')
  if lead:
    if versioned:
      fileio.publish_version(new, out)
    else:
      fileio.replace_directory(new, out)
  barrier(f'atomic_directory_done:{out}')


def device_put_identical(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)` for values that are the same on every process (one seed's
  initialisation, one file's weights) onto global shardings.

  Each process transfers only the shards of its own devices. jax.device_put would first
  all-gather every array from every process to check that they agree: on a pod that is the whole
  model and optimizer state through the network, and 0.05 s per array even on one CPU here.
  """
  if not is_multiprocess():
    return jax.device_put(tree, shardings)
  host = jax.device_get(tree)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: x[index]),
      host, shardings)


class StopRequest:
  """SIGTERM -> every process stops at the same point (saves, exits 0, resumes later).

  `stop(step)` is called after every train step, from start_step + 1 on, on every process;
  `stop()` (no step) between evaluation batches. In a one-process run a Python handler sets a
  flag that both read, so a SIGTERM stops an evaluation at its next batch. With jax.distributed
  running, JAX's preemption service owns SIGTERM: the process that gets it tells the
  coordination service, the processes agree on the first step none of them has finished, and
  `stop(step)` is True at that step on every process, so they save the same checkpoint. Its sync
  points are numbered by train step, as orbax's CheckpointManager numbers its own calls (the two
  share one counter per process), so the checks between evaluation batches cannot be sync points:
  a multi-process run stops after the evaluation, at that step. Each call is a local check: no
  device work and no network round trip. Create it just before the loop and `close()` it after.
  """

  def __init__(self, start_step: int):
    self.distributed = jax.distributed.is_initialized()
    self.signal: int | None = None
    self._previous: Any = None
    if self.distributed:
      from jax.experimental import multihost_utils
      # Where this run starts: a notice during the first step's compilation then stops after
      # step start_step + 1. (A notice before this point, e.g. while restoring, is missed.)
      multihost_utils.reached_preemption_sync_point(start_step)
    else:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal = signum

  def __call__(self, step: int | None = None) -> bool:
    if self.distributed and self.signal is None and step is not None:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = signal.SIGTERM
    return self.signal is not None

  def close(self) -> None:
    if not self.distributed:
      signal.signal(signal.SIGTERM, self._previous)
