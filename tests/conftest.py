"""Shared fixtures: one tiny random HF CLIP, its reference outputs, and its CLI conversion."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO.parent / 'shared' / 'reference'
CLIP_BPE = SHARED_REFERENCE / 'clip_bpe' / 'bpe_simple_vocab_16e6.txt.gz'

# libtpu (the `tpu` extra, which CI installs) describes TPU slices for compiling without one.
requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for")

requires_clip_bpe = pytest.mark.skipif(
    not CLIP_BPE.is_file(),
    reason=f'OpenAI\'s CLIP BPE vocabulary is not at {CLIP_BPE} (../shared/reference is absent)')


# With libtpu installed, a process that starts JAX's backends without JAX_PLATFORMS probes for
# TPU chips and prints libtpu's warnings; every test, and every process it starts, runs on the CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_configure(config):
  """One JAX compilation cache for the session, inherited by every process the tests start: the
  tests run the CLI on the same tiny configs many times, and compiling dominates each run (a
  tiny run compiles about 100 programs, most of them the model's eager initialisation, each
  under the cache's default threshold of 1 s, hence the threshold 0)."""
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    directory = tempfile.mkdtemp(prefix='claver_jax_test_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))


def run_cli(module: str, *args: str, check: bool = True,
            argv: list[str] | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` as a user would (or `python *argv`); returns the process."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  command = [sys.executable, *(argv if argv is not None else ['-m', module, *args])]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'{command[1:]} exited {proc.returncode}:\n{proc.stderr[-4000:]}')
  return proc


@pytest.fixture(scope='session')
def tiny_clip(tmp_path_factory):
  """A random HF CLIPModel saved as an HF directory, inputs, and its PyTorch outputs."""
  import torch_clip
  model = torch_clip.tiny_hf_clip(seed=0)
  hf_dir = tmp_path_factory.mktemp('hf_clip')
  model.save_pretrained(hf_dir)
  images, tokens = torch_clip.random_inputs(seed=0)
  return dict(model=model, hf_dir=hf_dir, images=images, tokens=tokens,
              expected=torch_clip.hf_outputs(model, images, tokens))


@pytest.fixture(scope='session')
def converted_hf(tiny_clip, tmp_path_factory):
  """The tiny HF CLIP converted through the CLI."""
  out = tmp_path_factory.mktemp('converted') / 'hf_clip_flax'
  run_cli('convert.clip_to_flax', f'--src={tiny_clip["hf_dir"]}', f'--out={out}')
  return out
