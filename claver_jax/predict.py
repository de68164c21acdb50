r"""Open-vocabulary prediction: which of any set of labels a video shows.

    python -m claver_jax.predict --checkpoint=DIR --video=FILE \
        [--labels "a" "b" ... | --label_file=F] [--top_k=5] [--json] [--prompts=SET_OR_PATH]

DIR is a model directory of any family (a converted checkpoint, or a run's WORKDIR/model; a
WORKDIR also works; a plain CLIP predicts as CLIP-Mean over 8 frames). The video is sampled as in
evaluation: T frames, one at the centre of each of T equal segments, the short side resized to
256/224 of the model's image size (or the ratio its WORKDIR/model records), the centre crop,
normalised with the mean/std the directory records. Each label is described by its bare name
and the templates the directory records (else CLIP's 16; a model trained without the bare name,
as the demo, is not given it), and with --prompts by a prompt set's interpretive texts where it
has them; scores are the softmax over the labels, averaged over descriptions. --label_file takes
one label per line, or a labels CSV (`id,name` rows), read by claver_jax.data.labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import jax
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


def predict(checkpoint: str | Path, video_path: str | Path, labels: Sequence[str], *,
            top_k: int = 5, prompts: str | None = None) -> list[dict[str, float]]:
  """-> [{'label', 'score'}] for the top_k labels, best first."""
  if top_k < 1:
    raise ValueError(f'--top_k={top_k}: show at least one label (top_k >= 1).')
  if len(labels) < 1:
    raise ValueError('No labels given: pass --labels "a" "b" ... or --label_file=F.')
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise ValueError(f'The labels name {repeated} more than once; give each label once.')
  directory = model_dir(checkpoint)
  _, _, meta = read_model_config(directory)
  model = load_video_model(directory)
  mean, std = input_normalization(meta, directory)
  tokenizer = load_tokenizer(directory)
  cfg = model.cfg
  # The model's own test view (WORKDIR/model records it), else the paper's.
  frames = load_clip_frames(video_path, cfg.num_frames, cfg.clip.image_size,
                            meta.get('source', {}).get('eval_resize_ratio', TEST_RESIZE_RATIO))
  # The texts the model was trained with (WORKDIR/model records them), else CLIP's templates
  # after the bare name.
  templates = meta.get('source', {}).get('templates') or TEMPLATES
  texts = prompt_tokens(list(labels), tokenizer, prompts, allow_missing=True,
                        templates=resolve_templates(templates),
                        name=meta.get('source', {}).get('bare_name', True),
                        context_length=cfg.clip.context_length)

  @nnx.jit  # The model is an argument: captured by a closure, its weights would be constants.
  def scores(model, video, tokens):
    text = evaluate.encode_texts(model.encode_text, tokens)
    return evaluate.view_scores(model, normalize(video, mean, std), text)[0]

  probabilities = np.asarray(scores(model, jnp.asarray(frames[None, None]),
                                    jnp.asarray(texts.tokens)))
  order = np.argsort(-probabilities, kind='stable')[:top_k]
  return [{'label': labels[i], 'score': float(probabilities[i])} for i in order]


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  if bool(f.labels) == bool(f.label_file):
    sys.exit('error: pass exactly one of --labels "a" "b" ... and --label_file=F.')
  try:
    labels = list(f.labels) if f.labels else read_labels(f.label_file)
    result = predict(f.checkpoint, f.video, labels, top_k=f.top_k, prompts=f.prompts)
  except (VideoError, FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if f.json:
    print(json.dumps(result))
    return
  width = max(len(r['label']) for r in result)
  print(f'{"label":<{width}}  score')
  for r in result:
    print(f'{r["label"]:<{width}}  {r["score"]:.4f}')


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
  flags.DEFINE_string('video', None, 'Video file.', required=True)
  flags.DEFINE_multi_string('labels', labels or None, 'Labels (after --labels, space separated).')
  flags.DEFINE_string('label_file', None, 'One label per line, or a labels CSV (id,name rows).')
  flags.DEFINE_integer('top_k', 5, 'How many labels to show.')
  flags.DEFINE_bool('json', False, 'Print a JSON list of {"label", "score"}.')
  flags.DEFINE_string('prompts', None, 'A prompt set (name or JSON) for labels it describes.')
  app.run(main, argv=argv)
