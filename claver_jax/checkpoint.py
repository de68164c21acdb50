"""Run checkpoints in WORKDIR/checkpoints: model + optimizer state, data iterator, config.

Each step directory holds four items: `state` (nnx state of model and optimizer, as a pure
dict), `data` (the grain iterator's state, a count of global batches, so a resumed run sees
exactly the batches it would have seen, with any number of processes), `config` (JSON) and
`progress` (JSON: the best val/top1 so far and its step, which WORKDIR/model holds, and whether
this step's evaluation is still to do). Saves are asynchronous. The last `keep` checkpoints are
kept and, separately, the `keep_best` best by val/top1: a preservation policy, because `best_fn`
with `max_to_keep` alone can delete the latest one.

In a multi-process run every process calls save and restore with its global arrays (orbax writes
each array shard once) and its own iterator (one state file per process); WORKDIR must be a
directory all of them share (a network file system, or a bucket mounted with gcsfuse, where
a save is written in place and marked complete by a commit file instead of renamed).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from claver_jax import distributed
from claver_jax.fileio import drained_event_loops, is_remote, run_path

BEST_METRIC = 'val/top1'


def on_gcsfuse(path: Path, mounts: str = '/proc/mounts') -> bool:
  """True when `path` is on a Cloud Storage FUSE mount (as launch/tpu_pod.sh makes them)."""
  try:
    lines = Path(mounts).read_text().splitlines()
  except OSError:
    return False
  for line in lines:
    fields = line.split()
    if len(fields) > 2 and fields[2] == 'fuse.gcsfuse':
      mount_point = Path(fields[1].replace('\\040', ' '))
      if path == mount_point or mount_point in path.parents:
        return True
  return False


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or read; the message says which and what to do."""


def first_line(error: BaseException) -> str:
  """'Type: the first line of the message', without TensorStore's spec dumps, at most ~300
  characters (its start and its end, where the OS error is)."""
  text = str(error).strip().split('\n', 1)[0].split(' See full TensorStore details', 1)[0]
  text = re.sub(r"\s*\[[a-z_]+='.*?'\]", '', text)
  if len(text) > 300:
    text = f'{text[:140]} ... {text[-140:]}'
  return f'{type(error).__name__}: {text}'


def batches_read(state: dict[str, Any]) -> int:
  """How many batches the train iterator with grain state `state` has given: the state of the
  in-process iterator (num_workers 0) counts them, a multi-worker one per worker."""
  if 'next_index' in state:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(worker['next_index']) for worker in state['iterators_in_use_states'])
  raise CheckpointError(f'Unknown data iterator state {json.dumps(state)[:200]}.')


