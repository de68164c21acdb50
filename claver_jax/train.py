"""The train loop: one function, read top to bottom (start: mesh, input, workdir, text, model;
optimizer, shard, steps, checkpoint, record, loop, report).

What it is made of lives beside it: the start-up it shares with an eval run, the evaluations and
their reports (claver_jax.run), model building (claver_jax.models.build), the train step and its
loss (claver_jax.step), the evaluation functions on the model state (claver_jax.evaluate). The
loop's cadence (log, evaluate, save at step s) is `Cadence`; what it carries from step to step
besides the model state is `LoopState`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from claver_jax import aot, distributed, evaluate, optim, report, sharding
from claver_jax.checkpoint import Checkpointer
from claver_jax.data import make_global_batch
from claver_jax.metrics import MetricWriter, progress_bar
from claver_jax.models.build import export_model, report_trainable
from claver_jax.models.clip import pool_index
from claver_jax.run import Evaluator, record_run, start_run
from claver_jax.run_config import ConfigError
from claver_jax.step import check_finite, check_parameters, make_train_step


# Where the names train.py held before it was split (issue 26) live now: importing one from here
# still works, with a DeprecationWarning that names its new module.
_MOVED = {
    **dict.fromkeys(('TEMPORAL_INIT_STD', 'check_init', 'checkpoint_normalization',
                     'init_from_workdir', 'make_model', 'make_tokenizer', 'model_family'),
                    'claver_jax.models.build'),
    **dict.fromkeys(('NonFiniteLossError', 'all_finite', 'draw_sets', 'encode_texts_by_length',
                     'length_buckets', 'micro_batches', 'soft_cross_entropy', 'step_keys'),
                    'claver_jax.step'),
    **dict.fromkeys(('TEXTS_PER_DEVICE', 'encode_texts_sharded', 'make_eval_fns', 'run_eval'),
                    'claver_jax.evaluate'),
    'METRIC_TAGS': 'claver_jax.run', 'check_batches': 'claver_jax.run_config'}


def __getattr__(name: str) -> Any:
  if name not in _MOVED:
    raise AttributeError(f"module 'claver_jax.train' has no attribute {name!r}")
  warnings.warn(f'claver_jax.train.{name} moved to {_MOVED[name]}.{name}: import it from there.',
                DeprecationWarning, stacklevel=2)
  return getattr(importlib.import_module(_MOVED[name]), name)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop does each of its periodic jobs ('log', 'eval', 'checkpoint'): at every
  multiple of one of the job's intervals, and at the last step."""
  last_step: int
  intervals: dict[str, tuple[int, ...]]

  def due(self, job: str, step: int) -> bool:
    return step == self.last_step or any(step % every == 0 for every in self.intervals[job])


