r"""Zero-shot evaluation of a Kinetics-400-trained model on UCF-101, HMDB-51 and Kinetics-600.

    python -m claver_jax.main --config=configs/zeroshot.py --workdir=DIR \
        --config.init.checkpoint=runs/k400_b16_32 [--config.zeroshot.ucf101.root=... ...]
    python -m claver_jax.zeroshot --config=configs/zeroshot.py --workdir=DIR [the same flags]

The second is an alias of the first (claver_jax.main, the same flags and start-up) that takes
zero-shot configs (config.mode='zeroshot') only.

The protocol is X-CLIP's (after ER-ZSAR), which CLAVER follows (its Appendix D). The model
never sees these classes in training; each class is described by its bare name, the templates
the model directory records (those it was trained with; else the official ones;
config.text.templates overrides) and its interpretive prompts (config.text.aspects):
  * UCF-101 and HMDB-51: all classes, on each of the 3 official test splits; the mean ± std of
    top-1 and top-5 over the splits, and each split.
  * Kinetics-600: the 3 splits of 160 classes that X-CLIP and the papers after it use, each 160
    of the 220 K600 classes outside K400 (217 distinct over the three; none a K400 class, nor one
    renamed in K600), with their evaluation videos: shipped in claver_jax/data/k600_zeroshot/
    (labels, video lists, provenance). Only the videos' folder is needed. Mean ± std of top-1 and
    top-5 over the splits, and each split.
Scores are evaluate.run_eval's over evaluate.class_scores (softmax over classes per description
set, mean over sets, sum over views); top-k counts over all videos. std is numpy's (ddof=0; the
paper does not say which).

WORKDIR/zeroshot.json holds every number, rewritten as each run ends ("finished": false until
the last, so that a failure later loses nothing); WORKDIR/zeroshot/<dataset>/<run>/ the per-class
accuracy and confusion matrix of each run, and for Kinetics-600 the split's list as read
(val.txt, with config.zeroshot.k600.path_format applied) and classes (labels.csv). A table is
printed at the end.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from claver_jax import distributed, evaluate, sharding
from claver_jax import report as run_report
from claver_jax.data import build_pipelines
from claver_jax.data.pipeline import Pipelines
from claver_jax.data.sources import DataError, read_labels, read_list
from claver_jax.fileio import atomic_write_text, run_path
from claver_jax.models import (families, input_normalization, load_video_model,
                               read_model_config)
from claver_jax.models.clip import needed_context
from claver_jax.models.io import model_dir
from claver_jax.run_config import ConfigError, check_config
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import prompt_tokens, resolve_aspects, resolve_templates
from claver_jax.workdir import claim_workdir

DATASETS = ('ucf101', 'hmdb51', 'k600')


def default_config() -> ml_collections.ConfigDict:
  """config.zeroshot: which datasets to evaluate and where they are.

  datasets:      comma-separated, from 'ucf101', 'hmdb51', 'k600'. A dataset whose paths are all
                 empty is skipped with a message; one with some paths set must have all.
  ucf101, hmdb51:
    root         the folder (or uncompressed tar) of the videos.
    test_list    list file of a test split; '{split}' in it is replaced by the split number,
                 e.g. 'ucf101/split{split}/test.txt' (from claver_jax.data.annotations).
    labels       labels CSV (id,name); may contain '{split}' too.
    prompts      the prompt set of the classes (a shipped set's name or a JSON path).
    splits       the test splits to evaluate.
  k600:
    root         the folder of the Kinetics-600 videos (the release layout: train/, val/,
                 test/ of <youtube_id>_<start>_<end>.mp4); the only path needed.
    path_format  where a listed video is under root: '{path}' (as listed, the default), or a
                 format of {subset} (train, val, test), {file} (its file name), {label} (its
                 class name), e.g. '{label}/{file}' for claver_jax.data.annotations' layout.
    splits       which of the 3 splits to evaluate.        prompts: as above.
    split_dir    '' (the shipped splits, claver_jax/data/k600_zeroshot/) or a folder of
                 split{N}_labels.csv and split{N}_videos.txt in their format.
  """
  split_set = dict(root='', test_list='', labels='', splits=(1, 2, 3))
  return ml_collections.ConfigDict(dict(
      datasets=','.join(DATASETS),
      ucf101={**split_set, 'prompts': 'ucf101'},
      hmdb51={**split_set, 'prompts': 'hmdb51'},
      k600=dict(root='', path_format='{path}', splits=(1, 2, 3), split_dir='',
                prompts='kinetics600')))


# ---------------------------------------------------------------------------------------------
# Planning the runs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One evaluation: a dataset's split or class draw, as a list file + labels + prompt set."""
  dataset: str
  name: str
  root: str
  list_path: str
  labels: str
  prompts: str
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _paths_set(cfg: ml_collections.ConfigDict, dataset: str, keys: Sequence[str]) -> bool:
  """False when every path is empty (skip); an error when only some are set."""
  missing = [k for k in keys if not cfg[k]]
  if len(missing) == len(keys):
    return False
  if missing:
    raise ValueError(f'config.zeroshot.{dataset}: {", ".join(missing)} not set, but '
                     f'{", ".join(k for k in keys if k not in missing)} is; set all of them, or '
                     'none to skip the dataset.')
  return True


def _split_runs(cfg: ml_collections.ConfigDict, dataset: str) -> list[Run]:
  if len(cfg.splits) > 1 and '{split}' not in cfg.test_list:
    raise ValueError(f'config.zeroshot.{dataset}.test_list={cfg.test_list!r} has no "{{split}}", '
                     f'so the splits {tuple(cfg.splits)} would all read one list; write it as '
                     f'e.g. "{dataset}/split{{split}}/test.txt".')
  return [Run(dataset, f'split{s}', cfg.root, cfg.test_list.format(split=s),
              cfg.labels.format(split=s), cfg.prompts, {'split': int(s)}) for s in cfg.splits]


def k600_split_files(split_dir: str, split: int) -> tuple[Path, Path]:
  """(labels CSV, video list) of a K600 zero-shot split: the shipped ones when split_dir is ''."""
  directory = (Path(split_dir) if split_dir
               else Path(str(importlib.resources.files('claver_jax.data') / 'k600_zeroshot')))
  files = directory / f'split{split}_labels.csv', directory / f'split{split}_videos.txt'
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise DataError(f'config.zeroshot.k600: no {", ".join(missing)}; split_dir needs '
                    'split{N}_labels.csv and split{N}_videos.txt for every split asked for.')
  return files


def k600_video_path(path_format: str, path: str, class_name: str) -> str:
  """A listed video's path under root: path_format with {path}, {subset}, {file}, {label}."""
  subset, _, file = path.rpartition('/')
  try:
    return path_format.format(path=path, subset=subset, file=file, label=class_name)
  except (KeyError, IndexError) as e:
    raise ValueError(f'config.zeroshot.k600.path_format={path_format!r} names {e}; its fields '
                     'are {path}, {subset}, {file} and {label}.') from e


def _k600_runs(cfg: ml_collections.ConfigDict, out: Path, write: bool,
               allow_outside_root: bool = False) -> list[Run]:
  """One run per split; (when `write`) each split's list, under path_format, and labels under
  `out`. `allow_outside_root`: config.data's, for split lists whose paths leave the root."""
  runs = []
  for split in cfg.splits:
    labels, videos = k600_split_files(cfg.split_dir, split)
    names = read_labels(labels)
    items = read_list(videos, len(names), allow_outside_root)
    directory = out / f'split{split}'
    if write:
      directory.mkdir(parents=True, exist_ok=True)
      atomic_write_text(directory / 'val.txt', ''.join(
          f'{k600_video_path(cfg.path_format, path, names[label])} {label}\n'
          for path, label in items))
      atomic_write_text(directory / 'labels.csv', labels.read_text(encoding='utf-8'))
    runs.append(Run('k600', directory.name, cfg.root, str(directory / 'val.txt'),
                    str(directory / 'labels.csv'), cfg.prompts,
                    {'split': int(split), 'split_files': [str(labels), str(videos)]}))
  logging.info('Kinetics-600: splits %s of %s.', tuple(cfg.splits),
               cfg.split_dir or 'the shipped zero-shot splits')
  return runs


def plan_runs(config: ml_collections.ConfigDict, workdir: Path) -> tuple[list[Run], dict[str, str]]:
  """-> (runs in order, {skipped dataset: why}). Process 0 writes the K600 draws' lists."""
  zc = config.zeroshot
  wanted = [d.strip() for d in zc.datasets.split(',') if d.strip()]
  unknown = sorted(set(wanted) - set(DATASETS))
  if unknown:
    raise ValueError(f'config.zeroshot.datasets names {unknown}; choose from {list(DATASETS)}.')
  runs, skipped = [], {}
  for dataset in wanted:
    cfg = zc[dataset]
    keys = ('root',) if dataset == 'k600' else ('root', 'test_list', 'labels')
    if not _paths_set(cfg, dataset, keys):
      skipped[dataset] = (f'no paths: set --config.zeroshot.{dataset}.' +
                          ', .'.join(keys) + ' to evaluate it')
      continue
    if dataset == 'k600':
      runs += _k600_runs(cfg, workdir / 'zeroshot' / 'k600', jax.process_index() == 0,
                         config.data.allow_outside_root)
    else:
      runs += _split_runs(cfg, dataset)
  distributed.barrier('zeroshot_lists')
  return runs, skipped


# ---------------------------------------------------------------------------------------------
# Evaluating
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Progress:
  """Pipelines whose eval pass advances a progress bar (what evaluate.run_eval iterates)."""
  data: Pipelines
  bar: Any

  def __getattr__(self, name: str) -> Any:
    return getattr(self.data, name)

  def eval_pass(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in self.data.eval_pass():
      yield batch
      self.bar.update(1)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def summarize_runs(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """{run: {'top1', 'top5', ...}} -> mean and std of top-1 and top-5 over the runs, and the runs."""
  top1_mean, top1_std = _mean_std([r['top1'] for r in results.values()])
  top5_mean, top5_std = _mean_std([r['top5'] for r in results.values()])
  return {'top1_mean': top1_mean, 'top1_std': top1_std, 'top5_mean': top5_mean,
          'top5_std': top5_std, 'runs': results}


def format_table(datasets: dict[str, dict[str, Any]], skipped: dict[str, str]) -> str:
  """The printed summary: one line per dataset, then one per run."""
  lines = [f'{"dataset":<8} {"run":<14} {"videos":>7}  {"top-1 (%)":>14}  {"top-5 (%)":>14}']
  for dataset, summary in datasets.items():
    videos = sum(r['num_videos'] for r in summary['runs'].values())
    lines.append(f'{dataset:<8} {"mean ± std":<14} {videos:>7}  '
                 f'{summary["top1_mean"]:>6.2f} ± {summary["top1_std"]:<5.2f}  '
                 f'{summary["top5_mean"]:>6.2f} ± {summary["top5_std"]:<5.2f}')
    for name, r in summary['runs'].items():
      lines.append(f'{"":<8} {name:<14} {r["num_videos"]:>7}  {r["top1"]:>14.2f}  '
                   f'{r["top5"]:>14.2f}')
  lines += [f'{dataset:<8} skipped: {why}' for dataset, why in skipped.items()]
  return '\n'.join(lines)


def _check_inputs(config: ml_collections.ConfigDict, checkpoint: Path, model_cfg: Any, kind: str,
                  mesh: jax.sharding.Mesh) -> None:
  """The config's frame size is the model's, and the eval batch divides over the devices."""
  image_size = (model_cfg if kind == 'clip' else model_cfg.clip).image_size
  if config.data.image_size != image_size:
    raise ValueError(f'config.data.image_size={config.data.image_size}, but the model in '
                     f'{checkpoint} takes {image_size} px frames; set '
                     f'--config.data.image_size={image_size}.')
  if config.eval.batch_size % mesh.size or config.eval.batch_size % jax.process_count():
    raise ValueError(f'config.eval.batch_size={config.eval.batch_size} must divide by the '
                     f'{mesh.size} devices and the {jax.process_count()} processes.')


def _pipeline(config: ml_collections.ConfigDict, run: Run, source: dict[str, Any]) -> Any:
  """The eval pipeline of one run: its list, labels and views; the model's resize ratio."""
  data_config = config.data.copy_and_resolve_references()
  data_config.update(dict(
      source='filelist', root=run.root, train_list='', val_list=run.list_path,
      labels=run.labels, shots=0, eval_batch_size=config.eval.batch_size // jax.process_count(),
      num_clips=config.eval.num_clips, num_crops=config.eval.num_crops,
      eval_resize_ratio=source.get('eval_resize_ratio', config.data.eval_resize_ratio)))
  return build_pipelines(data_config)


def _write_run_reports(config: ml_collections.ConfigDict, directory: Path, run: Run, data: Any,
                       summary: dict[str, Any]) -> None:
  """WORKDIR/zeroshot/DATASET/RUN: the eval reports, and the scores when asked for."""
  evaluate.write_reports(summary, data.class_names, directory, title=f'{run.dataset} {run.name}')
  if config.eval.dump_scores:
    evaluate.dump_summary_scores(
        directory / 'scores.npz', summary, data, step=None,
        views=evaluate.views_name(config.eval.num_clips, config.eval.num_crops))


def run_zeroshot(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates config.init.checkpoint zero-shot (see the module docstring); writes
  WORKDIR/zeroshot.json, prints a table and returns what it wrote."""
  if config.mode != 'zeroshot':
    raise ConfigError(f"config.mode={config.mode!r}; run_zeroshot runs 'zeroshot' "
                      '(configs/zeroshot.py).')
  check_config(config)
  workdir = run_path(workdir)              # Local, or gs:// (etils.epath).
  checkpoint = model_dir(config.init.checkpoint)
  kind, model_cfg, meta = read_model_config(checkpoint)
  mesh = sharding.make_mesh(config.mesh)
  _check_inputs(config, checkpoint, model_cfg, kind, mesh)

  # The model's own texts and test view (WORKDIR/model records them), unless the config names
  # templates.
  source = meta.get('source', {})
  templates = resolve_templates(config.text.templates or source.get('templates') or 'official')
  bare_name = source.get('bare_name', True)
  aspects = resolve_aspects(config.text.aspects)

  # ----------------------------------------------------------------------------- input
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lock = claim_workdir(workdir, config)   # One run per workdir: WORKDIR/.lock.
  try:
    runs, skipped = plan_runs(config, workdir)
    for dataset, why in skipped.items():
      logging.warning('Zero-shot: skipping %s: %s.', dataset, why)
    if not runs:
      raise ValueError('Zero-shot: nothing to evaluate; set the paths of at least one dataset in '
                       'config.zeroshot (see claver_jax/zeroshot.py).')
    if jax.process_index() == 0:
      run_report.write_run_config(workdir, json.loads(config.to_json_best_effort()))
    pipelines = [_pipeline(config, run, source) for run in runs]

    # ----------------------------------------------------------------------------- model
    model = load_video_model(checkpoint, dtype=jnp.dtype(config.model.dtype),
                             num_frames=config.data.num_frames,
                             resample_frames=config.model.resample_frames)
    tokenizer = load_tokenizer(config.text.tokenizer or checkpoint)
    graphdef, state = nnx.split(model)
    state_sharding = sharding.state_shardings(mesh, state, families.of(model).sharding_rules)
    state = jax.device_put(state, state_sharding)
    # The model is fed as its directory records (config.data.mean/std apply to training).
    encode_text, scores = evaluate.make_eval_fns(graphdef, state_sharding, mesh,
                                                 input_normalization(meta, checkpoint))

    # ----------------------------------------------------------------------------- evaluate
    lead = jax.process_index() == 0
    results: dict[str, dict[str, Any]] = {}

    def report(finished: bool) -> dict[str, Any]:
      """What zeroshot.json holds: every run finished so far; written as each one ends."""
      written = {'checkpoint': str(checkpoint), 'num_frames': config.data.num_frames,
                 'templates': list(templates), 'aspects': list(aspects),
                 'views': [config.eval.num_clips, config.eval.num_crops],
                 'datasets': {name: summarize_runs(r) for name, r in results.items()},
                 'skipped': skipped, 'finished': finished}
      if lead:
        atomic_write_text(workdir / 'zeroshot.json', json.dumps(written, indent=1) + '\n')
      return written

    bar = tqdm.tqdm(total=sum(d.eval_batches for d in pipelines), unit='batch', dynamic_ncols=True,
                    disable=not lead)
    try:
      for run, data in zip(runs, pipelines):
        bar.set_description(f'{run.dataset} {run.name}')
        texts = prompt_tokens(data.class_names, tokenizer, run.prompts or None,
                              templates=templates, name=bare_name, aspects=aspects,
                              allow_missing=config.text.allow_missing,
                              context_length=model.cfg.clip.context_length)
        tokens = texts.tokens[..., :needed_context(texts.tokens, model.cfg.clip)]
        summary = evaluate.run_eval(_Progress(data, bar), state, encode_text, scores, tokens,
                                    mesh)
        if lead:
          _write_run_reports(config, workdir / 'zeroshot' / run.dataset / run.name, run, data,
                             summary)
        results.setdefault(run.dataset, {})[run.name] = {
            'top1': summary['top1'], 'top5': summary['top5'],
            'num_videos': summary['num_videos'], 'num_classes': len(data.class_names),
            'substituted': data.eval_substitutions.count, **run.info}
        logging.info('Zero-shot %s %s: top-1 %.2f%%, top-5 %.2f%% over %d videos.', run.dataset,
                     run.name, summary['top1'], summary['top5'], summary['num_videos'])
        report(finished=False)
    finally:
      bar.close()

    written = report(finished=True)
    if lead:
      print(format_table(written['datasets'], skipped))
      print(f'Wrote {workdir / "zeroshot.json"}.')
      run_report.write_and_log(workdir)
    return written
  finally:
    if workdir_lock is not None:
      workdir_lock.release()


if __name__ == '__main__':   # An alias of claver_jax.main for zero-shot configs.
  import functools

  from absl import app

  from claver_jax import cli, main
  app.run(functools.partial(main.main, zeroshot_only=True), flags_parser=cli.parse_flags)
