"""The figures a run reports, drawn with matplotlib (Agg, no display): confusion matrix, per-class
top-1, most-confused pairs, training curves.

Each `*_figure` function returns a `matplotlib.figure.Figure` (no pyplot, no global state);
`save_png` writes one atomically (temporary file + rename) and `to_rgb` gives the uint8 [H, W, 3]
pixels TensorBoard takes. Class sets of up to LABELLED_CLASSES classes get their names on both
axes of the confusion matrix (and counts in the cells up to COUNTED_CLASSES); larger ones (400,
600) an unlabelled matrix, with the most-confused pairs as their own chart.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LABELLED_CLASSES = 60    # Class names on the confusion matrix's axes up to this many classes.
COUNTED_CLASSES = 20     # Counts written in its cells up to this many.
BARS_SHOWN = 40          # Per-class chart: every class up to this many, else the worst ones.
DPI = 100


# ---------------------------------------------------------------------------------------------
# Writing figures
# ---------------------------------------------------------------------------------------------
def png_bytes(figure: Figure) -> bytes:
  buffer = io.BytesIO()
  FigureCanvasAgg(figure).print_png(buffer)
  return buffer.getvalue()


def save_png(figure: Figure, path: str | os.PathLike) -> None:
  """Writes the figure as PNG to `path` (local: a temporary renamed over it; gs://: one upload)."""
  from claver_jax.fileio import atomic_write_bytes
  atomic_write_bytes(path, png_bytes(figure))


def to_rgb(figure: Figure) -> np.ndarray:
  """uint8 [H, W, 3]: the figure rendered, for TensorBoard images."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def short_name(name: str, width: int = 32) -> str:
  """A class name as the figures' axes show it: at most `width` characters."""
  return name if len(name) <= width else name[:width - 1] + '…'


# ---------------------------------------------------------------------------------------------
# Confusion
# ---------------------------------------------------------------------------------------------
def most_confused(confusion: np.ndarray, class_names: Sequence[str], k: int = 20
                  ) -> list[dict[str, Any]]:
  """The k largest off-diagonal cells of confusion [C, C] (rows: true, columns: predicted), most
  first: [{'true', 'predicted', 'count', 'share'}], share = percent of the true class's videos."""
  off = confusion.astype(np.int64).copy()
  np.fill_diagonal(off, 0)
  support = confusion.sum(axis=1)
  shares = off / np.maximum(support, 1)[:, None]
  flat = np.lexsort((-shares.ravel(), -off.ravel()))[:k]       # by count, then by share
  pairs = []
  for index in flat:
    i, j = divmod(int(index), confusion.shape[1])
    if off[i, j] == 0:
      break
    pairs.append({'true': class_names[i], 'predicted': class_names[j], 'count': int(off[i, j]),
                  'share': 100.0 * off[i, j] / max(int(support[i]), 1)})
  return pairs


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], *, title: str) -> Figure:
  """confusion int [C, C] (rows: true class, columns: predicted) as a heat map of each row's
  share (percent of that true class; a square-root colour scale when unlabelled), a colour bar,
  `title` on top. Up to LABELLED_CLASSES classes
  both axes carry the class names, up to COUNTED_CLASSES the cells their counts; beyond, the axes
  carry class ids."""
  num = len(class_names)
  shares = 100.0 * confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  labelled = num <= LABELLED_CLASSES
  longest = max((len(short_name(n)) for n in class_names), default=1) if labelled else 4
  side = min(max(4.0, 0.28 * num), 16.0) if labelled else 10.0
  margin = 0.5 + 0.075 * longest                                   # inches for the names
  figure = Figure(figsize=(side + margin + 1.6, side + margin + 0.6), dpi=DPI)
  ax = figure.add_axes((margin / (side + margin + 1.6), margin / (side + margin + 0.6),
                        side / (side + margin + 1.6), side / (side + margin + 0.6)))
  # Unlabelled (large) matrices: a square-root scale, so that the off-diagonal mass shows.
  norm = Normalize(0, 100) if labelled else PowerNorm(0.5, vmin=0, vmax=100)
  image = ax.imshow(shares, cmap='Blues', norm=norm, interpolation='nearest', aspect='equal')
  colour_axes = figure.add_axes(((margin + side + 0.25) / (side + margin + 1.6),
                                 margin / (side + margin + 0.6), 0.25 / (side + margin + 1.6),
                                 side / (side + margin + 0.6)))
  figure.colorbar(image, cax=colour_axes, label='% of the true class')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title, fontsize=10)
  if labelled:
    font = 8 if num <= 30 else 6
    names = [short_name(n) for n in class_names]
    ax.set_xticks(range(num), names, rotation=90, fontsize=font)
    ax.set_yticks(range(num), names, fontsize=font)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(8, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(8, integer=True))
  if num <= COUNTED_CLASSES:
    for (i, j), count in np.ndenumerate(confusion):
      if count:
        ax.text(j, i, str(int(count)), ha='center', va='center', fontsize=7,
                color='white' if shares[i, j] > 50 else 'black')
  return figure


