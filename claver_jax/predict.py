r"""Open-vocabulary prediction: which of any set of labels a video, or each of many, shows.

    python -m claver_jax.predict --checkpoint=DIR --video=FILE|FOLDER|LIST.txt \
        [--labels "a" "b" ... | --label_file=F] [--top_k=5] [--json] [--output=OUT.csv|OUT.json]
        [--prompts=SET_OR_PATH] [--batch_size=8] [--root=DIR]

DIR is a model directory of any family (a converted checkpoint, or a run's WORKDIR/model; a
WORKDIR also works; a plain CLIP predicts as CLIP-Mean over 8 frames). --video is one video file,
a folder (every video file under it, sorted), or a list file (.txt/.lst: one video a line, as
the training lists give them, `path [label]`, paths relative to --root or else to the list's
folder). The model is loaded, the labels' texts encoded and the step compiled once, then the
videos go through in batches of --batch_size.

Each video is sampled as in evaluation: T frames, one at the centre of each of T equal segments,
the short side resized to 256/224 of the model's image size (or the ratio its WORKDIR/model
records), the centre crop, normalised with the mean/std the directory records. Each label is
described by its bare name and the templates the directory records (else CLIP's 16; a model
trained without the bare name, as the demo, is not given it), and with --prompts by a prompt
set's interpretive texts where it has them; scores are the softmax over the labels, averaged over
descriptions. --label_file takes one label per line, or a labels CSV (`id,name` rows), read by
claver_jax.data.labels.

Output: a table (video, rank, label, probability) on stdout. --json prints JSON instead: for one
video file a list of {"label", "score"}, best first; for a folder or list a list of {"video",
"predictions": [{"label", "score"}, ...]} ({"video", "error"} for a video that cannot be read).
--output writes the latter as JSON, or as CSV rows `video,rank,label,score,error`. Unreadable
videos of a folder or list are skipped with their reason, and the exit status is then 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from claver_jax import evaluate
from claver_jax.data.labels import read_labels
from claver_jax.data.transforms import (TEST_RESIZE_RATIO, eval_short_side, normalize,
                                        spatial_crops)
from claver_jax.data.video import VideoError, eval_indices, open_video
from claver_jax.models import input_normalization, load_video_model, read_model_config
from claver_jax.models.io import model_dir
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import TEMPLATES, prompt_tokens, resolve_templates


def load_clip_frames(video_path: str | Path, num_frames: int, image_size: int,
                     resize_ratio: float = TEST_RESIZE_RATIO) -> np.ndarray:
  """uint8 [T, S, S, 3]: the evaluation sampling of one clip and its centre crop (the short side
  resized to resize_ratio S, 256/224 S by default, then the centre S x S)."""
  with open_video(video_path) as video:
    frames = video.frames(eval_indices(video.num_frames, num_frames)[0],
                          short_side=eval_short_side(image_size, 1, resize_ratio))
  return spatial_crops(frames, image_size, 1)[0]


VIDEO_SUFFIXES = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.flv',
                  '.3gp', '.ogv', '.wmv')
LIST_SUFFIXES = ('.txt', '.lst', '.list')


def video_inputs(spec: str | Path, root: str | Path | None = None) -> tuple[list[Path], bool]:
  """--video -> (the video paths, whether it named one video file): a folder gives every video
  file under it (by suffix, sorted), a list file (LIST_SUFFIXES) its lines' paths (`path` or
  `path label`; '#' comments and blank lines skipped) relative to `root` or the list's folder."""
  spec = Path(spec)
  if spec.is_dir():
    videos = sorted(p for p in spec.rglob('*') if p.suffix.lower() in VIDEO_SUFFIXES
                    and p.is_file())
    if not videos:
      raise FileNotFoundError(f'{spec} holds no video files ({", ".join(VIDEO_SUFFIXES)}).')
    return videos, False
  if spec.suffix.lower() in LIST_SUFFIXES:
    if not spec.is_file():
      raise FileNotFoundError(f'{spec}: no such list file.')
    base = Path(root) if root else spec.parent
    videos = []
    for line in spec.read_text(encoding='utf-8').splitlines():
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      parts = line.rsplit(None, 1)
      path = parts[0] if len(parts) == 2 and parts[1].lstrip('-').isdigit() else line
      videos.append(base / path)
    if not videos:
      raise ValueError(f'{spec} lists no videos (one path a line, optionally with a label).')
    return videos, False
  return [spec], True


