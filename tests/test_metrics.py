"""MetricWriter: metrics.jsonl and TensorBoard scalars, without importing torch at start-up."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO

WRITE = r'''
import json, sys
from claver_jax.metrics import MetricWriter
writer = MetricWriter(sys.argv[1])
writer.write(3, {'train/loss': 1.5, 'val/top1': 87.25})
writer.write(4, {'train/loss': 1.25})
writer.close()
loaded_torch = 'torch' in sys.modules
import torch                                  # still importable afterwards
print(json.dumps({'torch_at_start': loaded_torch, 'torch_after': torch.zeros(2).shape[0]}))
'''


def read_scalars(path) -> dict[tuple[str, int], float]:
  """(tag, step) -> value from a TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  data, offset, scalars = path.read_bytes(), 0, {}
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  return scalars


@pytest.mark.slow
def test_the_writer_writes_scalars_without_importing_torch(tmp_path):
  proc = subprocess.run([sys.executable, '-c', WRITE, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.splitlines()[-1])
  assert report == {'torch_at_start': False, 'torch_after': 2}
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  times = [row.pop('time') for row in rows]           # the wall clock of each write
  assert times == sorted(times) and abs(times[0] - time.time()) < 300
  assert rows == [{'step': 3, 'train/loss': 1.5, 'val/top1': 87.25},
                  {'step': 4, 'train/loss': 1.25}]
  (events,) = tmp_path.glob('events.out.tfevents.*')
  assert read_scalars(events) == {('train/loss', 3): 1.5, ('val/top1', 3): 87.25,
                                  ('train/loss', 4): 1.25}
