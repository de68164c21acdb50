"""What a train run and an eval run share, and the eval run itself (config.mode='eval').

`start_run` checks the config, builds the mesh, the input, the texts and the model and claims the
workdir; nothing is written to the workdir before the config, config.init's directories, the
tokenizer, the data (lists, labels, a sample of the videos) and the class texts are checked.
`record_run` writes WORKDIR/config.json and TensorBoard's config; `Evaluator` runs an
evaluation on a model state and writes its metrics row and reports (training's periodic val/*,
an eval run's eval/*, the final multi-view test/*). `evaluate_workdir` is config.mode='eval':
the workdir's latest checkpoint (or config.init.checkpoint) evaluated once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from claver_jax import distributed, evaluate, fileio, optim, report, sharding
from claver_jax.checkpoint import Checkpointer
from claver_jax.data import build_pipelines
from claver_jax.data.pipeline import Pipelines
from claver_jax.metrics import MetricWriter, read_metrics
from claver_jax.models import families
from claver_jax.models.build import (check_init, checkpoint_normalization, init_from_workdir,
                                     make_model, make_tokenizer, model_family)
from claver_jax.models.clip import needed_context, set_remat
from claver_jax.models.temporal import set_token_shuffle
from claver_jax.run_config import ConfigError, check_batches, check_config, parse_views
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, prompt_tokens,
                                     resolve_aspects, resolve_templates)
from claver_jax.text.tokenizer import Tokenizer
from claver_jax.workdir import claim_workdir

# The metrics TensorBoard's hparams view compares runs on.
METRIC_TAGS = ('train/loss', 'val/top1', 'val/top5', 'val/mean_class_acc', 'test/top1',
               'test/top5')


@dataclasses.dataclass
class Run:
  """A started run: its checked config, workdir (claimed: `lock`), mesh, input, texts, model."""
  config: ml_collections.ConfigDict
  workdir: Path
  mesh: jax.sharding.Mesh
  data_config: ml_collections.ConfigDict     # config.data as the pipelines read it.
  data: Pipelines
  templates: tuple[str, ...]
  aspects: tuple[str, ...]
  tokenizer: Tokenizer
  model: nnx.Module
  family: families.Family
  tokens: np.ndarray                         # int32 [A, C, S]: the class texts, S cut to fit.
  normalization: tuple[Any, Any]             # config.data's (mean, std): what the run feeds.
  recorded_normalization: tuple[Any, Any] | None   # init.checkpoint's own, if any.
  lock: Any

  @property
  def class_names(self) -> list[str]:
    return self.data.class_names

  @property
  def lead(self) -> bool:
    return jax.process_index() == 0

  def schedule(self) -> tuple[int, int, int]:
    """(steps per epoch, the schedule's steps, the steps this run takes: config.train.max_steps
    caps them)."""
    tc = self.config.train
    steps_per_epoch = max(self.data.num_train // tc.batch_size, 1)
    schedule_steps = int(tc.epochs * steps_per_epoch)    # Truncated, as the official scheduler.
    total_steps = min(schedule_steps, tc.max_steps) if tc.max_steps else schedule_steps
    return steps_per_epoch, schedule_steps, total_steps

  def release(self) -> None:
    if self.lock is not None:
      self.lock.release()


def start_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The start of a train or eval run, checks first (see the module docstring)."""
  check_config(config)
  workdir = fileio.run_path(workdir)       # Local, or gs:// (etils.epath); else one-line error.
  model_family(config)                     # A family error, before anything is written.
  check_init(config)

  # ----------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  tc = config.train
  check_batches(config, mesh)
  # The rows of each global batch this process's devices hold (interleaved with other
  # processes' on TPU slices): its pipeline reads those of the one global train order.
  train_rows = sharding.process_rows(mesh, tc.batch_size)
  # A tokenizer to load is checked now; one to learn is made once the workdir exists.
  tokenizer = make_tokenizer(config, workdir, []) if config.text.tokenizer != 'train' else None

  # ----------------------------------------------------------------------------- input
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = tc.batch_size // jax.process_count()
  data_config.eval_batch_size = config.eval.batch_size // jax.process_count()
  data_config.num_clips, data_config.num_crops = config.eval.num_clips, config.eval.num_crops
  if config.mode == 'eval':
    data_config.train_list = ''
  data = build_pipelines(data_config, train_rows=train_rows, workdir=workdir)
  templates = resolve_templates(config.text.templates)
  aspects = resolve_aspects(config.text.aspects)
  build_prompt_texts(data.class_names, load_prompt_set(config.text.prompts) if config.text.prompts
                     else None, templates=templates, aspects=aspects,
                     allow_missing=config.text.allow_missing,
                     name=config.text.bare_name)      # Every class has its texts.

  # ----------------------------------------------------------------------------- workdir
  # Room to write, the lock (one run per workdir, held until the end), stale temporaries swept,
  # a resume under the config it was trained with: all before anything is built.
  lock = claim_workdir(workdir, config)

  # ----------------------------------------------------------------------------- text
  tokenizer = tokenizer or make_tokenizer(config, workdir, data.class_names)

  # ----------------------------------------------------------------------------- model
  model = make_model(config, tokenizer, nnx.Rngs(config.seed))
  if config.eval.token_shuffle != 'none':     # The paper's Table 9; mode=eval (check_config).
    set_token_shuffle(model, config.eval.token_shuffle, config.seed)
  set_remat(model, config.model.remat)
  prompts = prompt_tokens(data.class_names, tokenizer, config.text.prompts or None,
                          templates=templates, aspects=aspects,
                          allow_missing=config.text.allow_missing, name=config.text.bare_name,
                          context_length=model.cfg.clip.context_length)
  # The text attention is causal: the context is cut to the longest text, the same embeddings.
  tokens = prompts.tokens[..., :needed_context(prompts.tokens, model.cfg.clip)]
  logging.info('Texts: %d description sets x %d classes (%s), %d tokens each.',
               *prompts.tokens.shape[:2], ', '.join(sorted(set(prompts.kinds))), tokens.shape[-1])
  return Run(config=config, workdir=workdir, mesh=mesh, data_config=data_config, data=data,
             templates=templates, aspects=aspects, tokenizer=tokenizer, model=model,
             family=families.of(model), tokens=tokens,
             normalization=(tuple(config.data.mean), tuple(config.data.std)),
             recorded_normalization=checkpoint_normalization(config), lock=lock)


