"""Evaluation: class scores from a model's class logits, accuracy, per-class results.

Protocol (the paper's): for each view of a video and each description set a, softmax over the
C classes; mean over the A sets; sum over the V views. Top-k counts a video as correct when its
label is among its k best classes, over all videos (the official code divides by A: wrong).
The logits come from the model family's `class_logits` (see claver_jax.models.families).

On the devices (`make_eval_fns`, `run_eval`): jitted functions of the MODEL state alone
(`nnx.split(model)`'s; the train loop passes the model part of its (model, optimizer) state, the
same arrays, sharded as it holds them): the texts encoded split over the devices
(`encode_texts_sharded`), then one pass over the eval split whose scores stay on the devices
until one gather at its end.

Reports (`write_reports`, process 0) go to `reports_dir(WORKDIR, kind)`: WORKDIR/eval/latest/
and WORKDIR/eval/best/ (training's periodic evaluations: the last one, and the best by val
top-1), WORKDIR/eval/test/ (the multi-view test at the end of training) and
WORKDIR/eval/step<S>_<views>/ (a config.mode=eval run, e.g. step1650_4x3). Each holds
per_class.json (with its step and views), confusion.png, per_class.png, confused_pairs.png and,
with config.eval.dump_scores, scores.npz (`dump_scores`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx
from jax.experimental import multihost_utils

from claver_jax import aot, distributed, sharding
from claver_jax.data import make_global_batch
from claver_jax.data.labels import DataError
from claver_jax.data.transforms import normalize
from claver_jax.fileio import atomic_write_bytes, atomic_write_text, run_path

TEXTS_PER_DEVICE = 512     # Texts each device encodes per call in evaluation.


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


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """bool [N]: the label is among the k highest scores (ties broken by class order)."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return (top == labels[:, None]).any(axis=1)


