"""Figures (read back), the paper's figures per preset, the run report and the end-of-run summary,
TensorBoard's config, hparams and images. The report of real runs (finished, stopped, eval-only,
zero-shot) is checked in test_train.py and test_protocols.py."""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest
from PIL import Image

from claver_jax import evaluate, paper, plots, report
from claver_jax.metrics import MetricWriter
from conftest import REPO

NAMES = ['walking', 'running', 'jumping', 'swimming', 'climbing a very tall ladder slowly']


def load_config(name: str, arg: str | None = None) -> dict:
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg).to_dict()


def summary_of(num_classes: int, seed: int = 0, videos_per_class: int = 8):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), videos_per_class)
  scores = rng.random((len(labels), num_classes))
  scores[np.arange(len(labels)), labels] += rng.random(len(labels))   # mostly right
  names = NAMES if num_classes == len(NAMES) else [f'class {i}' for i in range(num_classes)]
  return evaluate.summarize(scores, labels, names), names


def read_png(path) -> np.ndarray:
  image = np.asarray(Image.open(path).convert('RGB'))
  assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50, 'blank image'
  return image


# ------------------------------------------------------------------------------- figures
def test_a_small_class_set_gets_a_labelled_confusion_matrix_with_counts(tmp_path):
  summary, names = summary_of(5)
  figures = evaluate.write_reports(summary, names, tmp_path, step=40, views='4x3',
                                   title='val, step 40')
  confusion = figures['confusion']
  matrix_axes, colour_axes = confusion.axes                        # the matrix and a colour bar
  shown = [plots.short_name(n) for n in NAMES]
  assert shown[-1] == 'climbing a very tall ladder slo…'           # long names cut
  assert [t.get_text() for t in matrix_axes.get_xticklabels()] == shown
  assert [t.get_text() for t in matrix_axes.get_yticklabels()] == shown
  assert (matrix_axes.get_xlabel(), matrix_axes.get_ylabel()) == ('predicted class', 'true class')
  assert colour_axes.get_ylabel() == '% of the true class'
  assert matrix_axes.get_title() == (f'val, step 40, 4x3 views: top-1 {summary["top1"]:.2f}% '
                                     f'over 40 videos')
  counts = sorted(int(t.get_text()) for t in matrix_axes.texts)   # one count per non-empty cell
  assert counts == sorted(int(c) for c in summary['confusion'].ravel() if c)
  width, height = (confusion.get_size_inches() * confusion.dpi).round().astype(int)
  assert read_png(tmp_path / 'confusion.png').shape == (height, width, 3)
  per_class = figures['per_class'].axes[0]
  shown = [t.get_text() for t in per_class.get_yticklabels()]
  worst_first = sorted(summary['per_class_top1'], key=lambda n: summary['per_class_top1'][n])
  assert shown == [plots.short_name(n) for n in worst_first]
  read_png(tmp_path / 'per_class.png')
  read_png(tmp_path / 'confused_pairs.png')
  saved = json.loads((tmp_path / 'per_class.json').read_text())
  assert (saved['step'], saved['views'], saved['top1']) == (40, '4x3', summary['top1'])
  assert saved['mean_class_acc'] == pytest.approx(np.mean(list(summary['per_class_top1'].values())))
  top = saved['most_confused'][0]
  off = summary['confusion'] - np.diag(np.diag(summary['confusion']))
  assert top['count'] == off.max()


def test_a_kinetics_sized_class_set_stays_readable():
  """400 classes: an unlabelled matrix (class ids on the axes), the 40 worst classes by name
  beside the sorted profile of all, and the most-confused pairs by count."""
  summary, names = summary_of(400, videos_per_class=3)
  figure = plots.confusion_figure(summary['confusion'], names, title='k400')
  labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
  assert not set(labels) & set(names) and len(labels) <= 10
  per_class = plots.per_class_figure(summary['per_class_top1'], title='per-class top-1')
  bars, profile = per_class.axes
  assert len(bars.get_yticklabels()) == plots.BARS_SHOWN
  worst = min(summary['per_class_top1'].values())
  assert bars.patches[0].get_width() == pytest.approx(worst)
  assert len(profile.lines[0].get_xdata()) == 400
  pairs = plots.most_confused(summary['confusion'], names, k=20)
  assert [p['count'] for p in pairs] == sorted((p['count'] for p in pairs), reverse=True)
  assert plots.to_rgb(figure).shape[2] == 3


