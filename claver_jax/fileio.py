"""Writes that never leave a half-written result where a finished one is expected.

Two ways to put a directory in place:
  * `atomic_directory(out)`: written beside `out`, fsynced, renamed to `out`. Replacing an
    existing `out` swaps the two in one step (renameat2 RENAME_EXCHANGE) where the file system
    allows, else with two renames.
  * `atomic_directory(out, versioned=True)` (WORKDIR/model): `out` is a symlink to one of the
    complete versions in `.<out>.versions/`. A new version is written and fsynced there, then
    the link is replaced by a rename: at every instant `out` is a complete directory. The
    version before stays until the next one, so a reader who resolved the link keeps reading.
`atomic_write_text(path, text)` does the same for one file.

Temporaries are named `.<name>.tmp-<host>-<pid>-<random>` beside the output; one left by a killed
process (on this host, its pid no longer running) is removed when the same output is written
again, or by `sweep_stale` (train sweeps its workdir at start). Outputs get the permissions of
any file the user creates (0666/0777 less the umask), not tempfile's private 0600/0700: on a
shared workdir, `umask 002` shares them with the group, `umask 077` keeps them private.

Run paths (`run_path`) are local paths or gs://BUCKET/PATH (etils.epath; the `tpu` extra
installs gcsfs). Cloud Storage has whole objects and no rename, links or directories, so there:
  * a file is written as one object upload, which appears complete or not at all
    (`atomic_write_text`);
  * every atomic directory is versioned: the new version is written under `.<out>.versions/vN/`,
    then published by one object write, `<out>/LINK`, whose text names it (as a symlink would);
    readers follow it (`resolve_link`: model directories, prepared datasets). A version cut
    short is never linked and is deleted by the next publish;
  * orbax writes checkpoints in place and marks them complete with a commit file.

`drained_event_loops()` wraps orbax restores: one that fails leaves no reads running behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from etils import epath

REMOTE_SCHEMES = ('gs',)     # Written by epath (gcsfs), orbax (TensorStore) and array_record.
LINK = 'LINK'                # On object stores: <out>/LINK names the current version of <out>.


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (gs://...), False for a local path."""
  return re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', os.fspath(path)) is not None


def run_path(path: str | os.PathLike) -> Any:
  """A run path: a local path made absolute (a pathlib.Path: links, fsync and renames need the
  OS), or gs://BUCKET/PATH as an epath.Path. Any other URL scheme is a ValueError in one line."""
  if isinstance(path, epath.Path) and is_remote(path):
    return path
  text = os.fspath(path)
  if text.startswith('file://'):
    text = text[len('file://'):]
  if not is_remote(text):
    return Path(text).absolute()
  scheme = text.split('://', 1)[0].lower()
  if scheme not in REMOTE_SCHEMES:
    raise ValueError(f'{text}: {scheme}:// paths cannot be written here (orbax checkpoints and '
                     'array_record datasets write to local paths and gs:// only); use '
                     'gs://BUCKET/PATH, a local path, or the bucket mounted as a folder.')
  try:
    import gcsfs  # noqa: F401  (epath's gs:// backend without TensorFlow.)
  except ImportError as e:
    raise ValueError(f'{text}: gs:// paths need gcsfs: pip install "claver_jax[tpu]" (or '
                     'gcsfs).') from e
  return epath.Path(text)


def resolve_link(path: Any) -> Any:
  """The version a remote `<path>/LINK` names (see the module docstring); `path` otherwise (a
  local link is followed by the OS)."""
  if not is_remote(path):
    return path
  link = path / LINK
  return path.parent / link.read_text().strip() if link.is_file() else path

_TEMP = re.compile(r'^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}$')


def umask() -> int:
  """The process's umask, read without changing it where Linux allows (/proc)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def temp_prefix(out: Path) -> str:
  """The name prefix of `out`'s temporaries: `.<name>.tmp-<host>-<pid>-`."""
  return f'.{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-'


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:          # Another user's process.
    return True
  return True