def summarize(scores: np.ndarray, labels: np.ndarray,
              class_names: Sequence[str]) -> dict[str, Any]:
  """Top-1/top-5 in percent over all N videos, the mean class accuracy (the mean of the per-class
  top-1 over the classes that have videos), per-class top-1 and the confusion matrix."""
  num_classes = len(class_names)
  predicted = scores.argmax(axis=1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  support = confusion.sum(axis=1)
  per_class = {name: (100.0 * confusion[i, i] / support[i] if support[i] else None)
               for i, name in enumerate(class_names)}
  present = [v for v in per_class.values() if v is not None]
  return {'top1': 100.0 * float(topk_correct(scores, labels, 1).mean()),
          'top5': 100.0 * float(topk_correct(scores, labels, 5).mean()),
          'mean_class_acc': float(np.mean(present)) if present else float('nan'),
          'num_videos': int(len(labels)), 'per_class_top1': per_class, 'confusion': confusion}


def views_name(num_clips: int, num_crops: int) -> str:
  """'4x3': the views of an evaluation, as every eval row and report records them."""
  return f'{num_clips}x{num_crops}'


def eval_row(prefix: str, summary: dict[str, Any], views: str) -> dict[str, Any]:
  """The metrics.jsonl / TensorBoard fields of one evaluation: PREFIX/top1, PREFIX/top5,
  PREFIX/mean_class_acc, PREFIX/num_videos and its views. Prefixes: 'val' (the periodic
  evaluations of training), 'test' (the multi-view test at its end), 'eval' (config.mode=eval)."""
  return {f'{prefix}/top1': summary['top1'], f'{prefix}/top5': summary['top5'],
          f'{prefix}/mean_class_acc': summary['mean_class_acc'],
          f'{prefix}/num_videos': summary['num_videos'], 'views': views}


REPORT_KINDS = ('latest', 'best', 'test', 'eval')


def reports_dir(workdir: str | os.PathLike, kind: str, *, step: int | None = None,
                views: str | None = None) -> Path:
  """Where an evaluation's reports go (see the module docstring)."""
  if kind not in REPORT_KINDS:
    raise ValueError(f'Unknown report kind {kind!r}; one of {list(REPORT_KINDS)}.')
  name = f'step{step}_{views}' if kind == 'eval' else kind
  return run_path(workdir) / 'eval' / name


def write_reports(summary: dict[str, Any], class_names: Sequence[str],
                  directory: str | os.PathLike, *, step: int | None = None,
                  views: str | None = None, title: str = '') -> dict[str, Any]:
  """DIR/per_class.json (top-1, top-5, mean class accuracy, per-class top-1, the most-confused
  pairs, the confusion matrix, with `step` and `views`), and as PNG: DIR/confusion.png (rows:
  true class, columns: predicted), DIR/per_class.png (worst classes first) and
  DIR/confused_pairs.png. Returns the figures by name (for TensorBoard). `title` names the
  evaluation in the figures (e.g. 'val, step 1650'). DIR is local or gs://."""
  from claver_jax import plots
  directory = run_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  pairs = plots.most_confused(summary['confusion'], class_names)
  report = {'step': step, 'views': views,
            **{k: summary[k] for k in ('top1', 'top5', 'mean_class_acc', 'num_videos',
                                        'per_class_top1')},
            'most_confused': pairs, 'class_names': list(class_names),
            'confusion': summary['confusion'].tolist()}
  atomic_write_text(directory / 'per_class.json', json.dumps(report, indent=1) + '\n')
  heading = ', '.join(filter(None, [title, f'{views} views' if views else '']))
  heading = f'{heading}: ' if heading else ''
  figures = {
      'confusion': plots.confusion_figure(
          summary['confusion'], class_names,
          title=f'{heading}top-1 {summary["top1"]:.2f}% over {summary["num_videos"]} videos'),
      'per_class': plots.per_class_figure(
          summary['per_class_top1'],
          title=f'{heading}per-class top-1 (mean {summary["mean_class_acc"]:.2f}%)'),
      'confused_pairs': plots.confused_pairs_figure(
          pairs, title=f'{heading}the most-confused pairs'),
  }
  for name, figure in figures.items():
    plots.save_png(figure, directory / f'{name}.png')
  return figures


def copy_reports(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """The files of the reports directory `source` as `target`: locally put in place in one step (a
  complete directory at every instant); on gs://, which has no rename, file by file, each file
  one whole object."""
  from claver_jax.fileio import atomic_directory, is_remote
  files = [item for item in run_path(source).iterdir()
           if item.is_file() and not item.name.startswith('.')]
  if is_remote(target):
    for item in files:
      atomic_write_bytes(run_path(target) / item.name, item.read_bytes())
    return
  with atomic_directory(target, overwrite=True) as new:
    for item in files:
      (new / item.name).write_bytes(item.read_bytes())


def dump_scores(path: str | os.PathLike, *, videos: Sequence[str], labels: np.ndarray,
                scores: np.ndarray, class_names: Sequence[str], step: int | None,
                views: str) -> None:
  """A per-video score dump (config.eval.dump_scores), .npz without pickles
  (`np.load(path)` reads it): video str [N], label int32 [N], scores float32 [N, C] (the
  evaluation's class scores: softmax per description set, mean over sets, sum over views),
  class_names str [C], step, views. Written beside `path`, then renamed over it."""
  buffer = io.BytesIO()
  np.savez(buffer, video=np.asarray(list(videos), dtype=str),
           label=np.asarray(labels, np.int32), scores=np.asarray(scores, np.float32),
           class_names=np.asarray(list(class_names), dtype=str),
           step=np.int64(-1 if step is None else step), views=np.asarray(views))
  atomic_write_bytes(path, buffer.getvalue())


def dump_summary_scores(path: str | os.PathLike, summary: dict[str, Any], data: Any, *,
                        step: int | None, views: str) -> None:
  """`dump_scores` of a `run_eval` summary over the eval split of pipelines `data`: its videos
  named by their eval-list entries."""
  dump_scores(path, videos=[data.eval_name(int(i)) for i in summary['index']],
              labels=summary['labels'], scores=summary['scores'], class_names=data.class_names,
              step=step, views=views)


# ---------------------------------------------------------------------------------------------
# On the devices: the model state alone
# ---------------------------------------------------------------------------------------------
def encode_texts_sharded(model: nnx.Module, tokens: jax.Array,
                         mesh: jax.sharding.Mesh) -> jax.Array:
  """tokens int32 [N, S] -> [N, E] (the family's `encode_text`: projected, not normalised), on
  every device. Inside jit: each device of the batch axes encodes N / devices of the texts (N
  padded with empty texts to a multiple of the device count; their embeddings are dropped) and
  the embeddings are gathered; the backward pass through the text tower is split the same way."""
  n = tokens.shape[0]
  # Padded on every device, then each takes its rows: no tokens move between devices.
  tokens = jax.lax.with_sharding_constraint(jnp.pad(tokens, ((0, -n % mesh.size), (0, 0))),
                                            sharding.replicated(mesh))
  tokens = jax.lax.with_sharding_constraint(tokens, sharding.batch_sharding(mesh))
  embeddings = model.encode_text(tokens)
  return jax.lax.with_sharding_constraint(embeddings, sharding.replicated(mesh))[:n]


def make_eval_fns(graphdef, state_sharding, mesh, normalization: tuple[Any, Any]):
  """Jitted (state, tokens [N, S]) -> [N, E] (split over the devices, see
  `encode_texts_sharded`) and (state, uint8 video [B, V, T, H, W, 3], text [A, C, E]) -> [B, C];
  `graphdef`, `state` and `state_sharding` are the model's alone (`nnx.split(model)`); frames are
  normalised with `normalization` (mean, std)."""
  mean, std = (tuple(v) for v in normalization)
  replicated = sharding.replicated(mesh)

  def encode_text(state, tokens):
    model = nnx.merge(graphdef, state)
    return encode_texts_sharded(model, tokens, mesh)

  def scores(state, video, text):
    model = nnx.merge(graphdef, state)
    return view_scores(model, normalize(video, mean, std), text)

  return (jax.jit(encode_text, in_shardings=(state_sharding, replicated), out_shardings=replicated),
          aot.on_first_call(lambda: jax.jit(
              scores, in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
              out_shardings=replicated), mesh, 'evaluation step'))


def run_eval(data, state, encode_text, scores, tokens: np.ndarray, mesh,
             stop: distributed.StopRequest | None = None) -> dict[str, Any] | None:
  """One pass over the eval split -> summarize(...) over the videos that could be read,
  with 'num_substituted' (the unreadable ones, left out), plus their 'scores' [N, C], 'labels'
  [N] and 'index' [N] (eval-list positions; None for pipelines without them); a DataError when
  the unreadable ones are more than data.max_substituted of the split. Scores stay on the devices
  and are gathered once at the end. None when `stop()` is set between batches (a SIGTERM in a
  one-process run; a multi-process run stops after the evaluation, see StopRequest)."""
  text = encode_texts(lambda t: encode_text(state, t), tokens, chunk=TEXTS_PER_DEVICE * mesh.size)
  parts = []
  batch_sharding = sharding.batch_sharding(mesh)
  for host_batch in data.eval_pass():
    if stop is not None and stop():
      return None
    batch = make_global_batch(host_batch, batch_sharding)
    parts.append({'scores': scores(state, batch['video'], text), 'label': batch['label'],
                  'valid': batch['valid'], 'substituted': batch['substituted'],
                  **({'index': batch['index']} if 'index' in batch else {})})
  together = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  gathered = multihost_utils.process_allgather(together, tiled=True)
  valid = np.asarray(gathered['valid'])
  unreadable = valid & np.asarray(gathered['substituted'])
  data.check_substituted('eval', int(unreadable.sum()), int(valid.sum()))
  keep = valid & ~unreadable
  if not keep.any():
    raise DataError('No video of the eval split could be read: nothing to score.')
  summary = summarize(np.asarray(gathered['scores'])[keep],
                      np.asarray(gathered['label'])[keep], data.class_names)
  # For the score dump: [N, C] scores, [N] labels and eval-list positions, N scored videos.
  summary.update(scores=np.asarray(gathered['scores'])[keep],
                 labels=np.asarray(gathered['label'])[keep],
                 index=np.asarray(gathered['index'])[keep] if 'index' in gathered else None,
                 num_substituted=int(unreadable.sum()))
  return summary