def record_run(run: Run, writer: MetricWriter) -> None:
  """Process 0: WORKDIR/config.json (an eval run keeps a training's) and TensorBoard's config."""
  if not run.lead:
    return
  config, data = run.config, run.data
  steps_per_epoch, _, total_steps = run.schedule()
  config_dict = json.loads(config.to_json_best_effort())
  run_info = {'total_steps': total_steps, 'steps_per_epoch': steps_per_epoch,
              'classes': len(run.class_names), 'train_clips': data.num_train,
              'eval_clips': data.num_eval, 'devices': run.mesh.size,
              'processes': jax.process_count(), 'platform': jax.default_backend()}
  if config.mode == 'train' or not (run.workdir / report.RUN_CONFIG).is_file():
    report.write_run_config(run.workdir, config_dict, run_info)
  writer.write_config(config_dict, report.key_settings(config_dict, run_info), METRIC_TAGS)


@dataclasses.dataclass
class Evaluator:
  """Evaluations of `run`'s model on the devices (`evaluate.make_eval_fns`: `encode_text`,
  `scores` of the model state alone), each written as a metrics row and reports."""
  run: Run
  writer: MetricWriter
  encode_text: Callable
  scores: Callable

  def evaluate(self, step: int, state: Any, prefix: str,
               stop: distributed.StopRequest | None = None) -> dict[str, Any] | None:
    """The eval split scored by model state `state`: a row PREFIX/* ('val': training's
    periodic evaluations, 'eval': an eval run) and its reports; None when `stop` stopped it."""
    run, data, config = self.run, self.run.data, self.run.config
    views = evaluate.views_name(config.eval.num_clips, config.eval.num_crops)
    logging.info('Evaluating step %d (%d batches, %s views).', step, data.eval_batches, views)
    substituted = data.eval_substitutions.count
    summary = evaluate.run_eval(data, state, self.encode_text, self.scores, run.tokens, run.mesh,
                                stop)
    if summary is None:
      logging.warning('SIGTERM during the evaluation of step %d: evaluation stopped.', step)
      return None
    metrics = {**evaluate.eval_row(prefix, summary, views), **data.metrics(),
               'data/eval_substituted': data.eval_substitutions.count - substituted}
    self.writer.write(step, metrics)
    if run.lead:
      kind = 'eval' if prefix == 'eval' else 'latest'
      self.write_reports(summary, evaluate.reports_dir(run.workdir, kind, step=step, views=views),
                         step, data, prefix, views)
    unreadable = (f', {summary["num_substituted"]} unreadable, not scored'
                  if summary['num_substituted'] else '')
    logging.info('step %d: %s top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% over %d videos '
                 '(%s views%s).', step, prefix, summary['top1'], summary['top5'],
                 summary['mean_class_acc'], summary['num_videos'], views, unreadable)
    return metrics

  def final_test(self, step: int, state: Any,
                 stop: distributed.StopRequest | None = None) -> dict[str, Any]:
    """The official end of a run: the final weights tested with config.eval.final_views (the
    paper's 4 clips x 3 crops), a metrics row of test/top1 and test/top5 with `views` beside the
    periodic 1-view val/*. Skipped when metrics.jsonl has it already (a finished run started
    again); {} when a SIGTERM stops it (the next start does it)."""
    run, workdir = self.run, self.run.workdir
    clips, crops = parse_views(run.config.eval.final_views)
    test_views = evaluate.views_name(clips, crops)
    if (workdir / 'metrics.jsonl').is_file() and any(
        row.get('step') == step and row.get('views') == test_views and 'test/top1' in row
        for row in read_metrics(workdir)):
      return {}
    test_config = run.data_config.copy_and_resolve_references()
    test_config.train_list = ''
    test_config.num_clips, test_config.num_crops = clips, crops
    test_data = build_pipelines(test_config, workdir=workdir)
    logging.info('Final test of step %d: %s views (%d clips x %d crops) per video, %d batches.',
                 step, test_views, clips, crops, test_data.eval_batches)
    summary = evaluate.run_eval(test_data, state, self.encode_text, self.scores, run.tokens,
                                run.mesh, stop)
    if summary is None:
      logging.warning('SIGTERM during the final test: run again to test step %d.', step)
      return {}
    row = evaluate.eval_row('test', summary, test_views)
    self.writer.write(step, row)
    if run.lead:
      self.write_reports(summary, evaluate.reports_dir(workdir, 'test'), step, test_data, 'test',
                         test_views)
    logging.info('step %d, %s views: test top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% over %d '
                 'videos.', step, test_views, summary['top1'], summary['top5'],
                 summary['mean_class_acc'], summary['num_videos'])
    return row

  def write_reports(self, summary: dict[str, Any], directory: Path, step: int,
                    pipelines: Pipelines, name: str, views: str) -> None:
    """Process 0: the reports of evaluation `name` ('val', 'eval', 'test') over `pipelines`' eval
    split in `directory`, its figures and the training curves so far in TensorBoard, and with
    config.eval.dump_scores its per-video scores (scores.npz)."""
    from claver_jax import plots
    run = self.run
    figures = evaluate.write_reports(summary, run.class_names, directory, step=step, views=views,
                                     title=f'{name}, step {step}')
    figures = {f'{name}/{key}': figure for key, figure in figures.items()}
    figures['train/curves'] = plots.curves_figure(read_metrics(run.workdir),
                                                  title=run.workdir.name)
    self.writer.write_figures(step, figures)
    if run.config.eval.dump_scores and summary['index'] is not None:
      evaluate.dump_summary_scores(directory / 'scores.npz', summary, pipelines, step=step,
                                   views=views)