def sweep_stale(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
  """Removes the temporaries in `directory` (of the output `name`, or of any) that a killed
  process left: written on this host by a pid that no longer runs. Another host's are kept (its
  processes cannot be checked from here). Returns what was removed."""
  directory = Path(directory)
  try:
    entries = list(directory.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []
  removed, host = [], socket.gethostname()
  for entry in entries:
    match = _TEMP.match(entry.name)
    if (match and (name is None or match['name'] == name) and match['host'] == host
        and int(match['pid']) != os.getpid() and not _running(int(match['pid']))):
      with contextlib.suppress(FileNotFoundError):
        _remove(entry)
      removed.append(entry)
  if removed:
    logging.info('Removed %d temporaries left by killed processes in %s: %s', len(removed),
                 directory, [p.name for p in removed[:5]])
  return removed


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False,
                     versioned: bool = False) -> Iterator[Any]:
  """Yields a fresh directory to write; on success it is fsynced and becomes `out`.

  On any exception the new directory is removed and `out` is untouched. An existing `out` is an
  error unless `overwrite`, in which case it is replaced only once the new one is complete.
  `versioned`: see the module docstring (a remote `out` is always versioned).
  """
  out = run_path(out)
  versioned = versioned or is_remote(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f'{out} already exists; choose another output path or pass --overwrite.')
  out.parent.mkdir(parents=True, exist_ok=True)
  if versioned:
    new = versions_dir(out) / version_name(next_version(out))
    new.mkdir(parents=True)
  else:
    sweep_stale(out.parent, out.name)
    new = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    os.chmod(new, 0o777 & ~umask())               # mkdtemp's 0700 would make `out` private.
  try:
    yield new
    fsync_tree(new)
    if versioned:
      publish_version(new, out)
    else:
      replace_directory(new, out)
  except BaseException:
    remove_tree(new)
    raise


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, overwrite: bool = False,
                     stage: str | os.PathLike) -> Iterator[Path]:
  """`atomic_directory(out)` for writers that need a local folder (array_record): for a remote
  `out`, a folder under the local `stage` whose files are uploaded into the new version once
  complete, and which is removed after."""
  if not is_remote(out):
    with atomic_directory(out, overwrite=overwrite) as new:
      yield new
    return
  Path(stage).mkdir(parents=True, exist_ok=True)
  local = Path(tempfile.mkdtemp(prefix='upload-', dir=stage))
  try:
    with atomic_directory(out, overwrite=overwrite) as new:
      yield local
      upload_tree(local, new)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def upload_tree(local: Path, remote: Any) -> None:
  """Copies every file under the local folder `local` to the same names under `remote`."""
  for root, _, files in os.walk(local):
    for name in files:
      source = Path(root) / name
      with open(source, 'rb') as f, (remote / source.relative_to(local).as_posix()).open('wb') as g:
        shutil.copyfileobj(f, g, 16 << 20)


def remove_tree(path: Any) -> None:
  """Deletes a local folder or every object under a remote prefix; nothing if absent."""
  if is_remote(path):
    with contextlib.suppress(FileNotFoundError):
      path.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
  """fsyncs every file and directory under `directory` (and it): their data is on disk before a
  rename makes them visible as the finished result. Nothing to do on an object store, where an
  object is durable once its upload returns."""
  if is_remote(directory):
    return
  for root, _, files in os.walk(directory):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError as e:           # Some file systems cannot fsync a directory.
    if e.errno not in (errno.EINVAL, errno.EBADF):
      raise
  finally:
    os.close(fd)


