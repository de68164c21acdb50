"""Checks the installed environment before the tests run (CI runs it after the install).

    python .ci/check_environment.py

Every dependency of claver_jax and its test extra is installed at the version constraints.txt
pins (the lower bound setup.cfg tests); torch is exactly 2.13.0 (CPU, test-only); none of the
packages that pull a CUDA torch (torchvision, timm, open_clip_torch, torchaudio) is installed.
One line per problem, exit status 1 if there is any.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
TORCH = '2.13.0'
CUDA_PULLING = ('torchvision', 'timm', 'open_clip_torch', 'torchaudio')


def requirements() -> list[Requirement]:
  """install_requires and the test extra of setup.cfg."""
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  lines = (cfg['options']['install_requires'] + '\n' +
           cfg['options.extras_require']['test']).splitlines()
  return [Requirement(line) for line in lines if line.strip()]


def pins() -> dict[str, Version]:
  """constraints.txt: canonical name -> pinned version."""
  pinned = {}
  for line in (REPO / 'constraints.txt').read_text().splitlines():
    if line.strip() and not line.startswith('#'):
      name, version = line.split('==')
      pinned[canonicalize_name(name)] = Version(version)
  return pinned


def problems() -> list[str]:
  found, pinned = [], pins()
  for req in requirements():
    name = canonicalize_name(req.name)
    try:
      installed = Version(importlib.metadata.version(req.name))
    except importlib.metadata.PackageNotFoundError:
      found.append(f'{req.name} is not installed (setup.cfg: {req})')
      continue
    want = pinned.get(name)
    if want is None:
      found.append(f'{req.name} has no pin in constraints.txt')
    elif installed not in req.specifier or installed.release != want.release:
      found.append(f'{req.name} {installed} is installed; the tests run with {want} '
                   "(pip install -e '.[test]' -c constraints.txt)")
  if not importlib.metadata.version('torch').startswith(TORCH):
    found.append(f"torch {importlib.metadata.version('torch')} is installed, not {TORCH}")
  for name in CUDA_PULLING:
    try:
      importlib.metadata.distribution(name)
      found.append(f'{name} is installed: it pulls a CUDA torch; pip uninstall {name}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def main() -> int:
  found = problems()
  for line in found:
    print(f'error: {line}', file=sys.stderr)
  if not found:
    print(f'Environment: every dependency at its pinned version, torch {TORCH}, no '
          f'{", ".join(CUDA_PULLING)}.')
  return 1 if found else 0


if __name__ == '__main__':
  sys.exit(main())