class Predictor:
  """One model directory and one label set: the model loaded, the labels' texts encoded and the
  scoring step compiled once, for any number of videos (`probabilities`)."""

  def __init__(self, checkpoint: str | Path, labels: Sequence[str], *,
               prompts: str | None = None, batch_size: int = 1):
    if len(labels) < 1:
      raise ValueError('No labels given: pass --labels "a" "b" ... or --label_file=F.')
    repeated = sorted({label for label in labels if list(labels).count(label) > 1})
    if repeated:
      raise ValueError(f'The labels name {repeated} more than once; give each label once.')
    if batch_size < 1:
      raise ValueError(f'--batch_size={batch_size}; it must be at least 1.')
    self.labels, self.batch_size = list(labels), batch_size
    directory = model_dir(checkpoint)
    _, _, meta = read_model_config(directory)
    self.model = load_video_model(directory)
    mean, std = input_normalization(meta, directory)
    tokenizer = load_tokenizer(directory)
    cfg = self.model.cfg
    source = meta.get('source', {})
    self.num_frames, self.image_size = cfg.num_frames, cfg.clip.image_size
    # The model's own test view (WORKDIR/model records it), else the paper's.
    self.resize_ratio = source.get('eval_resize_ratio', TEST_RESIZE_RATIO)
    # The texts the model was trained with (WORKDIR/model records them), else CLIP's templates
    # after the bare name.
    templates = source.get('templates') or TEMPLATES
    texts = prompt_tokens(self.labels, tokenizer, prompts, allow_missing=True,
                          templates=resolve_templates(templates),
                          name=source.get('bare_name', True),
                          context_length=cfg.clip.context_length)

    @nnx.jit  # The model is an argument: captured by a closure, its weights would be constants.
    def encode(model, tokens):
      return evaluate.encode_texts(model.encode_text, tokens)

    @nnx.jit
    def scores(model, video, text):
      return evaluate.view_scores(model, normalize(video, mean, std), text)

    self._text = encode(self.model, jnp.asarray(texts.tokens))
    self._scores = scores

  def frames(self, video_path: str | Path) -> np.ndarray:
    """uint8 [T, S, S, 3]: the evaluation view of one video (VideoError / OSError if unreadable)."""
    return load_clip_frames(video_path, self.num_frames, self.image_size, self.resize_ratio)

  def probabilities(self, clips: np.ndarray) -> np.ndarray:
    """uint8 [B, T, S, S, 3], B <= batch_size -> [B, num labels], padded to batch_size (one
    compiled shape)."""
    count = clips.shape[0]
    padded = np.zeros((self.batch_size, *clips.shape[1:]), np.uint8)
    padded[:count] = clips
    out = self._scores(self.model, jnp.asarray(padded[:, None]), self._text)
    return np.asarray(out)[:count]

  def top(self, probabilities: np.ndarray, top_k: int) -> list[dict[str, float]]:
    order = np.argsort(-probabilities, kind='stable')[:top_k]
    return [{'label': self.labels[i], 'score': float(probabilities[i])} for i in order]


def check_top_k(top_k: int) -> None:
  if top_k < 1:
    raise ValueError(f'--top_k={top_k}: show at least one label (top_k >= 1).')


def predict(checkpoint: str | Path, video_path: str | Path, labels: Sequence[str], *,
            top_k: int = 5, prompts: str | None = None) -> list[dict[str, float]]:
  """-> [{'label', 'score'}] for the top_k labels, best first."""
  check_top_k(top_k)
  predictor = Predictor(checkpoint, labels, prompts=prompts)
  return predictor.top(predictor.probabilities(predictor.frames(video_path)[None])[0], top_k)


def predict_many(checkpoint: str | Path, videos: Sequence[str | Path], labels: Sequence[str], *,
                 top_k: int = 5, prompts: str | None = None, batch_size: int = 8,
                 progress: bool = False) -> list[dict]:
  """Every video through one Predictor -> [{'video', 'predictions': [{'label', 'score'}]}], or
  {'video', 'error'} for a video that cannot be read; in order. The next batch is decoded while
  the model scores this one."""
  import concurrent.futures
  import os
  import tqdm
  check_top_k(top_k)
  predictor = Predictor(checkpoint, labels, prompts=prompts,
                        batch_size=max(1, min(batch_size, len(videos))))

  def load(path):
    try:
      return predictor.frames(path), None
    except (VideoError, OSError) as e:
      message = str(e)       # without the path, which the results name
      return None, message[len(f'{path}: '):] if message.startswith(f'{path}: ') else message

  chunks = [list(videos[i:i + predictor.batch_size])
            for i in range(0, len(videos), predictor.batch_size)]
  results = []
  bar = tqdm.tqdm(total=len(videos), unit='video', disable=not progress, file=sys.stderr)
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    pending = [pool.submit(load, v) for v in chunks[0]] if chunks else []
    for index, chunk in enumerate(chunks):
      loaded = [f.result() for f in pending]
      pending = ([pool.submit(load, v) for v in chunks[index + 1]]
                 if index + 1 < len(chunks) else [])
      good = [frames for frames, _ in loaded if frames is not None]
      scored = iter(predictor.probabilities(np.stack(good)) if good else [])
      for video, (frames, error) in zip(chunk, loaded):
        results.append({'video': str(video), 'error': error} if frames is None else
                       {'video': str(video), 'predictions': predictor.top(next(scored), top_k)})
      bar.update(len(chunk))
  bar.close()
  return results


