"""The benchmarks run end to end and print their ratio lines (their figures are not tested)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_model_speed_runs_at_a_tiny_size():
  out = run_cli('benchmarks.model_speed', '--arch=tiny', '--rounds=1', '--train_rounds=1').stdout
  counts = re.search(r'trainable parameters: ours ([\d,]+), torch ([\d,]+)', out)
  assert counts and counts.group(1) == counts.group(2), out
  diff = float(re.search(r'max \|video embedding ours - torch\| = (\S+)', out).group(1))
  assert diff < 1e-5, out
  last = out.strip().splitlines()[-3:]
  for line, name in zip(last, ['inference ours/torch speed', 'train ours/torch speed',
                               'vit forward / matmul peak']):
    assert re.fullmatch(rf'{re.escape(name)}: \d+\.\d\d', line), last


def test_model_speed_full_length_texts_leave_nothing_to_cut():
  # --text_lengths=full: every text needs all 77 positions, so our step encodes what the
  # reference encodes; the default spreads the lengths over 8..77.
  import importlib.util

  import numpy as np

  from claver_jax.models.clip import CLIPConfig, needed_context, pool_index
  # By path: `pytest` (unlike `python -m pytest`) does not put the repository on sys.path.
  spec = importlib.util.spec_from_file_location('model_speed', REPO / 'benchmarks' / 'model_speed.py')
  model_speed = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(model_speed)
  random_tokens = model_speed.random_tokens
  cfg = CLIPConfig(vocab_size=1000, eos_token_id=999)
  full = random_tokens(np.random.default_rng(0), 100, 77, 1000, full=True)
  assert needed_context(full, cfg) == 77
  assert set((pool_index(full, cfg) + 1).tolist()) == {77}
  mixed = random_tokens(np.random.default_rng(0), 100, 77, 1000)
  lengths = pool_index(mixed, cfg) + 1
  assert lengths.min() >= 8 and lengths.max() <= 77 and len(set(lengths.tolist())) > 20


@pytest.mark.slow
def test_input_pipeline_measure_reads_mp4s_and_a_prepared_dataset():
  import importlib.util
  spec = importlib.util.spec_from_file_location('input_pipeline',
                                                REPO / 'benchmarks' / 'input_pipeline.py')
  input_pipeline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(input_pipeline)
  rates = input_pipeline.measure(seconds=1, fps=8, num_videos=3, batches=1, workers=(0,))
  assert set(rates) == {'bare_decode', 'mp4/0', 'prepared/0'} and min(rates.values()) > 0
  # 8 x H100 at 40% MFU on K400 B/16 8f (3 x 402 GFLOPs per clip).
  assert round(input_pipeline.clips_per_second_needed(8 * 989e12)) == 2624
@pytest.mark.slow
def test_accelerator_smoke_dry_run_on_the_cpu():
  """`--quick` at toy sizes: one PASS line per check, the train step's figures included."""
  proc = run_cli('benchmarks.accelerator_smoke', '--quick', '--steps=2')
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  assert [line.split()[1:3] for line in lines] == [
      [name, 'PASS'] for name in ('environment', 'attention_t8', 'attention_t32', 'train_step',
                                  'input_pipeline')], proc.stdout
  assert 'backend=cpu' in lines[0]
  assert "eval_kernel='portable chunked kernel'" in lines[1] and 'eval_rel_err=' in lines[1]
  train = dict(re.findall(r"(\w+)=('[^']*'|\S+)", lines[3]))
  assert float(train['loop_tflop_added']) > 0 and float(train['clips_per_s']) > 0
  assert re.search(r'^5 of 5 checks passed in \d+ s$', proc.stdout, re.M), proc.stdout


def test_a_failed_smoke_check_prints_fail_and_the_others_go_on(capsys):
  import importlib.util
  spec = importlib.util.spec_from_file_location('smoke', REPO / 'benchmarks' / 'accelerator_smoke.py')
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)

  def broken():
    raise RuntimeError('cuDNN said no\nsecond line')

  assert smoke.run('attention_t8', broken) is False
  assert smoke.run('environment', lambda: smoke.result('environment', True, x=1)) is True
  out = capsys.readouterr().out.splitlines()
  assert out == ["RESULT attention_t8 FAIL error='RuntimeError: cuDNN said no'",
                 'RESULT environment PASS x=1']