def test_training_curves_are_one_figure_of_loss_lr_and_accuracy(tmp_path):
  rows = ([{'step': s, 'train/loss': 3 / s, 'train/lr': 1.2e-5 * min(1, s / 20)}
           for s in range(1, 101)] +
          [{'step': s, 'val/top1': s / 2, 'val/top5': s / 1.5, 'views': '1x1'} for s in (50, 100)]
          + [{'step': 100, 'test/top1': 55.0, 'test/top5': 70.0, 'views': '4x3'}])
  figure = plots.curves_figure(rows, title='run')
  loss, lr, accuracy = figure.axes
  assert [ax.get_title() for ax in figure.axes] == ['train loss', 'learning rate', 'accuracy (%)']
  assert len(loss.lines[0].get_xdata()) == 100
  plots.save_png(figure, tmp_path / 'curves.png')
  read_png(tmp_path / 'curves.png')
  assert lr.yaxis.get_offset_text().get_text().replace('\u2212', '-') == '1e-5'  # sci notation
  legend = [t.get_text() for t in accuracy.get_legend().get_texts()]
  assert legend == ['val top1', 'test top1 (4x3 views)', 'val top5', 'test top5 (4x3 views)']


# ------------------------------------------------------------------------------- the paper
def test_the_paper_figure_of_each_preset():
  _, k400 = load_config('k400', 'B16,8,kmt')
  figure = paper.expected('k400', 'B16,8,kmt', k400)
  assert (figure.table, figure.metrics, figure.views) == ('Table 1', {'top1': 84.3, 'top5': 96.3},
                                                          '4x3')
  assert paper.expected('k400', 'kmct,16,L14_336', load_config('k400', 'kmct,16,L14_336')[1]
                        ).metrics['top1'] == 88.9
  pretrain = load_config('k400', 'B16,32,pretrain')[1]
  assert paper.expected('k400', 'B16,32,pretrain', pretrain) is None
  assert paper.expected('k400', 'B16,32', load_config('k400', 'B16,32')[1]) is None  # unpublished
  assert paper.expected('k400', 'B16,8,xclip', load_config('k400', 'B16,8,xclip')[1]
                        ).metrics == {'top1': 83.8, 'top5': 95.7}
  assert paper.expected('k600', 'B16,8,kmt', load_config('k600', 'B16,8,kmt')[1]).table == 'Table 2'
  few = paper.expected('ucf101', 'shots=2', load_config('ucf101', 'shots=2')[1])
  assert (few.table, few.metrics) == ('Table 3', {'top1': 89.7})
  assert paper.expected('hmdb51', 'shots=16,kmct', load_config('hmdb51', 'shots=16,kmct')[1]
                        ).metrics == {'top1': 72.9}
  assert paper.expected('ucf101', 'shots=2,from_clip',
                        load_config('ucf101', 'shots=2,from_clip')[1]) is None
  assert paper.expected('ucf101', 'full', load_config('ucf101', 'full')[1]) is None
  overridden = {**k400, 'data': {**k400['data'], 'num_frames': 32}}
  assert paper.expected('k400', 'B16,8,kmt', overridden) is None          # the config decides
  zero = paper.expected_zeroshot('claver', 'kmt', 'B16', 32)
  assert zero['k600'].metrics == {'top1': (73.8, 0.6), 'top5': (93.1, 0.6)}
  assert paper.expected_zeroshot('claver', 'kmt', 'B16', 8) == {}


def test_the_configs_docstrings_quote_the_table():
  """One table (claver_jax/paper.py); the configs' docstrings quote it for their readers."""
  for name, preset, figure in paper.all_figures():
    module, _ = load_config(name)
    for value in figure.metrics.values():
      number = value[0] if isinstance(value, tuple) else value
      assert f'{number}' in module.__doc__, (name, preset, number)


