"""What a run reports: WORKDIR/metrics.jsonl, TensorBoard event files, and a progress bar.

metrics.jsonl holds one JSON object per line, each with `step`, `time` (the wall clock when it was
written, Unix seconds) and, in a run that trains, `epoch` (step / steps per epoch). Keys:
train/loss, train/lr, train/clips_per_s, train/step_s (wall time per step) and data/wait_s (the
time per step the loop waited for the input pipeline; near train/step_s means input-bound), each
averaged over the steps since the row before; data/train_substituted (a running total); each
evaluation's row has PREFIX/top1, PREFIX/top5, PREFIX/mean_class_acc (percent),
PREFIX/num_videos, `views` ('4x3') and data/eval_substituted (that evaluation's), PREFIX being
`val` (training's periodic evaluations), `test` (the multi-view test at the end of training) or
`eval` (a config.mode=eval run; claver_jax.evaluate.eval_row). TensorBoard gets the numbers under
the same names, the run's config as text and hparams (`write_config`) and the report figures as
images (`write_figures`). Only process 0 writes, one whole line per write() call on an O_APPEND
file (no buffer to flush). A run killed during a write
can leave a torn last line: reading drops it with a warning; a bad line anywhere else is an error
naming the file and line.

On a gs:// workdir, where an object cannot be appended to, metrics.jsonl is rewritten whole (one
upload, which appears complete or not at all) and the TensorBoard event files, written to a local
folder, are uploaded beside it: at most every SYNC_SECONDS, after every evaluation, and at close.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from claver_jax.fileio import atomic_write_text, is_remote, run_path, upload_tree

SYNC_SECONDS = 10.0


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl and writes TensorBoard scalars into WORKDIR."""

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0,
               steps_per_epoch: int | None = None):
    self.enabled = jax.process_index() == 0
    self.steps_per_epoch = steps_per_epoch
    self.path = run_path(workdir) / 'metrics.jsonl'
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = is_remote(self.path)
    kept = []
    if self.path.exists():  # A resumed run repeats the steps after its checkpoint: drop them.
      kept = [row for row in read_rows(self.path) if row.get('step', 0) <= resume_step]
      atomic_write_text(self.path, ''.join(json.dumps(row) + '\n' for row in kept))
    if self._remote:
      self._text = ''.join(json.dumps(row) + '\n' for row in kept)
      self._events, self._synced = Path(tempfile.mkdtemp(prefix='claver_events-')), 0.0
    else:
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      self._events = self.path.parent
    self._tb = _summary_writer()(str(self._events),
                                 purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    row = {'step': int(step), 'time': round(time.time(), 3)}
    if self.steps_per_epoch:
      row['epoch'] = round(step / self.steps_per_epoch, 4)
    line = json.dumps({**row, **values}) + '\n'
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()
    if self._remote:
      self._text += line
      self._sync(force='views' in values)    # after each evaluation
    else:
      os.write(self._fd, line.encode('utf-8'))

  def _sync(self, force: bool = False) -> None:
    """Uploads metrics.jsonl whole and the event files (remote workdirs)."""
    if force or time.monotonic() - self._synced >= SYNC_SECONDS:
      self.path.write_text(self._text)
      upload_tree(self._events, self.path.parent)
      self._synced = time.monotonic()

  def write_figures(self, step: int, figures: Mapping[str, Any]) -> None:
    """matplotlib figures -> TensorBoard images, tag -> figure."""
    if not self.enabled:
      return
    from claver_jax import plots
    for tag, figure in figures.items():
      self._tb.add_image(tag, plots.to_rgb(figure), int(step), dataformats='HWC')
    self._tb.flush()

  def write_config(self, config: Mapping[str, Any], hparams: Mapping[str, Any],
                   metric_tags: Sequence[str]) -> None:
    """The run's config (a nested dict) as TensorBoard text, and `hparams` (flat, str / number /
    bool values) as this run's hparams session, compared on `metric_tags`."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summary
    text = json.dumps(config, indent=2, default=str)
    self._tb.add_text('config', '\n'.join('    ' + line for line in text.splitlines()), 0)
    experiment, session_start, _ = hparams_summary(dict(hparams), {t: None for t in metric_tags})
    self._tb.file_writer.add_summary(experiment)
    self._tb.file_writer.add_summary(session_start)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      if self._remote:
        self._sync(force=True)
        shutil.rmtree(self._events, ignore_errors=True)
      else:
        os.close(self._fd)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed, only to accept torch tensors (about 1.5 s of every run's start-up); the loop writes
  Python numbers."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None      # `import torch` raises ImportError while tensorboardX loads.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def _plain(value: Any) -> Any:
  """Device and numpy scalars -> Python numbers, for JSON."""
  try:
    return value.item()
  except AttributeError:
    return value


class MetricsFileError(ValueError):
  """A line of metrics.jsonl that is not a JSON object, other than a torn last line."""


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL file, one per line; blank lines skipped. A last line without its
  newline that does not parse (a write cut short) is dropped with a warning; any other bad line
  raises MetricsFileError naming the file and line."""
  path = run_path(path)
  text = path.read_bytes().decode('utf-8')
  lines = text.split('\n')
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):          # No newline after it: the write was cut short.
        logging.warning('%s:%d: dropped a torn last line (a write cut short): %.80r', path,
                        number, line)
        continue
      raise MetricsFileError(f'{path}:{number}: not a JSON line ({e.msg}: {line[:80]!r}). Fix or '
                             'delete that line; only a torn last line is dropped by itself.') from e
    if not isinstance(row, dict):
      raise MetricsFileError(f'{path}:{number}: expected a JSON object, got {line[:80]!r}.')
    rows.append(row)
  return rows


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl (see read_rows)."""
  return read_rows(run_path(workdir) / 'metrics.jsonl')


def progress_bar(total: int, initial: int, *, disable: bool = False):
  """A tqdm bar over steps; the caller sets its postfix (loss, lr, clips/s)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, smoothing=0.1,
              disable=disable or jax.process_index() != 0)
