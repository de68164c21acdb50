"""Writes that never leave a half-written result where a finished one is expected."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary directory beside `out`; renames it to `out` on success.

  On any exception the temporary directory is removed and `out` is untouched. An existing `out`
  is an error unless `overwrite`, in which case it is replaced only once the new one is complete.
  """
  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f'{out} already exists; choose another output path or pass --overwrite.')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    yield tmp
    replace_directory(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def replace_directory(new: Path, out: Path) -> None:
  """Renames the complete directory `new` to `out`, replacing an existing `out` only then."""
  if out.exists():
    old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old)
  else:
    os.replace(new, out)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