# ------------------------------------------------------------------------------- the report
def fake_run(workdir, *, total_steps: int, last_step: int, test: bool):
  """A k400 B16,8,kmt workdir as a run leaves it: config.json, metrics rows, eval reports."""
  _, config = load_config('k400', 'B16,8,kmt')
  workdir.mkdir()
  report.write_run_config(workdir, config, {'total_steps': total_steps, 'classes': 5},
                          argv=['claver_jax/main.py', '--config=configs/k400.py:B16,8,kmt',
                                f'--workdir={workdir}'])
  rows = [{'step': s, 'train/loss': 5 / s, 'train/lr': 1.2e-5, 'train/clips_per_s': 100.0}
          for s in range(10, last_step + 1, 10)]
  summaries = {}
  for step, seed in ((last_step // 2, 1), (last_step, 2)):
    summary, names = summary_of(5, seed)
    summaries[step] = summary
    rows.append({'step': step, **evaluate.eval_row('val', summary, '1x1')})
    evaluate.write_reports(summary, names, evaluate.reports_dir(workdir, 'latest'), step=step,
                           views='1x1')
  best = max(summaries, key=lambda s: summaries[s]['top1'])
  evaluate.write_reports(summaries[best], names, evaluate.reports_dir(workdir, 'best'), step=best,
                         views='1x1')
  if test:
    summary, _ = summary_of(5, 3)
    rows.append({'step': last_step, **evaluate.eval_row('test', summary, '4x3')})
    evaluate.write_reports(summary, names, evaluate.reports_dir(workdir, 'test'), step=last_step,
                           views='4x3')
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return rows, summaries, best


def test_the_report_of_a_paper_preset(tmp_path):
  """Settings, last and best 1-view numbers, the multi-view test, the paper's figure for the
  preset, throughput, the most-confused pairs and the figures (inline in the HTML)."""
  workdir = tmp_path / 'k400_b16_8'
  rows, summaries, best = fake_run(workdir, total_steps=100, last_step=100, test=True)
  written = report.write(workdir)
  text = (workdir / 'report.md').read_text()
  assert 'Finished: 100 of 100 steps.' in text
  assert '`python -m claver_jax.main --config=configs/k400.py:B16,8,kmt' in text
  assert '| architecture | B16 |' in text and '| frames | 8 |' in text
  assert '| towers trained | image, text |' in text and '| towers frozen | none |' in text
  assert "prompts 'kinetics400'" in text
  assert f'| val, last | 100 | 1x1 | {summaries[100]["top1"]:.2f} |' in text
  assert f'| val, best | {best} | 1x1 | {summaries[best]["top1"]:.2f} |' in text
  test = [r for r in rows if 'test/top1' in r][0]
  assert f'| test | 100 | 4x3 | {test["test/top1"]:.2f} | {test["test/top5"]:.2f} |' in text
  assert '| paper (CLAVER paper, Table 1) |  | 4x3 | 84.3 | 96.3 |' in text
  assert 'CLAVER-B/16 (KMT), 8 frames, Kinetics-400' in text
  assert '## Most-confused pairs (val, best' in text and '## Most-confused pairs (test' in text
  # 100 steps x 256 clips (the preset's batch) at 100 clips/s
  assert '| wall time | 4 min 16 s (train loop, from train/clips_per_s) |' in text
  figures = text.count('![')
  assert figures == 7 and (workdir / 'eval' / 'curves.png').is_file()
  assert (workdir / 'report.html').read_text().count('src="data:image/png;base64,') == figures
  summary = report.summary_text(written, workdir)
  assert 'lr 1.20e-05' in summary
  assert f'test (4x3 views), step 100: top-1 {test["test/top1"]:.2f}%' in summary
  assert 'Paper: top-1 84.3, top-5 96.3 (CLAVER paper, Table 1' in summary


@pytest.mark.slow
def test_the_report_of_a_stopped_run_without_a_test(tmp_path):
  workdir = tmp_path / 'stopped'
  fake_run(workdir, total_steps=400, last_step=100, test=False)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for i, row in enumerate(rows):                      # rows with wall-clock times
    row['time'] = 1_700_000_000 + 30 * i
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  report.write(workdir)
  text = (workdir / 'report.md').read_text()
  assert 'Stopped at step 100 of 400 (25%): run the same command again to resume.' in text
  assert '| test |' not in text and '| paper (CLAVER paper, Table 1) |' in text
  wall = report.duration(30 * (len(rows) - 1))
  assert f'| wall time | {wall} (first to last metrics row) |' in text


def test_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path)])
  assert 'is not the workdir of a run' in str(exit_info.value)
  assert len(str(exit_info.value).splitlines()) == 1


def test_end_of_run_numbers_have_sensible_precision():
  line = report.format_metrics({'train/loss': 0.512345, 'train/lr': 1.2e-5, 'val/top1': 92.251,
                                'views': '1x1', 'data/eval_substituted': 0})
  assert line == ('train/loss 0.5123, train/lr 1.20e-05, val/top1 92.25, views 1x1, '
                  'data/eval_substituted 0')


# ------------------------------------------------------------------------------- TensorBoard
def read_events(path) -> list:
  from tensorboardX.proto import event_pb2
  data, offset, events = path.read_bytes(), 0, []
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_tensorboard_gets_the_config_hparams_and_figures(tmp_path):
  _, config = load_config('k400', 'B16,8,kmt')
  writer = MetricWriter(tmp_path)
  writer.write_config(config, report.key_settings(config), ('val/top1',))
  figure = plots.curves_figure([{'step': 1, 'train/loss': 1.0}])
  writer.write_figures(5, {'train/curves': figure})
  writer.write(5, {'val/top1': 50.0, 'views': '1x1'})
  writer.close()
  (events,) = tmp_path.glob('events.out.tfevents.*')
  values = {v.tag: (e.step, v) for e in read_events(events) for v in e.summary.value}
  assert {'config/text_summary', '_hparams_/experiment', '_hparams_/session_start_info',
          'train/curves', 'val/top1'} <= set(values)
  assert 'views' not in values                                    # strings stay in the JSONL
  step, image = values['train/curves']
  width, height = (figure.get_size_inches() * figure.dpi).round().astype(int)
  assert step == 5 and (image.image.width, image.image.height) == (width, height)
  text = values['config/text_summary'][1].tensor.string_val[0].decode()
  assert '"batch_size": 256' in text
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  start = HParamsPluginData.FromString(
      values['_hparams_/session_start_info'][1].metadata.plugin_data.content).session_start_info
  assert start.hparams['architecture'].string_value == 'B16'
  assert start.hparams['frames'].number_value == 8
