"""The README's commands are the ones CI runs, and the dependencies are bounded and pinned.

That the installed environment matches the pins (torch 2.13.0, no torchvision) is checked by
.ci/check_environment.py, which CI runs between the install and the tests."""

from __future__ import annotations

import configparser
import importlib.util

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO

TEST_COMMAND = ("pip install -e '.[test,tpu]' -c constraints.txt && "
                'python .ci/check_environment.py && pytest -q')
DEMO_COMMAND = ('pip install -e . -c constraints.txt && python -m claver_jax.main '
                '--config=configs/demo.py --workdir=/tmp/claver_demo')

_spec = importlib.util.spec_from_file_location('check_environment',
                                               REPO / '.ci' / 'check_environment.py')
check_environment = importlib.util.module_from_spec(_spec)   # Its pins(): constraints.txt.
_spec.loader.exec_module(check_environment)


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


def requirements(section: str, key: str) -> dict[str, Requirement]:
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  parsed = [Requirement(line) for line in cfg[section][key].splitlines() if line.strip()]
  return {canonicalize_name(r.name): r for r in parsed}


def test_every_dependency_is_bounded_and_pinned_as_tested():
  """Each dependency has a lower bound and an upper bound below the next major (next minor for
  0.x) release; constraints.txt pins it at its lower bound, the version the tests run with; CI
  and the README install with those pins; Python >= 3.11. (What is installed:
  .ci/check_environment.py.)"""
  cfg = configparser.ConfigParser()
  cfg.read(REPO / 'setup.cfg')
  assert cfg['options']['python_requires'] == '>=3.11'
  install = requirements('options', 'install_requires')
  test = requirements('options.extras_require', 'test')
  assert set(install) >= {canonicalize_name(n) for n in (
      'jax', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets',
      'ml_collections', 'absl-py', 'chex', 'transformers', 'safetensors', 'av', 'numpy',
      'Pillow', 'tensorboardX', 'tqdm', 'matplotlib', 'etils')}
  assert not any('torch' in name for name in install), 'torch is a test-only dependency'
  assert str(test.pop('torch').specifier) == '==2.13.0'
  pins = check_environment.pins()
  for name, req in {**install, **test}.items():
    lower = [s for s in req.specifier if s.operator == '>=']
    upper = [s for s in req.specifier if s.operator == '<']
    assert len(lower) == 1 and len(upper) == 1, f'{name}: {req.specifier} needs >= and <'
    low, high = Version(lower[0].version), Version(upper[0].version)
    next_break = (Version(f'0.{low.minor + 1}') if low.major == 0 else Version(f'{low.major + 1}'))
    assert high <= next_break, f'{name}: {req.specifier} allows the next major release'
    assert pins.get(name) == low, f'{name}: constraints.txt pins {pins.get(name)}, not {low}'
  assert pins['transformers'].major >= 5                     # CLIPTokenizer(vocab=)
  assert pins['torch'] == Version('2.13.0')
  assert 'epath-gcs' in test['etils'].extras                  # the gs:// tests run in CI
  assert 'epath-gcs' in requirements('options.extras_require', 'tpu')['etils'].extras


def test_the_environment_check_names_a_cuda_pulling_package(tmp_path):
  """.ci/check_environment.py (CI, between the install and the tests) fails on torchvision."""
  import os
  import subprocess
  import sys
  info = tmp_path / 'torchvision-0.28.0.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n')
  proc = subprocess.run([sys.executable, str(REPO / '.ci' / 'check_environment.py')],
                        env={**os.environ, 'PYTHONPATH': str(tmp_path)}, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 1
  assert 'error: torchvision is installed: it pulls a CUDA torch' in proc.stderr, proc.stderr