def format_table(results: Sequence[dict], base: Path | None = None) -> str:
  """The results of predict_many as a table: video, rank, label, probability (errors in place of
  the predictions); video paths relative to `base` where they are under it."""
  def name(video: str) -> str:
    if base is not None:
      try:
        return str(Path(video).relative_to(base))
      except ValueError:
        pass
    return video

  names = [name(r['video']) for r in results]
  labels = [p['label'] for r in results for p in r.get('predictions', [])]
  video_width = max([len('video'), *map(len, names)])
  label_width = max([len('label'), *map(len, labels)])
  lines = [f'{"video":<{video_width}}  rank  {"label":<{label_width}}  probability']
  for shown, result in zip(names, results):
    if 'error' in result and result['error']:
      lines.append(f'{shown:<{video_width}}  error: {result["error"]}')
      continue
    for rank, p in enumerate(result['predictions'], 1):
      lines.append(f'{shown if rank == 1 else "":<{video_width}}  {rank:>4}  '
                   f'{p["label"]:<{label_width}}  {p["score"]:>11.4f}')
  return '\n'.join(lines)


def write_output(results: Sequence[dict], path: str | Path) -> None:
  """--output: results as JSON (a list of {'video', 'predictions'} / {'video', 'error'}) or CSV
  rows video,rank,label,score,error, by the file's suffix; written to a temporary, then renamed."""
  import csv
  import io
  from claver_jax.fileio import atomic_write_text
  path = Path(path)
  if path.suffix.lower() == '.json':
    text = json.dumps(list(results), indent=1) + '\n'
  elif path.suffix.lower() == '.csv':
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['video', 'rank', 'label', 'score', 'error'])
    for r in results:
      if r.get('error'):
        writer.writerow([r['video'], '', '', '', r['error']])
      for rank, p in enumerate(r.get('predictions', []), 1):
        writer.writerow([r['video'], rank, p['label'], f'{p["score"]:.6f}', ''])
    text = out.getvalue()
  else:
    raise ValueError(f'--output={path}: write .csv or .json.')
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, text)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  if bool(f.labels) == bool(f.label_file):
    sys.exit('error: pass exactly one of --labels "a" "b" ... and --label_file=F.')
  if f.output and Path(f.output).suffix.lower() not in ('.csv', '.json'):
    sys.exit(f'error: --output={f.output}: write .csv or .json.')
  try:
    labels = list(f.labels) if f.labels else read_labels(f.label_file)
    videos, single = video_inputs(f.video, f.root)
    if single:   # one file: its error is the command's
      results = [{'video': str(videos[0]),
                  'predictions': predict(f.checkpoint, videos[0], labels, top_k=f.top_k,
                                         prompts=f.prompts)}]
    else:
      results = predict_many(f.checkpoint, videos, labels, top_k=f.top_k, prompts=f.prompts,
                             batch_size=f.batch_size, progress=sys.stderr.isatty())
    if f.output:
      write_output(results, f.output)
  except (VideoError, FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if f.json:
    print(json.dumps(results[0]['predictions'] if single else results))
  else:
    base = Path(f.video) if Path(f.video).is_dir() else None
    print(format_table(results, base))
  failed = [r for r in results if r.get('error')]
  if failed:
    sys.exit(f'error: {len(failed)} of {len(results)} videos could not be read (the first, '
             f'{failed[0]["video"]}: {failed[0]["error"]}); the others were predicted.')


if __name__ == '__main__':
  from absl import app, flags

  # --labels takes the words after it, up to the next flag: --labels "a b" "c d".
  argv, labels, i = [sys.argv[0]], [], 1
  while i < len(sys.argv):
    if sys.argv[i] == '--labels':
      i += 1
      while i < len(sys.argv) and not sys.argv[i].startswith('--'):
        labels.append(sys.argv[i])
        i += 1
    else:
      argv.append(sys.argv[i])
      i += 1
  flags.DEFINE_string('checkpoint', None, 'Model directory (or a run workdir).', required=True)
  flags.DEFINE_string('video', None, 'A video file, a folder of videos, or a list file (.txt: '
                      'one path a line, optionally with a label).', required=True)
  flags.DEFINE_multi_string('labels', labels or None, 'Labels (after --labels, space separated).')
  flags.DEFINE_string('label_file', None, 'One label per line, or a labels CSV (id,name rows).')
  flags.DEFINE_integer('top_k', 5, 'How many labels to show.')
  flags.DEFINE_bool('json', False, 'Print JSON instead of the table (see the module docstring).')
  flags.DEFINE_string('output', None, 'Also write the predictions to this .csv or .json file.')
  flags.DEFINE_integer('batch_size', 8, 'Videos scored together (a folder or list).')
  flags.DEFINE_string('root', None, 'The folder a list file\'s paths are relative to (default: '
                      'the list\'s own folder).')
  flags.DEFINE_string('prompts', None, 'A prompt set (name or JSON) for labels it describes.')
  app.run(main, argv=argv)