# ---------------------------------------------------------------------------------------------
# config.mode='eval'
# ---------------------------------------------------------------------------------------------
def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """config.mode='eval': the workdir's latest checkpoint (its model part), or without one
  config.init.checkpoint fed the normalisation it records, evaluated on the eval split; a row of
  eval/* in metrics.jsonl, reports in WORKDIR/eval/step<S>_<views>/. Returns the row."""
  if config.mode != 'eval':
    raise ConfigError(f"config.mode={config.mode!r}; evaluate_workdir runs 'eval'.")
  run = start_run(init_from_workdir(config, fileio.run_path(workdir)), workdir)
  config, workdir = run.config, run.workdir
  graphdef, state = nnx.split(run.model)
  state_sharding = sharding.state_shardings(run.mesh, state, run.family.sharding_rules)
  state = distributed.device_put_identical(state, state_sharding)
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                              keep_best=config.checkpoint.keep_best)
  steps_per_epoch, _, _ = run.schedule()
  try:
    resumed = checkpointer.restore_latest(_abstract_train_state(run, state_sharding))
    if resumed is None and not config.init.checkpoint:
      raise ValueError(f'config.mode=eval, but {workdir} has no checkpoint and '
                       'config.init.checkpoint is empty: there is nothing to evaluate.')
    step = 0
    if resumed is not None:    # A training's checkpoint: (model, optimizer); the model's part.
      step, restored, _ = resumed
      nnx.replace_by_pure_dict(state, restored[0])
      logging.info('Resuming from step %d in %s.', step, workdir)
    writer = MetricWriter(workdir, resume_step=step,
                          steps_per_epoch=steps_per_epoch if run.data.num_train else None)
    record_run(run, writer)
    # A workdir checkpoint is fed config.data's normalisation; the model directory itself, as it
    # records.
    normalization = run.normalization if resumed is not None else run.recorded_normalization
    evaluator = Evaluator(run, writer, *evaluate.make_eval_fns(graphdef, state_sharding, run.mesh,
                                                               normalization))
    metrics = evaluator.evaluate(step, state, 'eval')
    writer.close()
  finally:
    checkpointer.close()
    run.release()
  if run.lead:
    report.write_and_log(workdir)
  return metrics


def _abstract_train_state(run: Run, model_sharding: Any) -> dict[str, Any]:
  """The pure-dict shapes and shardings of a training checkpoint's state, (model, optimizer),
  with the optimizer's abstract: what a workdir checkpoint restores into."""
  config = run.config
  tx, _ = optim.make_optimizer(config.optim, run.family.group_of, total_steps=1,
                               steps_per_epoch=1)
  wrt = optim.trainable_filter(config.optim, run.family.group_of)
  optimizer = nnx.eval_shape(lambda model: nnx.Optimizer(model, tx, wrt=wrt), run.model)
  abstract = nnx.state((run.model, optimizer))
  shardings = sharding.state_shardings(run.mesh, abstract, run.family.sharding_rules, log=False)
  return nnx.to_pure_dict(jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings))
