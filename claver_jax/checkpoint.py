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
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from claver_jax.fileio import is_remote, run_path

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
    self.manager.save(step, args=args, metrics=metrics, force=True)

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
    if data_iterator is not None and own_file.is_file():
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    if (self.directory / str(step) / 'progress').is_dir():
      items['progress'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None and not own_file.is_file():
      first = sorted(data_dir.glob('process_0-of-*.json'))
      if not first:
        raise FileNotFoundError(f'{data_dir} has no data iterator state (process_0-of-N.json); '
                                'the checkpoint is incomplete. Delete it to resume from the one '
                                'before, or start a fresh workdir.')
      data_iterator.set_state(json.loads(first[0].read_text()))
      logging.info('Step %d was saved by %s processes and is restored by %d: the data '
                   'continues from the same global batch.', step,
                   first[0].stem.rsplit('-of-', 1)[1], jax.process_count())
    logging.info('Restored step %d from %s.', step, self.directory)
    return restored['state'], dict(restored.get('progress') or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