def exchange(a: Path, b: Path) -> bool:
  """Swaps the paths `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE). False where the
  platform or file system cannot (then nothing changed)."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
  if renameat2 is None:
    return False
  at_fdcwd, rename_exchange = -100, 2
  result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
  if result == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_directory(new: Path, out: Path) -> None:
  """Renames the complete directory `new` to `out`, replacing an existing `out` only then: in one
  step where `exchange` can, else by renaming `out` aside first."""
  if not out.exists() and not out.is_symlink():
    os.replace(new, out)
  elif exchange(new, out):
    _remove(new)                                   # `new` now names the old `out`.
  else:
    old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old)
  _fsync_dir(out.parent)


def _remove(path: Path) -> None:
  if path.is_symlink() or not path.is_dir():
    path.unlink()
  else:
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Versioned directories behind a symlink
# ---------------------------------------------------------------------------------------------
def versions_dir(out: Path) -> Path:
  """Where the versions of `out` live: `.<name>.versions/` beside it."""
  return out.parent / f'.{out.name}.versions'


def version_name(number: int) -> str:
  return f'v{number:06d}'


def next_version(out: Path) -> int:
  """One more than the highest version number of `out` so far (1 for the first)."""
  directory = versions_dir(out)
  numbers = [int(m.group(1)) for p in (directory.iterdir() if directory.is_dir() else [])
             if (m := re.fullmatch(r'v(\d+)', p.name))]
  return max(numbers, default=0) + 1


def publish_version(version: Path, out: Path) -> None:
  """Points the symlink `out` at the complete directory `version` (a directory of
  versions_dir(out)) with one rename, then deletes every version but this one and the one `out`
  showed before. An `out` that is a real directory (an older layout, or a copied workdir) is
  swapped for the link in one step where `exchange` can, else renamed aside first. On an object
  store, `out/LINK` is written instead (one object upload)."""
  if is_remote(out):
    _publish_link(version, out)
    return
  previous = out.resolve() if out.is_symlink() else None
  link = out.parent / f'.{out.name}.link-{os.getpid()}'
  with contextlib.suppress(FileNotFoundError):
    link.unlink()
  os.symlink(os.path.relpath(version, out.parent), link)
  if out.is_symlink() or not out.exists():
    os.replace(link, out)
  elif exchange(link, out):
    _remove(link)                                  # `link` now names the old `out`.
  else:
    logging.warning('%s: this file system cannot swap a directory for a link in one step; '
                    'replacing it in two (once: from now on it is a link).', out)
    aside = versions_dir(out) / f'{out.name}.replaced'
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out, aside)
    os.replace(link, out)
    shutil.rmtree(aside)
  _fsync_dir(out.parent)
  keep = {version.resolve(), previous}
  for other in versions_dir(out).iterdir():
    if other.resolve() not in keep:
      shutil.rmtree(other, ignore_errors=True)


def _publish_link(version: Any, out: Any) -> None:
  """The object-store publish_version: one upload of out/LINK naming `version`, then every other
  version but the previous one deleted. A remote `out` that is a real folder (a copy) is deleted
  first (not in one step: once)."""
  link = out / LINK
  previous = resolve_link(out) if link.is_file() else None
  if previous is None and out.exists():
    logging.warning('%s: a folder, not a link; replacing it in two steps (once: from now on it '
                    'is a link).', out)
    out.rmtree()
  link.write_text(f'{versions_dir(out).name}/{version.name}')
  keep = {str(version), str(previous)}
  for other in versions_dir(out).iterdir():
    if str(other) not in keep:
      remove_tree(other)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) as `atomic_write_bytes` does."""
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path` (on
  an object store: one upload, which appears whole or not at all)."""
  if is_remote(path):
    run_path(path).write_bytes(data)
    return
  path = Path(path)
  sweep_stale(path.parent, path.name)
  fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
  try:
    os.fchmod(fd, 0o666 & ~umask())               # mkstemp's 0600 would make `path` private.
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed, first lets its pending tasks finish, as asyncio.run does.

  orbax runs a restore's reads as tasks gathered in a fresh loop, and closes that loop as soon as
  the gather raises. The reads still pending would then complete into a closed loop: TensorStore
  reports each as an unraisable 'Event loop is closed' and asyncio its unretrieved exceptions,
  during the restore or at exit. Drained first, they complete (or fail) here, and their errors are
  collected: the restore's own error says what broke."""

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = [task for task in asyncio.all_tasks(self) if not task.done()]
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


@contextlib.contextmanager
def drained_event_loops() -> Iterator[None]:
  """Event loops made in this block drain their tasks on close: wrap orbax restores in it
  (a model directory's, a checkpoint's), so that a restore that fails leaves no reads running.
  The previous event-loop policy is back on leaving: nothing global stays changed. (Event-loop
  policies are deprecated from Python 3.14; where they are gone, this does nothing.)"""
  base = getattr(asyncio, 'DefaultEventLoopPolicy', None)
  if base is None:
    yield
    return
  draining = type('DrainingPolicy', (base,), {'new_event_loop': lambda self: _DrainingLoop()})
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(draining())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
