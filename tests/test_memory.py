"""The memory analysis of the compiled train step (claver_jax.memory), on the tiny config."""

from __future__ import annotations

import pytest

import tiny_config
from claver_jax import memory
from conftest import requires_libtpu, run_cli


@pytest.mark.slow
def test_step_memory_grows_by_the_clips_and_fits_by_the_budget():
  config = tiny_config.get_config()
  config.text.prompts = 'hmdb51'                            # 51 classes
  one, two = (memory.micro_batch_memory(config, n, num_devices=1) for n in (1, 2))
  clip_bytes = config.data.num_frames * config.data.image_size ** 2 * 3 + 4   # uint8 video, label
  assert two.arguments - one.arguments == clip_bytes
  assert two.temporaries > one.temporaries > 0
  per_clip = two.peak - one.peak
  assert memory.clips_that_fit(one, two, one.peak - 1) == 0
  assert memory.clips_that_fit(one, two, one.peak) == 1
  assert memory.clips_that_fit(one, two, one.peak + 3 * per_clip) == 4


@pytest.mark.slow
def test_cli_on_simulated_devices():
  proc = run_cli('claver_jax.memory', '--config=tests/tiny_config.py',
                 '--config.text.prompts=hmdb51', '--devices=2')
  assert 'on 2 simulated cpu devices' in proc.stdout
  assert 'batch 8 x accumulation 1 on 2 devices' in proc.stdout
  assert '80 GB GPU: fits' in proc.stdout


@pytest.mark.slow
def test_cli_takes_the_class_count_of_a_config_without_prompts():
  """X-CLIP's presets have no prompt set (the class name alone): --num_classes counts them, and
  without it the error says so."""
  args = ('claver_jax.memory', '--config=tests/tiny_config.py', '--config.model.name=xclip',
          '--config.text.templates={}', '--devices=2')
  failed = run_cli(*args, check=False)
  assert failed.returncode != 0 and 'pass --num_classes' in failed.stderr
  proc = run_cli(*args, '--num_classes=400')
  assert 'batch 8 x accumulation 1 on 2 devices' in proc.stdout
  assert '80 GB GPU: fits' in proc.stdout


@requires_libtpu
@pytest.mark.slow
def test_cli_compiles_for_a_multi_host_tpu_slice():
  """CI's topology compile: the tiny config's real train step for TPU v5e 4x4 (16 chips on 4
  hosts, whose rows of a batch interleave) by XLA's TPU compiler, with the splash kernel, after
  the run's start-up checks, which reject a batch the slice cannot split."""
  args = ('claver_jax.memory', '--config=tests/tiny_config.py', '--config.text.prompts=hmdb51',
          '--topology=v5e:4x4', '--config.model.attention=chunked')
  failed = run_cli(*args, check=False)
  assert failed.returncode != 0
  assert failed.stderr.strip().splitlines()[-1] == (
      'error: config.train.batch_size=8 must divide by the 16 devices x grad_accum_steps=1.')
  proc = run_cli(*args, '--config.train.batch_size=32', '--config.eval.batch_size=16')
  assert '(16 TPU v5 lite chips, 4 hosts) by the TPU compiler' in proc.stdout
  assert 'batch 32 x accumulation 1 on 16 devices' in proc.stdout
  assert 'kmt attention over 4 frames x 5 tokens (4 heads of 16, float32): splash' in proc.stdout
  assert '16 GiB v5e chip: fits' in proc.stdout
