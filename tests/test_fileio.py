"""Files written as one unit: temporaries of killed writers are swept, outputs follow the umask,
the tokenizer's two files appear together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from claver_jax import fileio
from conftest import REPO


@pytest.fixture
def umask_of():
  """Sets the process umask for the test, then puts the old one back."""
  previous = os.umask(0o022)
  yield os.umask
  os.umask(previous)


@pytest.mark.parametrize('mask,file_mode,dir_mode', [(0o002, 0o664, 0o775),
                                                     (0o077, 0o600, 0o700),
                                                     (0o022, 0o644, 0o755)])
def test_outputs_get_the_umask_permissions(mask, file_mode, dir_mode, umask_of, tmp_path):
  umask_of(mask)
  assert fileio.umask() == mask
  fileio.atomic_write_text(tmp_path / 'metrics.txt', 'x')
  with fileio.atomic_directory(tmp_path / 'model') as new:
    (new / 'config.json').write_text('{}')
  assert (tmp_path / 'metrics.txt').stat().st_mode & 0o777 == file_mode
  assert (tmp_path / 'model').stat().st_mode & 0o777 == dir_mode
  assert (tmp_path / 'model' / 'config.json').stat().st_mode & 0o777 == file_mode


def killed_while_writing(tmp_path, out_name: str, directory: bool) -> None:
  """A writer SIGKILLed inside atomic_directory / atomic_write_text leaves its temporary."""
  if directory:
    write = ('with fileio.atomic_directory(out) as new:\n'
             "  (new / 'part').write_bytes(b'x' * 1000)\n"
             "  print('writing', flush=True)\n"
             '  time.sleep(60)\n')
  else:                        # Stopped just before the rename.
    write = ("os.replace = lambda *args: (print('writing', flush=True), time.sleep(60))\n"
             "fileio.atomic_write_text(out, 'text')\n")
  script = ('import os, sys, time\n'
            'from pathlib import Path\n'
            'from claver_jax import fileio\n'
            f'out = Path(sys.argv[1]) / {out_name!r}\n' + write)
  proc = subprocess.Popen([sys.executable, '-c', script, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == 'writing\n'
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.parametrize('directory', [True, False])
def test_a_killed_writers_temporary_is_swept_when_the_output_is_written_again(directory,
                                                                              tmp_path):
  killed_while_writing(tmp_path, 'out', directory)
  left = [p.name for p in tmp_path.iterdir()]
  assert len(left) == 1 and left[0].startswith(f'.out.tmp-{socket.gethostname()}-'), left
  # Another host's temporary and a running process's are not this writer's to remove.
  others = [tmp_path / '.out.tmp-otherhost-1234-abcdefgh',
            tmp_path / f'.out.tmp-{socket.gethostname()}-{os.getppid()}-abcdefgh',
            tmp_path / f'.other.tmp-{socket.gethostname()}-999999999-abcdefgh']
  for other in others:
    other.mkdir()
  if directory:
    with fileio.atomic_directory(tmp_path / 'out') as new:
      (new / 'part').write_bytes(b'y')
  else:
    fileio.atomic_write_text(tmp_path / 'out', 'text')
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['out'] + [o.name for o in others])
  assert fileio.sweep_stale(tmp_path) == [others[2]]       # Any name, when none is given.


def test_the_tokenizer_pair_is_written_together(tmp_path):
  """train's tokenizer: vocab.json and merges.txt appear in one rename; a half-written pair
  left by an older version (vocab.json alone) is written again on resume instead of stopping
  every resume."""
  import ml_collections
  from claver_jax.models.build import make_tokenizer
  config = ml_collections.ConfigDict(dict(text=dict(
      tokenizer='train', prompts='', templates='objects', aspects='', allow_missing=False,
      bare_name=True, num_merges=50)))
  workdir = tmp_path / 'run'
  tokenizer = make_tokenizer(config, workdir, ['moving left', 'moving right'])
  vocab = (workdir / 'tokenizer' / 'vocab.json').read_text()
  assert sorted(p.name for p in workdir.iterdir()) == ['tokenizer']
  (workdir / 'tokenizer' / 'merges.txt').unlink()               # as a kill between the two was
  again = make_tokenizer(config, workdir, ['moving left', 'moving right'])
  assert again.vocab == tokenizer.vocab and again.merges == tokenizer.merges
  assert (workdir / 'tokenizer' / 'vocab.json').read_text() == vocab
