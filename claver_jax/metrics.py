"""What a run reports: WORKDIR/metrics.jsonl, TensorBoard event files, and a progress bar.

metrics.jsonl holds one JSON object per line, each with `step`. Keys: train/loss, train/lr,
train/clips_per_s, val/top1, val/top5 (percent), data/*_substituted. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax

from claver_jax.fileio import atomic_write_text


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl and writes TensorBoard scalars into WORKDIR."""

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / 'metrics.jsonl'
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():  # A resumed run repeats the steps after its checkpoint: drop them.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get('step', 0) <= resume_step]
      atomic_write_text(self.path, ''.join(line + '\n' for line in kept))
    self._file = open(self.path, 'a', encoding='utf-8')
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(Path(workdir)), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    self._file.write(json.dumps({'step': int(step), **values}) + '\n')
    self._file.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(value: Any) -> Any:
  """Device and numpy scalars -> Python numbers, for JSON."""
  try:
    return value.item()
  except AttributeError:
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl."""
  path = Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, *, disable: bool = False):
  """A tqdm bar over steps; the caller sets its postfix (loss, lr, clips/s)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, smoothing=0.1,
              disable=disable or jax.process_index() != 0)
