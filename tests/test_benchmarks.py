"""The benchmarks run end to end and print their ratio lines (their figures are not tested)."""

from __future__ import annotations

import re

from conftest import run_cli


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