def confused_pairs_figure(pairs: Sequence[Mapping[str, Any]], *, title: str) -> Figure:
  """The most-confused pairs (from `most_confused`) as horizontal bars of their video counts,
  most confused on top, each labelled with its share of the true class."""
  labels = ([f'{short_name(p["true"])} → {short_name(p["predicted"])}' for p in pairs]
            or ['(none)'])
  counts = [p['count'] for p in pairs] or [0]
  figure = Figure(figsize=(9, 1.2 + 0.3 * len(labels)), dpi=DPI)
  ax = figure.add_subplot()
  bars = ax.barh(range(len(labels)), counts, color='tab:red')
  ax.bar_label(bars, labels=[f'{p["share"]:.0f}%' for p in pairs] or [''], padding=2,
               fontsize=7)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.invert_yaxis()
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel('videos of the true class predicted as the other (label: % of the true class)')
  ax.set_title(title, fontsize=10)
  figure.tight_layout()
  return figure


def per_class_figure(per_class_top1: Mapping[str, float | None], *, title: str) -> Figure:
  """Per-class top-1 as horizontal bars, worst first (on top). Up to BARS_SHOWN classes all are
  shown; beyond, the BARS_SHOWN worst, beside a profile of every class's top-1, sorted."""
  scored = sorted(((v, n) for n, v in per_class_top1.items() if v is not None))
  shown = scored[:BARS_SHOWN]
  many = len(scored) > BARS_SHOWN
  height = 1.4 + 0.24 * max(len(shown), 1)
  figure = Figure(figsize=(13 if many else 8, height), dpi=DPI)
  ax = figure.add_subplot(1, 2, 1) if many else figure.add_subplot()
  values = [v for v, _ in shown]
  bars = ax.barh(range(len(shown)), values, color=[_colour(v) for v in values])
  ax.bar_label(bars, fmt='%.0f', padding=2, fontsize=7)
  ax.set_yticks(range(len(shown)), [short_name(n) for _, n in shown], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 100)
  ax.set_xlabel('top-1 (%)')
  ax.set_title(f'{title}: the {len(shown)} worst of {len(scored)} classes' if many else title,
               fontsize=10)
  if many:
    profile = figure.add_subplot(1, 2, 2)
    everything = [v for v, _ in scored]
    profile.plot(range(1, len(everything) + 1), everything, color='tab:blue')
    profile.axhline(float(np.mean(everything)), color='gray', linestyle='--',
                    label=f'mean class accuracy {np.mean(everything):.1f}%')
    profile.set_ylim(0, 100)
    profile.set_xlabel('classes, worst to best')
    profile.set_ylabel('top-1 (%)')
    profile.set_title(f'every class ({len(everything)}), sorted', fontsize=10)
    profile.legend(loc='lower right', fontsize=8)
  figure.tight_layout()
  return figure


def _colour(value: float) -> str:
  return 'tab:red' if value < 50 else 'tab:orange' if value < 80 else 'tab:green'


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------
def curves_figure(rows: Sequence[Mapping[str, Any]], *, title: str = '') -> Figure:
  """metrics.jsonl rows -> one figure of three panels: train loss, learning rate, and val top-1 /
  top-5 per evaluation, with the multi-view test (test/*) and eval runs (eval/*) as points."""
  def series(key):
    points = [(r['step'], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]

  figure = Figure(figsize=(15, 4), dpi=DPI)
  loss_ax, lr_ax, acc_ax = figure.subplots(1, 3)
  steps, loss = series('train/loss')
  loss_ax.plot(steps, loss, color='tab:blue', linewidth=1)
  loss_ax.set_title('train loss', fontsize=10)
  steps, lr = series('train/lr')
  lr_ax.plot(steps, lr, color='tab:purple', linewidth=1)
  lr_ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
  lr_ax.set_title('learning rate', fontsize=10)
  for key, colour in (('top1', 'tab:green'), ('top5', 'tab:olive')):
    steps, acc = series(f'val/{key}')
    acc_ax.plot(steps, acc, marker='o', markersize=3, color=colour, label=f'val {key}')
    for prefix, marker in (('test', '*'), ('eval', 's')):
      for r in rows:
        if isinstance(r.get(f'{prefix}/{key}'), (int, float)):
          acc_ax.plot([r['step']], [r[f'{prefix}/{key}']], marker=marker, markersize=9,
                      color=colour, linestyle='none',
                      label=f'{prefix} {key} ({views_label(r.get("views"))} views)')
  handles, labels = acc_ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  if unique:
    acc_ax.legend(unique.values(), unique.keys(), fontsize=8, loc='lower right')
  acc_ax.set_title('accuracy (%)', fontsize=10)
  for ax in (loss_ax, lr_ax, acc_ax):
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  if title:
    figure.suptitle(title, fontsize=11)
  figure.tight_layout()
  return figure


def views_label(views: Any) -> str:
  """'4x3' as a row records it (a string, or [clips, crops])."""
  if isinstance(views, (list, tuple)) and len(views) == 2:
    return f'{views[0]}x{views[1]}'
  return str(views) if views else '?'
