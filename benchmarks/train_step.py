r"""Per-device FLOPs of one train step at Kinetics-400 scale, before vs after the text tower was
split over the devices and cut to the texts' length, on 8 simulated devices.

    python -m benchmarks.train_step

configs/k400.py:B16,8,kmt as it was when this was measured (ViT-B/16, 8 frames, KMT, bf16, the
whole image tower frozen, the text tower trained, a global batch of 128, i.e. 16 clips per device
on 8 devices, K = 5 description sets per step; the preset now trains both towers on 256 clips and
draws 160 sets) and the shipped kinetics400 prompts: C = 400 classes. The texts are tokenised
with OpenAI's vocabulary (../shared/reference/clip_bpe/bpe_simple_vocab_16e6.txt.gz) when it is
there, else stood in for by texts of one token per word (see `k400_tokens`).

Both steps are compiled for abstract inputs (XLA's cost analysis of the SPMD-partitioned
program; nothing runs at this size):
  before  the step as it was: every device encodes the K·C texts at 77 tokens (written out here
          as `reference_train_step`);
  after   claver_jax.step.make_train_step: each device encodes K·C / 8 texts, once per step,
          sorted by length and in groups at their own context (multiples of 8 tokens).
The last line is `per-device step FLOPs, after/before: X.XXX`. Goal: <= 0.25.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
if 'jax' not in sys.modules:          # 8 simulated CPU devices, fast (unoptimised) compiles.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ['XLA_FLAGS'] = (f'{os.environ.get("XLA_FLAGS", "")} '
                             f'--xla_force_host_platform_device_count={DEVICES} '
                             '--xla_backend_optimization_level=0')

import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from claver_jax import flops as flops_lib
from claver_jax import optim, sharding
from claver_jax.data.mixup import mixup_cutmix, smooth_one_hot
from claver_jax.data.transforms import normalize
from claver_jax.models import families
from claver_jax.models.clip import needed_context, pool_index
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, prompt_tokens,
                                     resolve_templates)
from claver_jax.step import make_train_step, soft_cross_entropy

CLIP_BPE = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'clip_bpe' / \
    'bpe_simple_vocab_16e6.txt.gz'
CONTEXT = 77


def k400_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'k400', Path(__file__).resolve().parents[1] / 'configs' / 'k400.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('B16,8,kmt')
  config.train.batch_size, config.text.sets_per_step = 128, 5     # As measured (the docstring).
  config.optim.freeze_image = True
  return config


def whole_image_tower(group_of):
  """The family's groups with the ViT's head in the image group: all of it frozen, as measured."""
  return lambda path: 'image' if group_of(path) == 'image_head' else group_of(path)


def k400_tokens(config, eot: int) -> tuple[np.ndarray, str]:
  """int32 [A, 400, 77]: the kinetics400 prompt sets tokenised with OpenAI's vocabulary, or
  stand-ins of the same lengths as near as they can be told without it: one token per word,
  digit or punctuation run (CLIP's pre-tokenizer, whose words OpenAI's vocabulary mostly keeps
  whole; measured with it: 10.8 tokens per text on average against 11.3, 25 at most against 26)."""
  prompt_set = load_prompt_set(config.text.prompts)
  classes = list(prompt_set)
  templates = resolve_templates(config.text.templates)
  if CLIP_BPE.is_file():
    tokens = prompt_tokens(classes, load_tokenizer(CLIP_BPE), prompt_set, templates=templates,
                           name=config.text.bare_name, context_length=CONTEXT).tokens
    return tokens, f'tokenised with {CLIP_BPE.name}'
  texts, _ = build_prompt_texts(classes, prompt_set, templates=templates,
                                name=config.text.bare_name)
  tokens = np.zeros((len(texts), len(classes), CONTEXT), np.int32)
  for a, row in enumerate(texts):
    for c, text in enumerate(row):
      n = min(len(re.findall(r'[a-z]+|[0-9]|[^\sa-z0-9]+', text.lower())) + 2, CONTEXT)
      tokens[a, c, :n] = [eot - 1] + [1] * (n - 2) + [eot]
  return tokens, f'{CLIP_BPE} absent: stand-ins of one token per word'


def reference_train_step(graphdef, config, num_classes: int, num_sets: int, group_of):
  """The train step before this change: every device encodes all K·C sampled texts at the full
  context, once per micro-batch of an unrolled accumulation loop over contiguous slices."""
  tc, dc = config.train, config.data
  sets = min(config.text.sets_per_step, num_sets)
  wrt = optim.trainable_filter(config.optim, group_of)

  def loss_fn(model, video, targets, text, set_ids):
    tokens = text[set_ids]
    t = model.encode_text(tokens.reshape(-1, tokens.shape[-1])).reshape(sets, num_classes, -1)
    return soft_cross_entropy(model.class_logits(model.video_features(video), t), targets)

  def train_step(state, batch, text, step):
    model, optimizer = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    mix_rng, set_rng = jax.random.split(rng)
    video = normalize(batch['video'], tuple(dc.mean), tuple(dc.std))
    if tc.mixup_alpha > 0 or tc.cutmix_alpha > 0:
      video, targets = mixup_cutmix(mix_rng, video, batch['label'], num_classes,
                                    mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha,
                                    switch_prob=tc.mixup_switch_prob,
                                    label_smoothing=tc.label_smoothing)
    else:
      targets = smooth_one_hot(batch['label'], num_classes, tc.label_smoothing)
    set_ids = jax.random.choice(set_rng, num_sets, (sets,), replace=False)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))
    micro = video.shape[0] // tc.grad_accum_steps
    loss, grads = 0.0, None
    for i in range(tc.grad_accum_steps):
      part = slice(i * micro, (i + 1) * micro)
      l, g = grad_fn(model, video[part], targets[part], text, set_ids)
      loss = loss + l / tc.grad_accum_steps
      g = jax.tree.map(lambda x: x / tc.grad_accum_steps, g)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {'loss': loss}

  return train_step


def step_flops(step_fn, mesh, state, state_sharding, batch, text) -> float:
  """Per-device FLOPs of the compiled (SPMD-partitioned) step: XLA's cost analysis plus the
  trips of the chunked attention's loops that it leaves out (claver_jax.flops.step_flops)."""
  replicated = sharding.replicated(mesh)
  counted, hidden = flops_lib.step_flops(
      lambda: jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                                             replicated, replicated),
                      out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
      mesh, state, batch, text, jax.ShapeDtypeStruct((), jnp.int32))
  print(f'        XLA counts {counted / 1e12:.2f} TFLOP, the loops\' other trips add '
        f'{hidden / 1e12:.2f}', flush=True)
  return counted + hidden