@dataclasses.dataclass
class LoopState:
  """What the loop carries from step to step besides the model state."""
  progress: dict[str, Any]         # Saved with each checkpoint: best_val_top1, best_step.
  unchecked: list[tuple[int, jax.Array]] = dataclasses.field(default_factory=list)
  # Since the last log: on-device losses and substituted-clip counts, time, clips, input wait.
  losses: list[jax.Array] = dataclasses.field(default_factory=list)
  substituted: list[jax.Array] = dataclasses.field(default_factory=list)
  tick: float = dataclasses.field(default_factory=time.time)
  clips: int = 0
  waited: float = 0.0
  read: int = 0                    # Clips read and substituted in this run.
  unreadable: int = 0

  @property
  def best(self) -> float | None:
    """WORKDIR/model's val top-1; None before the first export."""
    return self.progress.get('best_val_top1')

  def next_interval(self) -> None:
    self.losses, self.substituted, self.tick, self.clips, self.waited = [], [], time.time(), 0, 0.0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (config.mode='train'; 'eval' is claver_jax.run.evaluate_workdir) with periodic
  evaluations; returns the last metrics. Nothing is written to the workdir before the config,
  config.init's directories, the tokenizer, the data and the class texts are checked."""
  if config.mode != 'train':
    raise ConfigError(f"config.mode={config.mode!r}; train_and_evaluate runs 'train' (mode=eval: "
                      'claver_jax.run.evaluate_workdir).')
  # ----------------------------------------------------------------------------- start
  run = start_run(config, workdir)     # Mesh, input, workdir claim, tokenizer, model, texts.
  config, workdir, mesh, data, model = run.config, run.workdir, run.mesh, run.data, run.model
  tc = config.train

  # ----------------------------------------------------------------------------- optimizer
  steps_per_epoch, schedule_steps, total_steps = run.schedule()
  if total_steps < schedule_steps:
    logging.info('config.train.max_steps=%d: the run stops at step %d of the %d-step schedule '
                 'that %s epochs define.', tc.max_steps, total_steps, schedule_steps, tc.epochs)
  tx, schedule = optim.make_optimizer(config.optim, run.family.group_of,
                                      total_steps=schedule_steps, steps_per_epoch=steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim,
                                                                 run.family.group_of))
  report_trainable(model, config.optim, run.family)

  # ----------------------------------------------------------------------------- shard
  graphdef, state = nnx.split((model, optimizer))
  state_sharding = sharding.state_shardings(mesh, state, run.family.sharding_rules)
  state = distributed.device_put_identical(state, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  # ----------------------------------------------------------------------------- steps
  text_frozen = config.optim.freeze_text
  # Compiled at the first step under the mesh (the fused attention kernels need it), with a
  # portable fallback should a fused kernel not compile; the log says which kernel runs.
  train_step = aot.on_first_call(lambda: jax.jit(
      make_train_step(graphdef, config, mesh, pool_index(run.tokens, model.cfg.clip) + 1,
                      text_frozen, run.family.group_of),
      in_shardings=(state_sharding, batch_sharding, replicated, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,)), mesh, 'train step')
  # Evaluations take state[0], the model's part: the same arrays, sharded as the loop holds them.
  encode_text, scores = evaluate.make_eval_fns(nnx.graphdef(model), state_sharding[0], mesh,
                                               run.normalization)

  # ----------------------------------------------------------------------------- checkpoint
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                              keep_best=config.checkpoint.keep_best)
  train_iter = iter(data.train) if data.train is not None else None
  start_step, progress = 0, {}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sharding)
  # The newest checkpoint that reads; a damaged newer one is named and set aside.
  resumed = checkpointer.restore_latest(nnx.to_pure_dict(abstract), train_iter)
  if resumed is not None:
    start_step, restored, progress = resumed
    nnx.replace_by_pure_dict(state, restored)
    logging.info('Resuming from step %d in %s.', start_step, workdir)
  writer = MetricWriter(workdir, resume_step=start_step,
                        steps_per_epoch=steps_per_epoch if data.num_train else None)

  # ----------------------------------------------------------------------------- record
  record_run(run, writer)              # WORKDIR/config.json, TensorBoard's config.
  evaluator = Evaluator(run, writer, encode_text, scores)

  # ----------------------------------------------------------------------------- loop
  text = (evaluate.encode_texts(lambda t: encode_text(state[0], t), run.tokens,
                                chunk=evaluate.TEXTS_PER_DEVICE * mesh.size) if text_frozen
          else jax.device_put(run.tokens, replicated))
  stop = distributed.StopRequest(start_step)
  cadence = Cadence(total_steps, {'log': (config.log_every_steps,),
                                  'eval': (config.eval_every_steps or steps_per_epoch,),
                                  'checkpoint': (config.checkpoint_every_steps, steps_per_epoch)})
  bar = progress_bar(total_steps, start_step)
  loop = LoopState(progress)
  metrics: dict[str, Any] = {}
  stopped = False

  def last_good() -> str:
    saved = checkpointer.latest_step()
    return (f'the last good checkpoint ({checkpointer.directory / str(saved)}) is kept'
            if saved is not None else 'no checkpoint had been saved')

  def evaluate_and_export(step: int, state: Any) -> dict[str, Any] | None:
    """Evaluates; WORKDIR/model becomes this model when it is finite and its val top-1 beats the
    best so far. None when a SIGTERM stopped the evaluation."""
    evaluated = evaluator.evaluate(step, state[0], 'val', stop)
    if evaluated is not None and (loop.best is None or evaluated['val/top1'] > loop.best):
      check_parameters(state, step, last_good)
      loop.progress.update(best_val_top1=evaluated['val/top1'], best_step=step)
      export_model(nnx.merge(graphdef, state)[0], run.tokenizer, workdir / 'model',
                   {'workdir': str(workdir), 'step': step, 'val/top1': loop.best,
                    'templates': list(run.templates), 'bare_name': config.text.bare_name,
                    'aspects': list(run.aspects),
                    'eval_resize_ratio': config.data.eval_resize_ratio}, run.normalization)
      if run.lead:   # WORKDIR/eval/best: the reports of the model WORKDIR/model holds.
        evaluate.copy_reports(evaluate.reports_dir(workdir, 'latest'),
                              evaluate.reports_dir(workdir, 'best'))
    return evaluated

  def save(step: int, evaluated: dict[str, Any] | None, eval_pending: bool) -> None:
    checkpointer.save(step, nnx.to_pure_dict(state), train_iter, config,
                      {'val/top1': evaluated['val/top1']} if evaluated else None,
                      {**loop.progress, 'eval_pending': eval_pending})

  try:
    if progress.get('eval_pending'):   # A SIGTERM stopped this step's evaluation: do it now.
      evaluated = evaluate_and_export(start_step, state)
      if evaluated is None:            # Stopped again: step start_step stays as it was saved.
        logging.warning('SIGTERM: step %d is saved; exiting. Run again to resume.', start_step)
        return metrics
      metrics.update(evaluated)
    for step in range(start_step + 1, total_steps + 1):
      waiting = time.perf_counter()
      host_batch = next(train_iter)
      loop.waited += time.perf_counter() - waiting
      batch = make_global_batch(host_batch, batch_sharding)
      state, out = train_step(state, batch, text, jax.device_put(np.int32(step), replicated))
      loop.losses.append(out['loss'])
      loop.substituted.append(out['substituted'])
      loop.unchecked.append((step, out['finite']))
      loop.clips += tc.batch_size
      bar.update(1)
      checkpointer.check_background_save()   # A failed asynchronous save stops the run now.
      if cadence.due('log', step):
        values, flags, counts = jax.device_get((loop.losses, [f for _, f in loop.unchecked],
                                                loop.substituted))
        check_finite(loop.unchecked, last_good, flags)
        loop.read, loop.unreadable = loop.read + loop.clips, loop.unreadable + int(np.sum(counts))
        data.check_substituted('train', loop.unreadable, loop.read)
        loss, elapsed = float(np.mean(values)), time.time() - loop.tick
        metrics = {'train/loss': loss, 'train/lr': float(schedule(step - 1)),
                   'train/clips_per_s': loop.clips / elapsed,
                   'train/step_s': elapsed / len(values), 'data/wait_s': loop.waited / len(values)}
        writer.write(step, metrics)
        bar.set_postfix(loss=f'{loss:.4f}', lr=f'{metrics["train/lr"]:.2e}',
                        clips_s=f'{metrics["train/clips_per_s"]:.1f}')
        loop.next_interval()
      evaluating, evaluated = cadence.due('eval', step), None
      if evaluating:
        check_finite(loop.unchecked, last_good)
        evaluated = evaluate_and_export(step, state)
        metrics.update(evaluated or {})
      stopping = stop(step)                  # The same answer on every process.
      if cadence.due('checkpoint', step) or evaluating or stopping:
        check_finite(loop.unchecked, last_good)
        check_parameters(state, step, last_good)
        save(step, evaluated, eval_pending=evaluating and evaluated is None)
      if stopping:
        logging.warning('SIGTERM: saved step %d; exiting. Run again to resume.', step)
        stopped = True
        break
    if not stopped and config.eval.final_views:   # test/*; `views` stays the 1-view val's
      metrics.update({k: v for k, v in evaluator.final_test(total_steps, state[0], stop).items()
                      if k != 'views'})
  finally:
    stop.close()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if train_iter is not None and hasattr(train_iter, 'close'):
      train_iter.close()
    run.release()

  # ----------------------------------------------------------------------------- report
  # WORKDIR/report.md + .html and the summary in the log; not after a SIGTERM (a preempted
  # host has seconds): `python -m claver_jax.report WORKDIR` reports on a stopped run.
  if run.lead and stop.signal is None:
    report.write_and_log(workdir)
  return metrics
