"""Run checkpoints in WORKDIR/checkpoints: model + optimizer state, data iterator, config.

Each step directory holds three items: `state` (nnx state of model and optimizer, as a pure
dict), `data` (the grain iterator's state, so a resumed run sees exactly the batches it would
have seen) and `config` (JSON). Saves are asynchronous. The last `keep` checkpoints are kept
and, separately, the `keep_best` best by val/top1: a preservation policy, because `best_fn`
with `max_to_keep` alone can delete the latest one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = 'val/top1'


class Checkpointer:

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, keep_best: int = 1):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(keep),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=keep_best,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=True)
    self.directory = Path(workdir).absolute() / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (a pure dict of arrays) and the iterator."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores `state` into the shapes and shardings of `abstract_state`, and the iterator."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('Restored step %d from %s.', step, self.directory)
    return restored['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