def iterator_state(template: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  """`saved` in the form of this run's iterator state `template` (its fresh get_state()): as it
  is when both come from the same num_workers, else the same count of batches in this run's
  form, so that a resume with another config.data.num_workers continues at the same batch (the
  batches do not depend on the worker count, data/pipeline.py)."""
  if set(saved) == set(template) and len(saved.get('iterators_in_use_states', ())) == len(
      template.get('iterators_in_use_states', ())):
    return saved
  batches = batches_read(saved)
  if 'next_index' in template:
    return {**template, 'next_index': batches}
  workers = len(template['iterators_in_use_states'])
  # Worker w gives batches w, w + workers, ...; the next batch comes from worker batches % workers.
  return {**template, 'next_index_in_cycle': batches % workers,
          'iterators_in_use_states': [
              {**state, 'next_index': (batches - w + workers - 1) // workers}
              for w, state in enumerate(template['iterators_in_use_states'])]}


class Checkpointer:

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, keep_best: int = 1):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(keep),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=keep_best,
                 keep_checkpoints_without_metrics=False),
    ])
    self.directory = run_path(workdir) / 'checkpoints'    # Local, or gs:// (epath).
    atomicity = None    # gs://: orbax writes in place and marks a step complete with a file.
    if not is_remote(self.directory) and on_gcsfuse(self.directory):  # A rename there copies every file: write in place instead.
      atomicity = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=True,
                                           atomicity_options=atomicity)
    self._pending: int | None = None             # The step of a save that may still run.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler(),
                       'progress': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None,
           progress: dict[str, Any] | None = None) -> None:
    """Starts an asynchronous save of `state` (a pure dict of arrays), the iterator and
    `progress` (a JSON-able dict; see the module docstring)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        progress=ocp.args.JsonSave(progress or {}))
    self.check_background_save()
    self.manager.save(step, args=args, metrics=metrics, force=True)
    self._pending = step

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `state` into the shapes and shardings of `abstract_state`, and the iterator.
    Returns (state, progress); progress is {} for a checkpoint saved without one.

    A checkpoint written by another number of processes restores too: the arrays are resharded
    onto this run's mesh, and every process's iterator continues from process 0's saved state,
    which counts global batches (every process's is the same). The global batches do not depend
    on the process count (data/pipeline.py), so the run sees the batches the interrupted one
    would have seen, given the same global batch size and num_workers.
    """
    data_dir = self.directory / str(step) / 'data'
    own_file = data_dir / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if (self.directory / str(step) / 'progress').is_dir():
      items['progress'] = ocp.args.JsonRestore()
    with drained_event_loops():
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      saved_file = own_file if own_file.is_file() else next(
          iter(sorted(data_dir.glob('process_0-of-*.json'))), None)
      if saved_file is None:
        raise FileNotFoundError(f'{data_dir} has no data iterator state (process_0-of-N.json); '
                                'the checkpoint is incomplete.')
      data_iterator.set_state(iterator_state(data_iterator.get_state(),
                                             json.loads(saved_file.read_text())))
      if saved_file != own_file:
        logging.info('Step %d was saved by %s processes and is restored by %d: the data '
                     'continues from the same global batch.', step,
                     saved_file.stem.rsplit('-of-', 1)[1], jax.process_count())
    logging.info('Restored step %d from %s.', step, self.directory)
    return restored['state'], dict(restored.get('progress') or {})

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, progress) of the newest checkpoint that restores; None without any.

    A newer checkpoint that does not restore (a truncated file, a disk error) is named in a
    warning, and once an older one has restored it is moved to WORKDIR/corrupt_checkpoints/
    (the run will save that step again). When none restores, nothing is moved: the error names
    every step and the first reason.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, progress = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # Whatever a damaged checkpoint raises (tensorstore, JSON, OS).
        reason = first_line(e)
        logging.warning('Checkpoint step %d in %s cannot be read (%s); trying the one before.',
                        step, self.directory, reason)
        failed.append((step, reason))
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
        logging.warning('Resuming from step %d: the newer checkpoint(s) %s could not be read and '
                        'were moved to %s.', step, [s for s, _ in failed], self.corrupt_directory)
      return step, state, progress
    if failed:
      raise CheckpointError(f'No checkpoint in {self.directory} can be read (steps '
                            f'{[s for s, _ in failed]}; step {failed[0][0]}: {failed[0][1]}). '
                            'Start a fresh --workdir, or restore the directory from a backup.')
    return None

  @property
  def corrupt_directory(self) -> Path:
    return self.directory.parent / 'corrupt_checkpoints'

  def _set_aside(self, steps: list[int]) -> None:
    distributed.barrier('checkpoint_set_aside_start')
    if jax.process_index() == 0:
      self.corrupt_directory.mkdir(exist_ok=True)
      for step in steps:
        target = self.corrupt_directory / str(step)
        if target.exists():
          target = target.with_name(f'{step}.{int(time.time())}')
        os.replace(self.directory / str(step), target)
    distributed.barrier('checkpoint_set_aside_done')
    self.manager.reload()

  def check_background_save(self) -> None:
    """Raises CheckpointError at once when the last asynchronous save has failed (orbax would
    say so only at the next save). Cheap: a flag, no waiting while a save runs."""
    if self._pending is None or self.manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()        # Finished: returns at once, or raises its error.
    except Exception as e:
      raise CheckpointError(f'The checkpoint of step {step} could not be written to '
                            f'{self.directory} ({first_line(e)}). Check the disk and resume: the '
                            'run continues from the last checkpoint written.') from e

  def wait(self) -> None:
    """Waits for the running save; CheckpointError if it failed (an error that
    check_background_save has raised is not raised again)."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if step is not None:
        raise CheckpointError(f'The checkpoint of step {step} could not be written to '
                              f'{self.directory} ({first_line(e)}).') from e

  def close(self) -> None:
    self.wait()
    try:
      self.manager.close()
    except Exception:             # The failed save that wait() or the loop reported.
      logging.debug('Closing the checkpoint manager after a failed save.', exc_info=True)