def main() -> None:
  assert jax.device_count() == DEVICES, f'{jax.device_count()} devices; run in a fresh process.'
  config = k400_config()
  mesh = sharding.make_mesh(config.mesh)
  family, cfg = families.get(config.model.name), families.model_config(config)
  group_of = whole_image_tower(family.group_of)
  tokens, source = k400_tokens(config, cfg.clip.eos_token_id)
  num_sets, num_classes, _ = tokens.shape
  cut = needed_context(tokens, cfg.clip)
  sets = min(config.text.sets_per_step, num_sets)
  tx, _ = optim.make_optimizer(config.optim, group_of, total_steps=1000, steps_per_epoch=100)

  def build():
    model = family.module_class(cfg, dtype=jnp.dtype(config.model.dtype), rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx,
                                wrt=optim.trainable_filter(config.optim, group_of))

  graphdef, state = nnx.split(nnx.eval_shape(build))
  state_sharding = sharding.state_shardings(mesh, state)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                       state_sharding)
  b, t, size = config.train.batch_size, config.data.num_frames, config.data.image_size
  batch = {'video': jax.ShapeDtypeStruct((b, t, size, size, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  print(f'configs/k400.py:B16,8,kmt on {DEVICES} devices: {b // DEVICES} clips of {t} frames '
        f'per device; texts: {num_sets} sets x {num_classes} classes, {sets} sets per step '
        f'({sets * num_classes} texts), {source}; context {CONTEXT} -> {cut} tokens.')
  flops = {}
  for name, step, context in (
      ('before', reference_train_step(graphdef, config, num_classes, num_sets, group_of),
       CONTEXT),
      ('after', make_train_step(graphdef, config, mesh, pool_index(tokens, cfg.clip) + 1,
                                False, group_of), cut)):
    start = time.perf_counter()
    text = jax.ShapeDtypeStruct((num_sets, num_classes, context), jnp.int32)
    flops[name] = step_flops(step, mesh, state, state_sharding, batch, text)
    print(f'{name:>6}: {flops[name] / 1e12:7.2f} TFLOP per device per step '
          f'(compiled in {time.perf_counter() - start:.0f} s)', flush=True)
  print(f'per-device step FLOPs, after/before: {flops["after"] / flops["before"]:.3f}')


if __name__ == '__main__':
  main()
