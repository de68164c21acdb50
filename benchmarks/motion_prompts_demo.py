r"""Motion prompts on the demo: the design alternatives and ablations of docs/models.md, in one run.

    python -m claver_jax.main --config=configs/demo.py --workdir=/tmp/claver_demo
    python -m benchmarks.motion_prompts_demo --checkpoint=/tmp/claver_demo [--seeds=2]

The towers are frozen and the demo's clips are not augmented (whole frames, all 8 of them), so
each clip's frame embeddings never change: they are computed once, through the data pipeline and
the frozen image tower, and every variant trains its new parts on them with the recipe of
`configs/demo.py:motion_prompts` (its optimizer, schedule, loss, description sets, 450 steps of
32 clips). Only the order of the clips differs from a `claver_jax.main` run. Each line gives a
variant's val top-1 (%) over the 1200 val clips, the mean and range over the seeds, and its
trainable parameters as a share of the towers'. An ablated part is set to zero and kept there:
`no short-term stream` zeroes the output layer of that stream's MLP, `no prompts` the map that
adds the prompts to the texts, `no communication` the maps that add its results.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from claver_jax import evaluate, optim
from claver_jax.models.build import make_model
from claver_jax.step import soft_cross_entropy
from claver_jax.data import build_pipelines
from claver_jax.data.mixup import smooth_one_hot
from claver_jax.data.transforms import normalize
from claver_jax.models import families
from claver_jax.models.io import model_dir, path_str
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import prompt_tokens, resolve_templates

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, "The demo's WORKDIR (configs/demo.py), whose towers.")
flags.DEFINE_integer('seeds', 2, 'Seeds per variant (the initialisation and the clip order).')

# (name, config.model / config.optim overrides, parameter path prefixes held at zero)
VARIANTS = (
    ('the recipe (configs/demo.py:motion_prompts)', {}, ()),
    ('lr 1e-3', {'optim.lr': 1e-3}, ()),
    ('lr 3e-3', {'optim.lr': 3e-3}, ()),
    ("long-term stream over T/2 frames ('stride')", {'model.motion_long_term': 'stride'}, ()),
    ("streams concatenated + linear ('concat')", {'model.motion_fusion': 'concat'}, ()),
    ('width E = 64 (over the 5% budget)', {'model.motion_width': 64}, ()),
    ('2 motion layers', {'model.motion_layers': 2}, ()),
    ('no short-term stream', {}, ('motion.short_mlp.c_proj',)),
    ('no long-term stream', {}, ('motion.long_mlp.c_proj',)),
    ('neither difference stream', {}, ('motion.short_mlp.c_proj', 'motion.long_mlp.c_proj')),
    ('no motion-aware prompts', {}, ('prompts.up',)),
    ('no multimodal communication', {}, ('communication.video_up', 'communication.text_up')),
)


def demo_config():
  path = Path(__file__).resolve().parent.parent / 'configs' / 'demo.py'
  spec = importlib.util.spec_from_file_location('demo', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('motion_prompts')
  config.init.checkpoint = FLAGS.checkpoint
  return config


def frame_embeddings(config, model, data):
  """(train f [N, T, E], labels [N], val f, labels) through the pipelines and the image tower."""
  embed = nnx.jit(lambda m, v: m.frame_embeddings(normalize(v, tuple(config.data.mean),
                                                            tuple(config.data.std))))
  per_epoch = data.num_train // config.train.batch_size
  train_iter = iter(data.train)
  batches = [next(train_iter) for _ in range(per_epoch)]
  if hasattr(train_iter, 'close'):
    train_iter.close()
  f = np.concatenate([np.asarray(embed(model, b['video'])) for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  val, val_labels = [], []
  for b in data.eval_pass():
    keep = b['valid']
    val.append(np.asarray(embed(model, b['video'][keep, 0]))), val_labels.append(b['label'][keep])
  return f, labels, np.concatenate(val), np.concatenate(val_labels)


def run_variant(config, tokenizer, text, cached, zeroed, seed) -> tuple[float, float]:
  """-> (val top-1 %, trainable share of the towers) of one variant, one seed."""
  config = config.copy_and_resolve_references()
  config.seed = seed
  model = make_model(config, tokenizer, nnx.Rngs(seed))
  family = families.of(model)
  held = lambda path, _: path_str(path).startswith(zeroed) if zeroed else False
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if held(path, value):
      value[...] = jnp.zeros_like(value[...])
  wrt = nnx.All(optim.trainable_filter(config.optim, family.group_of), nnx.Not(held))
  f, labels, val, val_labels = cached
  tc = config.train
  steps_per_epoch = len(f) // tc.batch_size
  total = int(round(tc.epochs * steps_per_epoch))
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=total,
                               steps_per_epoch=steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  num_sets, classes = text.shape[:2]
  sets = min(config.text.sets_per_step, num_sets)

  @nnx.jit
  def step(model, optimizer, frames, label, key):
    set_ids = jax.random.choice(key, num_sets, (sets,), replace=False)
    targets = smooth_one_hot(label, classes, tc.label_smoothing)

    def loss_fn(model):
      logits = model.class_logits(model.frame_features(frames), text[set_ids])
      return soft_cross_entropy(logits, targets)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def scores(model, frames):
    logits = model.class_logits(model.frame_features(frames), text)        # [A, B, C]
    return evaluate.class_scores(logits[:, :, None])

  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  for i in range(total):
    if i % steps_per_epoch == 0:
      order = rng.permutation(len(f))
    batch = order[(i % steps_per_epoch) * tc.batch_size:][:tc.batch_size]
    key, sub = jax.random.split(key)
    step(model, optimizer, jnp.asarray(f[batch]), jnp.asarray(labels[batch]), sub)
  s = np.concatenate([np.asarray(scores(model, jnp.asarray(val[i:i + 200])))
                      for i in range(0, len(val), 200)])
  trainable, towers = optim.count_parameters(model, config.optim, family.group_of)
  trainable -= sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                   if held(p, v))
  return 100 * float((s.argmax(-1) == val_labels).mean()), trainable / towers


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not FLAGS.checkpoint:
    raise SystemExit('error: pass --checkpoint=WORKDIR of a configs/demo.py run.')
  config = demo_config()
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size, data_config.eval_batch_size = (config.train.batch_size,
                                                         config.eval.batch_size)
  data = build_pipelines(data_config)
  tokenizer = load_tokenizer(model_dir(config.init.checkpoint))
  model = make_model(config, tokenizer, nnx.Rngs(0))
  tick = time.time()
  cached = frame_embeddings(config, model, data)
  tokens = prompt_tokens(data.class_names, tokenizer, None,
                         templates=resolve_templates(config.text.templates),
                         name=config.text.bare_name, context_length=model.cfg.clip.context_length)
  text = nnx.jit(lambda m, t: m.encode_text(t.reshape(-1, t.shape[-1])).reshape(
      *t.shape[:2], -1))(model, jnp.asarray(tokens.tokens))
  print(f'Frame embeddings of {len(cached[0])} train and {len(cached[2])} val clips in '
        f'{time.time() - tick:.0f} s.', flush=True)
  for name, overrides, zeroed in VARIANTS:
    variant = config.copy_and_resolve_references()
    for key, value in overrides.items():
      section, field = key.split('.')
      variant[section][field] = value
    results = [run_variant(variant, tokenizer, text, cached, zeroed, seed)
               for seed in range(FLAGS.seeds)]
    top1 = [r[0] for r in results]
    print(f'{name:48s} val top-1 {np.mean(top1):5.1f}% ({min(top1):.1f}-{max(top1):.1f}), '
          f'trainable {100 * results[0][1]:.2f}% of the towers', flush=True)


if __name__ == '__main__':
  app.run(main)
