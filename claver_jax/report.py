r"""The run report: what a run left in its workdir, as WORKDIR/report.md and WORKDIR/report.html.

    python -m claver_jax.report WORKDIR

It reads WORKDIR/config.json (the run's config and command, `write_run_config`),
metrics.jsonl, the evaluation reports under WORKDIR/eval/ (claver_jax.evaluate.reports_dir),
zeroshot.json for a zero-shot run, and writes the training curves (WORKDIR/eval/curves.png) and
the report: the settings that matter, the last and best 1-view numbers, the multi-view test and
eval runs where there are any, the paper's figure for the preset (claver_jax.paper), wall time
and throughput, the most-confused pairs and the figures (linked in report.md, inline in
report.html). It works on a finished run, on one that was stopped (it says where), on an
evaluation-only workdir and on a zero-shot one (mean ± std per dataset). The train loop writes it
at the end of a run and logs `summary_text`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import logging
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from claver_jax import paper
from claver_jax.fileio import atomic_write_text, run_path

RUN_CONFIG = 'config.json'
# Keys a metrics row may carry its wall-clock time under (Unix seconds or ISO 8601).
TIME_KEYS = ('time', 'wall_time', 'timestamp')
PAIRS_SHOWN = 10


# ---------------------------------------------------------------------------------------------
# WORKDIR/config.json
# ---------------------------------------------------------------------------------------------
def config_source(argv: Sequence[str]) -> tuple[str | None, str | None]:
  """The config file and preset argument of a command line's last --config=FILE[:ARG]."""
  specs = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  if not specs:
    return None, None
  path, _, arg = specs[-1].partition(':')
  return path, arg or None


def write_run_config(workdir: str | os.PathLike, config: Mapping[str, Any],
                     run: Mapping[str, Any] | None = None,
                     argv: Sequence[str] | None = None) -> Path:
  """WORKDIR/config.json: {'command', 'config_file', 'preset', 'started', 'run', 'config'}, the
  config as a nested dict. `run`: what the run found (steps, clips, classes, devices). Replaced at
  every start (a resumed run records the config it runs with)."""
  argv = list(sys.argv if argv is None else argv)
  module = _module_of(argv[0]) if argv else None   # None: called from Python, not the CLI
  config_file, preset = config_source(argv[1:]) if module else (None, None)
  record = {'command': shlex.join(['python', '-m', module, *argv[1:]]) if module else None,
            'config_file': config_file, 'preset': preset,
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'run': dict(run or {}), 'config': dict(config)}
  path = run_path(workdir) / RUN_CONFIG
  atomic_write_text(path, json.dumps(record, indent=1, default=str) + '\n')
  return path


def _module_of(program: str) -> str | None:
  """'.../claver_jax/main.py' -> 'claver_jax.main' (what `python -m` ran); None for a program
  outside claver_jax (a Python caller's, e.g. pytest)."""
  parts = Path(program).with_suffix('').parts
  return '.'.join(parts[parts.index('claver_jax'):]) if 'claver_jax' in parts else None


def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """WORKDIR/config.json, or for a run that predates it the config of its latest checkpoint
  ({'config': ...} only); {} when neither is there."""
  workdir = run_path(workdir)
  path = workdir / RUN_CONFIG
  if path.is_file():
    record = json.loads(path.read_text())
    if 'config' in record and record.get('format') is None:   # not a model directory's
      return record
  steps = sorted((int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()),
                 reverse=True)
  for step in steps:
    for name in ('metadata', 'config'):   # orbax's JSON item: checkpoints/<step>/config/metadata
      saved = workdir / 'checkpoints' / str(step) / 'config' / name
      if saved.is_file():
        return {'config': json.loads(saved.read_text())}
  return {}


# ---------------------------------------------------------------------------------------------
# The settings that matter
# ---------------------------------------------------------------------------------------------
def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
  node: Any = config
  for part in dotted.split('.'):
    if not isinstance(node, Mapping) or part not in node:
      return default
    node = node[part]
  return node


