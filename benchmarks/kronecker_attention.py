r"""Chunked against dense Kronecker attention, in one run: memory, CPU time, exactness.

    python -m benchmarks.kronecker_attention [--rounds=5] [--skip_sweep]

1. Memory, compiled and not run: XLA's temporary memory (`memory_analysis().temp_size_in_bytes`)
   of the forward + backward pass (gradients of the parameters and the tokens) of one temporal
   layer at ViT-B/16 sizes (L = 197 tokens per frame, width 768, 12 heads), one clip, T = 8, 16
   and 32, for `attention='dense'` and `'chunked'`.
2. CPU time at T = 8 (one clip of ViT-B/16 tokens): the attention alone (forward; forward +
   backward) and one temporal layer (forward + backward), KMT and KMCT, dense and chunked. The
   variants run interleaved, round after round, and each time is the median over the rounds, so
   a ratio is measured under the same load. Also the largest difference of outputs and gradients.
3. Where 'auto' switches: chunked/dense time of the attention's forward + backward from 80 to
   800 tokens per clip (KMT, batches of about 3200 tokens); 'auto' is chunked from
   `kronecker.AUTO_CHUNKED_MIN_TOKENS` on.

The last line is `chunked/dense temp memory at T=32: X.XXX` (KMT). Goals: <= 0.125; chunked at
most 1.1x dense's time at T = 8; KMCT faster than dense.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from claver_jax.models.kronecker import AUTO_CHUNKED_MIN_TOKENS, kronecker_attention
from claver_jax.models.temporal import TemporalTransformer

TOKENS, WIDTH, HEADS = 197, 768, 12
FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 5, 'Timed rounds (the medians are over them).')
flags.DEFINE_bool('skip_sweep', False, "Skip the sweep that places 'auto''s switch.")


def layer_grad(kind: str, frames: int, attention: str, abstract: bool = False):
  """-> jitted (state, tokens [1, T, L, D]) -> gradients of one temporal layer, and its state
  (shapes only when `abstract`)."""
  build = lambda: TemporalTransformer(kind, frames, WIDTH, 1, HEADS, attention=attention,
                                      rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nnx.eval_shape(build) if abstract else build())
  loss = lambda state, tokens: nnx.merge(graphdef, state)(tokens).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def temp_memory(kind: str, frames: int, attention: str) -> int:
  grad, state = layer_grad(kind, frames, attention, abstract=True)
  tokens = jax.ShapeDtypeStruct((1, frames, TOKENS, WIDTH), jnp.float32)
  return grad.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def interleaved_medians(fns: dict, args: dict, rounds: int) -> dict:
  """{name: median seconds}, every fn called once per round, in turn (each compiled first)."""
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def attention_fns(kind: str, frames: int, attention: str, weights):
  attend = lambda q, k, v: kronecker_attention(q, k, v, kind=kind, num_frames=frames,
                                               implementation=attention)
  forward = jax.jit(attend)
  grads = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) * weights).sum(), argnums=(0, 1, 2)))
  return forward, grads


def max_abs_diff(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv):
  del argv
  print(f'{jax.default_backend()} backend, {jax.local_device_count()} device(s); the machine '
        'may be shared: compare ratios, not absolute times.')

  print('\n1. XLA temporary memory, forward + backward of one temporal layer, one clip '
        f'(L={TOKENS}, width {WIDTH}, {HEADS} heads), compiled, not run:')
  print('| kind | T | dense MiB | chunked MiB | chunked/dense |\n|---|---|---|---|---|')
  ratio_at_32 = {}
  for kind in ('kmt', 'kmct'):
    for frames in (8, 16, 32):
      dense, chunked = (temp_memory(kind, frames, a) for a in ('dense', 'chunked'))
      ratio_at_32[kind] = chunked / dense
      print(f'| {kind} | {frames} | {dense / 2**20:.0f} | {chunked / 2**20:.0f} | '
            f'{chunked / dense:.3f} |', flush=True)

  frames, s = 8, 8 * TOKENS
  print(f'\n2. CPU time at T={frames} (one clip, {s} tokens), medians of {FLAGS.rounds} '
        'interleaved rounds:')
  q, k, v, weights = jax.random.normal(jax.random.key(0), (4, 1, s, HEADS, WIDTH // HEADS))
  tokens = jax.random.normal(jax.random.key(1), (1, frames, TOKENS, WIDTH))
  fns, args, outputs = {}, {}, {}
  for kind in ('kmt', 'kmct'):
    for attention in ('dense', 'chunked'):
      forward, grads = attention_fns(kind, frames, attention, weights)
      layer, state = layer_grad(kind, frames, attention)
      fns.update({(kind, attention, 'attention fwd'): forward,
                  (kind, attention, 'attention fwd+bwd'): grads,
                  (kind, attention, 'layer fwd+bwd'): layer})
      args.update({(kind, attention, 'attention fwd'): (q, k, v),
                   (kind, attention, 'attention fwd+bwd'): (q, k, v),
                   (kind, attention, 'layer fwd+bwd'): (state, tokens)})
      outputs[kind, attention] = (forward(q, k, v), grads(q, k, v), layer(state, tokens))
  medians = interleaved_medians(fns, args, FLAGS.rounds)
  print('| kind | what | dense ms | chunked ms | chunked/dense |\n|---|---|---|---|---|')
  for kind in ('kmt', 'kmct'):
    for what in ('attention fwd', 'attention fwd+bwd', 'layer fwd+bwd'):
      dense, chunked = medians[kind, 'dense', what], medians[kind, 'chunked', what]
      print(f'| {kind} | {what} | {1e3 * dense:.0f} | {1e3 * chunked:.0f} | '
            f'{chunked / dense:.3f} |')
  for kind in ('kmt', 'kmct'):
    diff = max_abs_diff(outputs[kind, 'dense'], outputs[kind, 'chunked'])
    print(f'{kind}: max abs diff chunked vs dense (outputs, gradients of q/k/v, of the layer\'s '
          f'parameters and tokens), fp32: {diff:.1e}')
  kmct_over_kmt = (medians['kmct', 'chunked', 'attention fwd+bwd'] /
                   medians['kmt', 'dense', 'attention fwd+bwd'])
  print(f'KMCT chunked / KMT dense, attention fwd+bwd: {kmct_over_kmt:.3f} (KMCT computes '
        f'{(frames + 1) / (2 * frames):.3f} of the score blocks)')

  if not FLAGS.skip_sweep:
    print(f"\n3. Where 'auto' switches (chunked from {AUTO_CHUNKED_MIN_TOKENS} tokens per clip): "
          'KMT attention fwd+bwd, batches of about 3200 tokens:')
    print('| L | T | T·L | batch | dense ms | chunked/dense | auto |\n'
          '|---|---|---|---|---|---|---|')
    for tokens_per_frame, frames in ((10, 8), (26, 8), (50, 8), (50, 12), (50, 16), (197, 4)):
      s = tokens_per_frame * frames
      batch = max(1, 3200 // s)
      q, k, v, weights = jax.random.normal(jax.random.key(2), (4, batch, s, HEADS, WIDTH // HEADS))
      fns = {a: attention_fns('kmt', frames, a, weights)[1] for a in ('dense', 'chunked')}
      medians = interleaved_medians(fns, {a: (q, k, v) for a in fns}, FLAGS.rounds)
      auto = 'chunked' if s >= AUTO_CHUNKED_MIN_TOKENS else 'dense'
      print(f'| {tokens_per_frame} | {frames} | {s} | {batch} | {1e3 * medians["dense"]:.0f} | '
            f'{medians["chunked"] / medians["dense"]:.3f} | {auto} |', flush=True)

  print(f'\nchunked/dense temp memory at T=32: {ratio_at_32["kmt"]:.3f}')


if __name__ == '__main__':
  app.run(main)
