"""Evaluation: class scores from a model's class logits, accuracy, per-class results.

Protocol (the paper's): for each view of a video and each description set a, softmax over the
C classes; mean over the A sets; sum over the V views. Top-k counts a video as correct when its
label is among its k best classes, over all videos (the official code divides by A: wrong).
The logits come from the model family's `class_logits` (see claver_jax.models.families).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from claver_jax.fileio import atomic_write_text


def encode_texts(encode_text, tokens: np.ndarray, chunk: int = 512) -> jax.Array:
  """tokens int32 [A, C, S] -> embeddings [A, C, E] as `encode_text` gives them (projected, not
  normalised), `chunk` texts at a time."""
  a, c, s = tokens.shape
  flat = tokens.reshape(a * c, s)
  parts = [encode_text(flat[i:i + chunk]) for i in range(0, a * c, chunk)]
  return jnp.concatenate(parts).reshape(a, c, -1)


def class_scores(logits: jax.Array) -> jax.Array:
  """logits [A, B, V, C] (description set, video, view, class) -> scores [B, C]."""
  return jax.nn.softmax(logits, axis=-1).mean(axis=0).sum(axis=1)


def view_scores(model, video: jax.Array, text: jax.Array) -> jax.Array:
  """Normalised video [B, V, T, H, W, 3] (V views of each of B videos), text [A, C, E] from
  `encode_texts` -> scores [B, C], through the model's family interface."""
  b, v = video.shape[:2]
  logits = model.class_logits(model.video_features(video.reshape(b * v, *video.shape[2:])), text)
  return class_scores(logits.reshape(logits.shape[0], b, v, -1))


def parse_views(views: str) -> tuple[int, int]:
  """'4x3' -> (4 temporal clips, 3 spatial crops): config.eval.final_views."""
  clips, _, crops = views.partition('x')
  if not (clips.isdigit() and crops.isdigit() and int(clips) > 0 and int(crops) > 0):
    raise ValueError(f"views={views!r}: write CLIPSxCROPS, e.g. '4x3' (the paper's test), or '' "
                     'for none.')
  return int(clips), int(crops)


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """bool [N]: the label is among the k highest scores (ties broken by class order)."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return (top == labels[:, None]).any(axis=1)


def summarize(scores: np.ndarray, labels: np.ndarray,
              class_names: Sequence[str]) -> dict[str, Any]:
  """Top-1/top-5 in percent over all N videos, per-class top-1, and the confusion matrix."""
  num_classes = len(class_names)
  predicted = scores.argmax(axis=1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  support = confusion.sum(axis=1)
  per_class = {name: (100.0 * confusion[i, i] / support[i] if support[i] else None)
               for i, name in enumerate(class_names)}
  return {'top1': 100.0 * float(topk_correct(scores, labels, 1).mean()),
          'top5': 100.0 * float(topk_correct(scores, labels, 5).mean()),
          'num_videos': int(len(labels)), 'per_class_top1': per_class, 'confusion': confusion}


def write_reports(summary: dict[str, Any], class_names: Sequence[str],
                  directory: str | os.PathLike) -> None:
  """DIR/per_class.json and DIR/confusion.png (rows: true class, columns: predicted)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  report = {k: v for k, v in summary.items() if k != 'confusion'}
  report['confusion'] = summary['confusion'].tolist()
  report['class_names'] = list(class_names)
  atomic_write_text(directory / 'per_class.json', json.dumps(report, indent=1) + '\n')
  confusion_png(summary['confusion'], class_names, directory / 'confusion.png')


def confusion_png(confusion: np.ndarray, class_names: Sequence[str],
                  path: str | os.PathLike) -> None:
  """A row-normalised confusion matrix as an image; class names drawn when there are few."""
  from PIL import Image, ImageDraw
  num = len(class_names)
  rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  cell = max(1, min(24, 960 // max(num, 1)))
  heat = (255 * (1 - rows)).astype(np.uint8)                  # white = 0, black = the whole row
  grid = np.kron(heat, np.ones((cell, cell), np.uint8))
  labelled = num <= 40
  left = 8 + 7 * max((len(n) for n in class_names), default=0) if labelled else 0
  top = 16                                                     # one line of caption
  image = Image.new('L', (max(left + grid.shape[1] + 2, 260), top + grid.shape[0] + 2), 255)
  image.paste(Image.fromarray(grid), (left + 1, top + 1))
  draw = ImageDraw.Draw(image)
  draw.rectangle([left, top, left + grid.shape[1] + 1, top + grid.shape[0] + 1], outline=0)
  draw.text((2, 2), 'rows: true class, columns: predicted (row-normalised)', fill=0)
  if labelled:
    for i, name in enumerate(class_names):
      draw.text((2, top + 1 + i * cell + max(cell // 2 - 5, 0)), name, fill=0)
  tmp = Path(path).with_suffix('.tmp.png')
  image.save(tmp)
  os.replace(tmp, path)
