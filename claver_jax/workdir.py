"""A run's claim on its workdir, checked before the model is built (run.start_run):

  1. room: WORKDIR is created, and a write (1 MiB, fsynced) and its free space are checked, so a
     read-only or full file system is one error line, not a crash after an hour of setup;
  2. one run per workdir: process 0 holds an exclusive lock on WORKDIR/.lock (flock) for the whole
     run and writes its host, pid and start time in it; a second run stops at once, naming them.
     The other processes of a run learn process 0's answer (a broadcast). The lock dies with its
     process, so a run killed by SIGKILL or a lost host never blocks the next one;
  3. temporaries that killed writers left in WORKDIR are removed (fileio.sweep_stale);
  4. a resume continues the run it resumes: the keys that change what is trained
     (run_config.resume_differences) must equal those of the newest checkpoint's config, unless
     config.resume_anyway.

flock holds across the hosts of a network file system where the kernel maps it onto the server's
locks (Linux NFS clients do); on Cloud Storage FUSE (gcsfuse) and other file systems without
locks, and on paths that are not local (gs://), it holds only between processes of one host.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from claver_jax import fileio

LOCK_NAME = '.lock'
PROBE_BYTES = 1 << 20
MIN_FREE_BYTES = 64 << 20       # Less than this free in WORKDIR is an error before anything runs.


class WorkdirError(RuntimeError):
  """A workdir this run cannot use; the message says why and what to do."""


class WorkdirLock:
  """The exclusive lock on WORKDIR/.lock while this object lives (or until `release`)."""

  def __init__(self, workdir: Path):
    self._fd: int | None = None
    self.path = workdir / LOCK_NAME
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
        logging.warning('%s cannot be locked on this file system (%s): one run at a time on '
                        'this workdir is up to you.', self.path, e.strerror)
      else:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise WorkdirError(f'Cannot lock {self.path} ({e.strerror}).') from e
        raise WorkdirError(f'{workdir} is in use by another run ({holder(self.path)}): two '
                           'runs on one workdir destroy each other\'s checkpoints. Wait for it, '
                           'stop it, or use another --workdir.') from None
    self._fd = fd
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                             'started': datetime.datetime.now().isoformat(timespec='seconds')
                             }).encode() + b'\n')

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)               # Closing the descriptor releases the flock.
      self._fd = None

  def __del__(self):
    self.release()


def holder(lock_path: Path) -> str:
  """Who holds the lock, from what it wrote in the file."""
  try:
    info = json.loads(lock_path.read_text())
    return f'host {info["host"]}, pid {info["pid"]}, started {info["started"]}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'a process that has not written its name yet'


def check_room(workdir: Path) -> None:
  """Creates `workdir` and checks that it takes a fsynced write and has MIN_FREE_BYTES free."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=fileio.temp_prefix(workdir / 'write-probe'), dir=workdir)
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(b'\0' * PROBE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    finally:
      os.unlink(probe)
  except OSError as e:
    raise WorkdirError(f'Cannot write to {workdir} ({e.strerror or e}): use a writable --workdir '
                       'with free space.') from e
  stats = os.statvfs(workdir)
  free = stats.f_bavail * stats.f_frsize
  if free < MIN_FREE_BYTES:
    raise WorkdirError(f'{workdir} has {free / 2**20:.0f} MiB free, less than the '
                       f'{MIN_FREE_BYTES >> 20} MiB a run needs before its first checkpoint: '
                       'free some space or use another --workdir.')


def saved_config(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
  """(step, config) of the newest checkpoint in WORKDIR/checkpoints whose config reads; None
  without one. `workdir` may be any etils.epath path (gs://...)."""
  from etils import epath
  directory = epath.Path(workdir) / 'checkpoints'
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                 reverse=True) if directory.is_dir() else []
  for step in steps:
    try:
      return step, json.loads((directory / str(step) / 'config' / 'metadata').read_text())
    except (OSError, ValueError):
      continue
  return None


def claim_workdir(workdir: str | os.PathLike, config: Any) -> WorkdirLock | None:
  """The start-up checks of the module docstring, on process 0; every process raises
  WorkdirError if one fails. Returns process 0's lock (None on the others); keep it for the run
  and `release` it at the end."""
  import jax
  from claver_jax import distributed
  from claver_jax.run_config import resume_differences
  lock, error = None, ''
  local = '://' not in str(workdir)
  if jax.process_index() == 0:
    try:
      if local:
        check_room(Path(workdir))
        lock = WorkdirLock(Path(workdir))
        for root, dirs, _ in os.walk(workdir):
          dirs[:] = [d for d in dirs if d not in ('checkpoints', '.model.versions')]
          fileio.sweep_stale(root)
      else:
        logging.warning('%s is not a local path: it is not locked (one run at a time is up to '
                        'you) and its room is not checked.', workdir)
      saved = saved_config(workdir)
      if saved is not None:
        differences = resume_differences(saved[1], config)
        if differences and not config.resume_anyway:
          raise WorkdirError(
              f'{workdir} holds a run trained with another config (step {saved[0]}): '
              + '; '.join(differences[:8]) + ('; ...' if len(differences) > 8 else '')
              + '. Resuming would mix two trainings: use another --workdir, or pass '
              '--config.resume_anyway=True to continue anyway.')
        if differences:
          logging.warning('Resuming %s under another config (config.resume_anyway): %s',
                          workdir, '; '.join(differences))
    except WorkdirError as e:
      error = str(e)
      if lock is not None:
        lock.release()
  if distributed.is_multiprocess():
    from jax.experimental import multihost_utils
    import numpy as np
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(error))))
    if failed and not error:
      error = f'process 0 cannot use {workdir}; its error says why.'
  if error:
    raise WorkdirError(error)
  return lock