def sci(value: float) -> str:
  """A learning rate and the like: 1.2e-05."""
  return f'{value:.2e}' if value else '0'


def key_settings(config: Mapping[str, Any], run: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
  """The settings a reader of a run asks for first, flat (name -> str / number / bool): the
  report's config table and TensorBoard's hparams."""
  run = run or {}
  family = _get(config, 'model.name', 'claver')
  arch = _get(config, 'model.arch')
  if arch == 'custom':
    clip = _get(config, 'model.clip', {})
    arch = (f"custom (ViT {clip.get('vision_layers')} x {clip.get('vision_width')}, patch "
            f"{clip.get('patch_size')}; text {clip.get('text_layers')} x "
            f"{clip.get('text_width')})")
  settings: dict[str, Any] = {
      'family': family, 'architecture': arch,
      'frames': _get(config, 'data.num_frames'), 'image size': _get(config, 'data.image_size')}
  if family == 'claver':
    layers = _get(config, 'model.temporal_layers')
    depth = ('a third of the ViT\'s depth' if layers is None else
             f'{layers} layer' + ('s' if layers != 1 else ''))
    settings['temporal'] = (f"{_get(config, 'model.temporal')} ({depth}, attention "
                            f"{_get(config, 'model.attention')})")
  frozen = [t for t in ('image', 'text') if _get(config, f'optim.freeze_{t}')]
  text_lr = _get(config, 'optim.text_lr_multiplier', 1.0)
  trained = [f'text (x{text_lr:g} lr)' if t == 'text' and text_lr != 1 else t
             for t in ('image', 'text') if t not in frozen]
  settings['towers trained'] = ', '.join(trained) or 'none'
  settings['towers frozen'] = ', '.join(
      'image (but ln_post, proj, class embedding)' if t == 'image' and family == 'claver' else t
      for t in frozen) or 'none'
  templates = _get(config, 'text.templates')
  texts = []
  if _get(config, 'text.bare_name'):
    texts.append('bare name')
  if templates:
    texts.append(f'templates {templates!r}' if '{}' not in str(templates)
                 else f'{str(templates).count("{}")} templates')
  if _get(config, 'text.prompts'):
    texts.append(f"prompts {_get(config, 'text.prompts')!r}")
  settings['texts'] = ' + '.join(texts) or 'the model directory\'s'
  init = (f"CLIP {_get(config, 'init.clip')}" if _get(config, 'init.clip') else
          f"checkpoint {_get(config, 'init.checkpoint')}" if _get(config, 'init.checkpoint')
          else 'from scratch')
  settings['init'] = init
  settings['batch'] = _get(config, 'train.batch_size')
  accum = _get(config, 'train.grad_accum_steps', 1)
  if accum and accum > 1:
    settings['batch'] = f"{settings['batch']} ({accum} accumulation steps)"
  lr = _get(config, 'optim.lr')
  if lr is not None:
    steps = f", {run['total_steps']} steps" if run.get('total_steps') else ''
    settings['schedule'] = (f"{_get(config, 'train.epochs')} epochs{steps}, lr {sci(lr)} "
                            f"(x{_get(config, 'optim.new_lr_multiplier'):g} new parts), "
                            f"{_get(config, 'optim.warmup_epochs'):g} warm-up epochs, cosine to "
                            f"x{_get(config, 'optim.end_lr_ratio'):g}")
  settings['weight decay'] = _get(config, 'optim.weight_decay')
  settings['eval views'] = f"{_get(config, 'eval.num_clips')}x{_get(config, 'eval.num_crops')}"
  for key in ('classes', 'train_clips', 'eval_clips', 'devices'):
    if run.get(key) is not None:
      settings[key.replace('_', ' ')] = run[key]
  return {k: v for k, v in settings.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _time_of(row: Mapping[str, Any]) -> float | None:
  for key in TIME_KEYS:
    value = row.get(key)
    if _finite(value):
      return float(value)
    if isinstance(value, str):
      try:
        return datetime.datetime.fromisoformat(value).timestamp()
      except ValueError:
        continue
  return None


@dataclasses.dataclass
class Evaluation:
  """One evaluation's numbers (from a metrics row) and where its reports are."""
  label: str
  step: int | None
  views: str | None
  top1: float | None
  top5: float | None
  mean_class_acc: float | None
  num_videos: int | None
  reports: Path | None = None


def _evaluation(label: str, row: Mapping[str, Any], prefix: str,
                reports: Path | None = None) -> Evaluation:
  from claver_jax.plots import views_label
  value = lambda key: row.get(f'{prefix}/{key}')
  return Evaluation(label, row.get('step'), views_label(row.get('views')) if row.get('views')
                    else None, value('top1'), value('top5'), value('mean_class_acc'),
                    value('num_videos'), reports)


def _reports(directory: Path) -> Path | None:
  return directory if (directory / 'per_class.json').is_file() else None


def _per_class(directory: Path | None) -> dict[str, Any]:
  if directory is None:
    return {}
  try:
    return json.loads((directory / 'per_class.json').read_text())
  except (OSError, ValueError):
    return {}


def evaluations(workdir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The run's evaluations: 'last' and 'best' (val, by top-1), 'tests' (test/*), 'evals'
  (eval/*), each an Evaluation (or a list of them)."""
  from claver_jax.evaluate import reports_dir
  val = [r for r in rows if _finite(r.get('val/top1'))]
  found: dict[str, Any] = {'last': None, 'best': None, 'tests': [], 'evals': []}
  if val:
    found['last'] = _evaluation('val, last', val[-1], 'val',
                                _reports(reports_dir(workdir, 'latest')))
    best = max(val, key=lambda r: (r['val/top1'], -r['step']))
    best_reports = _reports(reports_dir(workdir, 'best'))
    if best_reports and _per_class(best_reports).get('step') not in (None, best['step']):
      best_reports = None                       # a report of another step: not this one's
    found['best'] = _evaluation('val, best', best, 'val', best_reports)
  for r in rows:
    if _finite(r.get('test/top1')):
      found['tests'].append(_evaluation('test', r, 'test', _reports(reports_dir(workdir, 'test'))))
    if _finite(r.get('eval/top1')):
      views = r.get('views')
      views = views if isinstance(views, str) else None
      directory = reports_dir(workdir, 'eval', step=r['step'], views=views) if views else None
      found['evals'].append(_evaluation('eval run', r, 'eval',
                                        _reports(directory) if directory else None))
  if found['last'] is None and not rows:        # reports without metrics (an older layout)
    legacy = workdir / 'eval'
    if (legacy / 'per_class.json').is_file():
      data = _per_class(legacy)
      found['last'] = Evaluation('val, last', data.get('step'), data.get('views'),
                                 data.get('top1'), data.get('top5'), data.get('mean_class_acc'),
                                 data.get('num_videos'), legacy)
  return found


def throughput(rows: Sequence[Mapping[str, Any]], batch_size: int | None) -> dict[str, Any]:
  """{'wall_s', 'how', 'steps', 'steps_per_s', 'clips_per_s'} from the rows: wall time from their
  timestamps (first to last row) where they have them, else the train loop's time summed from
  train/clips_per_s over the logging intervals; clips/s is the median of train/clips_per_s."""
  train = [r for r in rows if _finite(r.get('train/loss'))]
  if not train:
    return {}
  steps = train[-1]['step']
  out: dict[str, Any] = {'steps': steps}
  rates = [r['train/clips_per_s'] for r in train if _finite(r.get('train/clips_per_s'))]
  if rates:
    out['clips_per_s'] = statistics.median(rates)
  times = [t for t in (_time_of(r) for r in rows) if t is not None]
  if len(times) >= 2:
    out['wall_s'], out['how'] = max(times) - min(times), 'first to last metrics row'
  elif rates and batch_size:
    total, previous = 0.0, 0
    for r in train:
      if _finite(r.get('train/clips_per_s')) and r['train/clips_per_s'] > 0:
        total += (r['step'] - previous) * batch_size / r['train/clips_per_s']
      previous = r['step']
    out['wall_s'], out['how'] = total, 'train loop, from train/clips_per_s'
  if out.get('wall_s'):
    out['steps_per_s'] = steps / out['wall_s']
  return out


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return (f'{hours} h {minutes:02d} min' if hours else f'{minutes} min {secs:02d} s' if minutes
          else f'{secs} s')


def _pct(value: Any) -> str:
  return f'{value:.2f}' if _finite(value) else '–'


# ---------------------------------------------------------------------------------------------
# The report as blocks, rendered as markdown and HTML
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
  title: str
  blocks: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
  summary: list[str] = dataclasses.field(default_factory=list)

  def heading(self, text: str) -> None:
    self.blocks.append(('h2', text))

  def text(self, text: str) -> None:
    self.blocks.append(('p', text))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    self.blocks.append(('table', list(header), [[str(c) for c in r] for r in rows]))

  def figure(self, caption: str, path: Path) -> None:
    if path.is_file():
      self.blocks.append(('figure', caption, path))

  def markdown(self, workdir: Path) -> str:
    out = [f'# {self.title}', '']
    for block in self.blocks:
      if block[0] == 'h2':
        out += [f'## {block[1]}', '']
      elif block[0] == 'p':
        out += [block[1], '']
      elif block[0] == 'table':
        out.append('| ' + ' | '.join(block[1]) + ' |')
        out.append('|' + '---|' * len(block[1]))
        out += ['| ' + ' | '.join(c.replace('|', '\\|') for c in row) + ' |' for row in block[2]]
        out.append('')
      elif block[0] == 'figure':
        out += [f'![{block[1]}]({os.path.relpath(block[2], workdir)})', '']
    return '\n'.join(out)

  def html(self) -> str:
    def inline(text: str) -> str:
      return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(text))

    out = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">',
           f'<title>{html.escape(self.title)}</title>', '<style>',
           'body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}',
           'table{border-collapse:collapse;margin:1em 0}',
           'td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}',
           'img{max-width:100%}', 'code{background:#f4f4f4}', '</style></head><body>',
           f'<h1>{html.escape(self.title)}</h1>']
    for block in self.blocks:
      if block[0] == 'h2':
        out.append(f'<h2>{html.escape(block[1])}</h2>')
      elif block[0] == 'p':
        out.append(f'<p>{inline(block[1])}</p>')
      elif block[0] == 'table':
        out.append('<table><tr>' + ''.join(f'<th>{inline(h)}</th>' for h in block[1]) + '</tr>')
        out += ['<tr>' + ''.join(f'<td>{inline(c)}</td>' for c in row) + '</tr>'
                for row in block[2]]
        out.append('</table>')
      elif block[0] == 'figure':
        data = base64.b64encode(block[2].read_bytes()).decode('ascii')
        out.append(f'<figure><img alt="{html.escape(block[1])}" '
                   f'src="data:image/png;base64,{data}"><figcaption>{html.escape(block[1])}'
                   '</figcaption></figure>')
    out.append('</body></html>')
    return '\n'.join(out) + '\n'


def _paper_row(figure: paper.PaperFigure | None) -> list[str] | None:
  if figure is None:
    return None
  metrics = figure.metrics
  show = lambda k: (paper.format_value(metrics[k]) if k in metrics else '–')
  return [f'paper ({figure.source}, {figure.table})', '', figure.views or 'not stated',
          show('top1'), show('top5'), '–', '']


def _evaluation_row(e: Evaluation) -> list[str]:
  return [e.label, '' if e.step is None else str(e.step), e.views or '', _pct(e.top1),
          _pct(e.top5), _pct(e.mean_class_acc), '' if e.num_videos is None else str(e.num_videos)]


def training_report(workdir: Path, record: Mapping[str, Any],
                    rows: Sequence[Mapping[str, Any]]) -> Report:
  """The report of a training (or evaluation) workdir; also writes WORKDIR/eval/curves.png."""
  from claver_jax import plots
  config, run = record.get('config', {}), record.get('run', {})
  report = Report(f'Run report: {workdir.name}')
  config_file, preset = record.get('config_file'), record.get('preset')
  name = Path(config_file).stem if config_file else None
  total = run.get('total_steps')
  train = [r for r in rows if _finite(r.get('train/loss'))]
  last_step = train[-1]['step'] if train else 0
  if not train:
    state = 'No training steps: an evaluation-only workdir (config.mode=eval).'
  elif total and last_step >= total:
    state = f'Finished: {last_step} of {total} steps.'
  elif total:
    state = (f'Stopped at step {last_step} of {total} ({100 * last_step / total:.0f}%): run the '
             'same command again to resume.')
  else:
    state = f'{last_step} steps logged (the planned total is not recorded).'
  report.text(state)
  if record.get('command'):
    report.text(f"Command: `{record['command']}`")

  report.heading('Config')
  settings = key_settings(config, run)
  report.table(['setting', 'value'], [[k, v] for k, v in settings.items()])

  report.heading('Results')
  found = evaluations(workdir, rows)
  table = [_evaluation_row(e) for e in [found['last'], found['best'], *found['tests'],
                                        *found['evals']] if e is not None]
  figure = paper.expected(name, preset, config) if name else None
  if _paper_row(figure):
    table.append(_paper_row(figure))
  if table:
    report.table(['evaluation', 'step', 'views', 'top-1 (%)', 'top-5 (%)', 'mean class (%)',
                  'videos'], table)
  else:
    report.text('No evaluation yet.')
  if figure is not None:
    report.text(f'The paper\'s figure for `{config_file}{":" + preset if preset else ""}`: '
                f'{figure.describe()}.')
  elif name in ('k400', 'k600', 'ucf101', 'hmdb51'):
    report.text(f'The papers publish no figure for this setting of configs/{name}.py.')
  if found['best'] is not None and (workdir / 'model').exists():
    report.text(f'`{workdir / "model"}` holds the best model (step {found["best"].step}).')

  speed = throughput(rows, _get(config, 'train.batch_size'))
  if speed.get('wall_s'):
    report.heading('Time and throughput')
    report.table(['', ''], [
        ['wall time', f"{duration(speed['wall_s'])} ({speed['how']})"],
        ['steps/s', f"{speed['steps_per_s']:.3g}"],
        ['clips/s (median of train/clips_per_s)', f"{speed.get('clips_per_s', float('nan')):.3g}"]])

  shown = found['best'] or found['last']
  for evaluation in [e for e in (shown, *found['tests']) if e is not None and e.reports]:
    pairs = _per_class(evaluation.reports).get('most_confused', [])[:PAIRS_SHOWN]
    if not pairs:
      continue
    where = f'{evaluation.label}, step {evaluation.step}, {evaluation.views} views'
    report.heading(f'Most-confused pairs ({where})')
    report.table(['true class', 'predicted as', 'videos', '% of the true class'],
                 [[p['true'], p['predicted'], p['count'], f"{p['share']:.1f}"] for p in pairs])

  report.heading('Figures')
  curves = workdir / 'eval' / 'curves.png'
  if train or found['last']:
    curves.parent.mkdir(parents=True, exist_ok=True)
    plots.save_png(plots.curves_figure(rows, title=workdir.name), curves)
    report.figure('training curves: train loss, learning rate, accuracy per evaluation', curves)
  for evaluation in [e for e in (shown, *found['tests'], *found['evals'])
                     if e is not None and e.reports]:
    where = f'{evaluation.label}, step {evaluation.step}'
    report.figure(f'confusion matrix ({where})', evaluation.reports / 'confusion.png')
    report.figure(f'per-class top-1, worst first ({where})', evaluation.reports / 'per_class.png')
    report.figure(f'most-confused pairs ({where})', evaluation.reports / 'confused_pairs.png')

  report.summary = summary_lines(workdir, state, found, figure, train, speed)
  return report


def summary_lines(workdir: Path, state: str, found: Mapping[str, Any],
                  figure: paper.PaperFigure | None, train: Sequence[Mapping[str, Any]],
                  speed: Mapping[str, Any]) -> list[str]:
  """The end-of-run summary, a few lines for the log."""
  lines = [state]
  if speed.get('wall_s'):
    lines.append(f"Time: {duration(speed['wall_s'])} ({speed['how']}), "
                 f"{speed['steps_per_s']:.3g} steps/s, "
                 f"{speed.get('clips_per_s', float('nan')):.3g} clips/s.")
  if train:
    last = train[-1]
    lr = f", lr {sci(last['train/lr'])}" if _finite(last.get('train/lr')) else ''
    lines.append(f"Train loss {last['train/loss']:.4f} at step {last['step']}{lr}.")
  for e in [found.get('last'), found.get('best'), *found.get('tests', []),
            *found.get('evals', [])]:
    if e is not None:
      mean = f', mean class {_pct(e.mean_class_acc)}%' if _finite(e.mean_class_acc) else ''
      lines.append(f'{e.label} ({e.views or "?"} views), step {e.step}: top-1 {_pct(e.top1)}%, '
                   f'top-5 {_pct(e.top5)}%{mean}.')
  if figure is not None:
    lines.append(f'Paper: {figure.describe()}.')
  if (workdir / 'model').exists() and found.get('best') is not None:
    lines.append(f'Best model (step {found["best"].step}): {workdir / "model"}')
  return lines


def zeroshot_report(workdir: Path, record: Mapping[str, Any], results: Mapping[str, Any]
                    ) -> Report:
  """The report of a zero-shot workdir: mean ± std per dataset over its splits, each run,
  the paper's figures for the model evaluated."""
  report = Report(f'Zero-shot report: {workdir.name}')
  checkpoint = results.get('checkpoint')
  views = results.get('views')
  from claver_jax.plots import views_label
  report.text(f'Model: `{checkpoint}`; {results.get("num_frames")} frames, '
              f'{views_label(views)} views.')
  if record.get('command'):
    report.text(f"Command: `{record['command']}`")
  expected = _zeroshot_expected(checkpoint, results.get('num_frames'))
  datasets = results.get('datasets', {})
  rows, lines = [], []
  for dataset, summary in datasets.items():
    metrics = sorted({k[:-len('_mean')] for k in summary if k.endswith('_mean')})
    cells = [f"{summary[f'{m}_mean']:.2f} ± {summary.get(f'{m}_std', float('nan')):.2f}"
             for m in metrics]
    runs = summary.get('runs', {})
    videos = sum(r.get('num_videos', 0) for r in runs.values())
    figure = expected.get(dataset)
    rows.append([dataset, 'mean ± std', str(len(runs)), str(videos),
                 '; '.join(f'{paper.metric_name(m)} {c}' for m, c in zip(metrics, cells)),
                 figure.describe() if figure else '–'])
    for run, r in runs.items():
      numbers = '; '.join(f'{paper.metric_name(k)} {r[k]:.2f}' for k in ('top1', 'top5',
                                                                         'mean_class_acc')
                          if _finite(r.get(k)))
      rows.append(['', run, '', str(r.get('num_videos', '')), numbers, ''])
    lines.append(f'{dataset}: ' + ', '.join(f'{paper.metric_name(m)} {c}'
                                             for m, c in zip(metrics, cells))
                 + (f' (paper: {figure.describe()})' if figure else ''))
  report.heading('Results')
  report.table(['dataset', 'run', 'runs', 'videos', '% (mean ± std over runs)', 'paper'], rows)
  for dataset, why in results.get('skipped', {}).items():
    report.text(f'{dataset}: skipped ({why}).')
  report.heading('Figures')
  for dataset, summary in datasets.items():
    for run in summary.get('runs', {}):
      directory = workdir / 'zeroshot' / dataset / run
      report.figure(f'{dataset} {run}: per-class top-1, worst first', directory / 'per_class.png')
      report.figure(f'{dataset} {run}: most-confused pairs', directory / 'confused_pairs.png')
  report.summary = ['Zero-shot: ' + line for line in lines]
  return report


def _zeroshot_expected(checkpoint: str | None, frames: int | None) -> dict[str, Any]:
  """The paper's zero-shot figures for the model directory evaluated (its family, head and
  architecture), {} when it cannot be read or is not the paper's."""
  if not checkpoint:
    return {}
  try:
    from claver_jax.models.clip import PRESET_ALIASES, PRESETS
    from claver_jax.models.io import read_model_config
    kind, cfg, _ = read_model_config(checkpoint)
  except (OSError, ValueError):
    return {}
  clip = cfg if kind == 'clip' else cfg.clip
  arch = next((alias for alias, name in PRESET_ALIASES.items()
               if all(getattr(PRESETS[name], f) == getattr(clip, f)
                      for f in ('patch_size', 'vision_width', 'vision_layers', 'image_size'))),
              None)
  return paper.expected_zeroshot(kind, getattr(cfg, 'temporal', None), arch, frames)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
class ReportError(ValueError):
  """A directory with nothing to report on."""


def build(workdir: str | os.PathLike) -> Report:
  """The report of WORKDIR (see the module docstring); writes WORKDIR/eval/curves.png."""
  from claver_jax.metrics import read_metrics
  workdir = run_path(workdir)
  if not workdir.is_dir():
    raise ReportError(f'{workdir} is not a directory; pass a run\'s workdir.')
  record = read_run_config(workdir)
  if (workdir / 'zeroshot.json').is_file():
    return zeroshot_report(workdir, record, json.loads((workdir / 'zeroshot.json').read_text()))
  metrics = workdir / 'metrics.jsonl'
  rows = read_metrics(workdir) if metrics.is_file() else []
  if not rows and not record:
    raise ReportError(f'{workdir} has no metrics.jsonl, config.json or zeroshot.json: it is not '
                      'the workdir of a run (python -m claver_jax.main --workdir=...).')
  return training_report(workdir, record, rows)


def write(workdir: str | os.PathLike) -> Report:
  """Writes WORKDIR/report.md and WORKDIR/report.html (each atomically); returns the report."""
  workdir = run_path(workdir)
  report = build(workdir)
  atomic_write_text(workdir / 'report.md', report.markdown(workdir))
  atomic_write_text(workdir / 'report.html', report.html())
  return report


def summary_text(report: Report, workdir: str | os.PathLike) -> str:
  """The end-of-run summary: the report's summary lines and where the report is."""
  workdir = run_path(workdir)
  return '\n'.join([*report.summary,
                    f'Report: {workdir / "report.md"} (with figures: {workdir / "report.html"})'])


def write_and_log(workdir: str | os.PathLike) -> None:
  """The end of a run: the report written and its summary logged; a report that fails is a
  warning (the run's results are already saved), never the run's failure."""
  try:
    report = write(workdir)
  except Exception as e:  # noqa: BLE001 (reporting must not fail a finished run)
    logging.warning('Could not write the run report of %s: %s: %s. Run `python -m '
                    'claver_jax.report %s` to retry.', workdir, type(e).__name__, e, workdir)
    return
  logging.info('End of run.\n  %s', summary_text(report, workdir).replace('\n', '\n  '))


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """'train/loss 0.5123, train/lr 1.00e-05, val/top1 92.25, views 1x1': each number at a
  precision that suits it (learning rates in scientific notation)."""
  parts = []
  for key, value in metrics.items():
    if isinstance(value, float):
      text = (sci(value) if key.endswith('/lr') else f'{value:.4f}' if key.endswith('loss')
              else f'{value:.2f}' if '/top' in key or key.endswith('acc') or key.endswith('_s')
              else f'{value:.4g}')
    else:
      text = str(value)
    parts.append(f'{key} {text}')
  return ', '.join(parts)


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 1 or argv[0].startswith('-'):
    sys.exit('usage: python -m claver_jax.report WORKDIR')
  try:
    report = write(argv[0])
  except (ReportError, ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  print(summary_text(report, argv[0]))


if __name__ == '__main__':
  main()
