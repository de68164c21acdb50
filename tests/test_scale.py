"""The train step at scale, on 8 simulated CPU devices: texts split over the devices and cut to
their length, gradient accumulation on device.

The checks run once, in a subprocess with 8 devices (this file run as a script), and report
figures that the tests assert on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

DEVICES = 8
DATA_COLLECTIVES = ('all-to-all', 'collective-permute')


# ------------------------------------------------------------------------------- the checks
def tiny_config(grad_accum_steps: int):
  """The test config of a run (tests/tiny_config.py) with a global batch of 2 clips per device,
  mixup/cutmix on (they pair clips), the text tower training."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny_config', REPO / 'tests' / 'tiny_config.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.train.batch_size = 2 * DEVICES
  c.train.grad_accum_steps = grad_accum_steps
  c.train.mixup_alpha, c.train.cutmix_alpha, c.train.mixup_switch_prob = 0.8, 1.0, 0.5
  c.optim.warmup_epochs = 0
  c.text.sets_per_step = 2
  return c


def random_tokens(rng, shape, context: int, vocab: int, eos: int, lengths=(3, 12)):
  """int32 [*shape, context]: a start id, random ids, `eos`, zero padding (the Tokenizer's
  layout); ids other than eos lie in [3, vocab), so for first-eos pooling eos is not the max."""
  tokens = np.zeros((*shape, context), np.int32)
  for index in np.ndindex(*shape):
    n = rng.integers(*lengths)
    ids = rng.integers(3, vocab, n)
    ids = np.where(ids == eos, 3, ids)
    tokens[index][:n + 2] = [1, *ids, eos]
  return tokens


def text_checks(mesh) -> dict:
  """Sharded + cut encoding vs the replicated full-context one, for both pooling rules."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from claver_jax import sharding
  from claver_jax.models import CLAVER, CLAVERConfig, CLIPConfig
  from claver_jax.models.clip import needed_context
  from claver_jax.train import encode_texts_sharded
  rng = np.random.default_rng(0)
  out = {}
  for pooling, eos in (('argmax', 63), ('first_eos', 2)):
    clip = CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                      vision_heads=1, vision_mlp_dim=32, context_length=32, vocab_size=64,
                      text_width=32, text_layers=2, text_heads=2, text_mlp_dim=64,
                      text_pooling=pooling, eos_token_id=eos)
    model = CLAVER(CLAVERConfig(clip=clip, num_frames=2, temporal='mean'), rngs=nnx.Rngs(0))
    tokens = random_tokens(rng, (13,), 32, 64, eos)          # 13 texts: padded to 16
    cut = needed_context(tokens, clip)
    cotangent = jax.random.normal(jax.random.key(1), (13, 16))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    replicated = sharding.replicated(mesh)
    params = jax.device_put(params, replicated)

    def loss(params, tokens, sharded):
      m = nnx.merge(graph, params, rest)
      text = encode_texts_sharded(m, tokens, mesh) if sharded else m.encode_text(tokens)
      return (text * cotangent).sum(), text

    grad = jax.grad(loss, has_aux=True)
    compiled = [jax.jit(lambda p, t, s=s: grad(p, t, s), in_shardings=(replicated, replicated))
                .lower(params, t).compile() for s, t in ((True, tokens[:, :cut]), (False, tokens))]
    (g_cut, e_cut), (g_full, e_full) = compiled[0](params, tokens[:, :cut]), compiled[1](params,
                                                                                        tokens)
    g_cut, g_full = jax.tree.leaves(g_cut), jax.tree.leaves(g_full)
    # Per-device FLOPs of one forward + backward: sharded and cut vs replicated at 32 tokens.
    flops = [c.cost_analysis()['flops'] for c in compiled]
    out[pooling] = dict(
        cut=cut, embedding_diff=float(jnp.abs(e_cut - e_full).max()),
        embedding_scale=float(jnp.abs(e_full).max()),
        grad_rel_diff=max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
                          for a, b in zip(g_cut, g_full)),
        flops_ratio=flops[0] / flops[1])
  return out


def step_checks(mesh) -> dict:
  """Losses of 3 steps with grad_accum_steps 1 and 2 at the same global batch; the compiled
  accumulated step's collectives."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from claver_jax import optim, sharding
  from claver_jax.models import CLAVER, CLAVERConfig, CLIPConfig
  from claver_jax.train import make_train_step
  losses, hlo = {}, ''
  for accum in (1, 2):
    config = tiny_config(accum)
    clip = CLIPConfig(**{**config.model.clip.to_dict(), 'vocab_size': 64, 'eos_token_id': 63,
                         'image_size': config.data.image_size})
    cfg = CLAVERConfig(clip=clip, num_frames=config.data.num_frames, temporal='kmt',
                       temporal_layers=1)
    model = CLAVER(cfg, rngs=nnx.Rngs(0))
    tx, _ = optim.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
    optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim))
    graphdef, state = nnx.split((model, optimizer))
    state_sharding = sharding.state_shardings(mesh, state)
    state = jax.device_put(state, state_sharding)
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    num_sets, num_classes = 3, 12
    tokens = jnp.asarray(random_tokens(np.random.default_rng(1), (num_sets, num_classes), 16,
                                       64, 63))
    step = jax.jit(make_train_step(graphdef, config, mesh, num_classes, num_sets, False),
                   in_shardings=(state_sharding, batch_sharding, replicated, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    data = np.random.default_rng(2)
    b, t, s = config.train.batch_size, config.data.num_frames, config.data.image_size
    batches = [{'video': data.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8),
                'label': data.integers(0, num_classes, b).astype(np.int32)} for _ in range(3)]
    batches = [jax.device_put(x, batch_sharding) for x in batches]
    step = step.lower(state, batches[0], tokens, jnp.int32(1)).compile()
    if accum == 2:
      hlo = step.as_text()
    losses[accum] = []
    for i, batch in enumerate(batches):
      state, metrics = step(state, batch, tokens, jnp.asarray(i + 1, jnp.int32))
      losses[accum].append(float(metrics['loss']))
  return dict(losses_1=losses[1], losses_2=losses[2],
              collectives=sorted(set(re.findall(r'= \S+ (all-gather|all-reduce|reduce-scatter|'
                                                r'all-to-all|collective-permute)', hlo))),
              data_collectives=[line.strip()[:200] for line in hlo.splitlines()
                                if any(f' {c}(' in line or f' {c}-start(' in line
                                       for c in DATA_COLLECTIVES)])


def run_checks() -> dict:
  import jax
  from claver_jax import sharding
  import ml_collections
  assert jax.device_count() == DEVICES, jax.devices()
  def mesh(fsdp):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp)))

  # Texts over data x fsdp (fsdp-sharded text tower); the step on the default mesh (data only).
  return dict(text=text_checks(mesh(2)), step=step_checks(mesh(1)))


# ------------------------------------------------------------------------------- the tests
@pytest.fixture(scope='module')
def checks():
  # Compiling dominates: XLA's CPU backend without LLVM optimisation compiles faster.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES} '
                      '--xla_backend_optimization_level=0'}
  proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize('pooling', ['argmax', 'first_eos'])
def test_texts_split_over_devices_and_cut_to_length_equal_the_full_encoding(checks, pooling):
  got = checks['text'][pooling]
  assert got['cut'] == 16                                  # 14 tokens at most, rounded up to 8
  assert got['embedding_diff'] <= 1e-6 * max(1.0, got['embedding_scale'])
  assert got['grad_rel_diff'] <= 1e-5
  assert got['flops_ratio'] < 0.25                         # 1/8 of the texts at half the length


def test_accumulation_gives_the_losses_of_one_batch(checks):
  step = checks['step']
  np.testing.assert_allclose(step['losses_2'], step['losses_1'], rtol=1e-5)
  assert len(set(step['losses_1'])) == 3                   # it trains: three different steps


def test_accumulated_step_moves_no_data_between_devices(checks):
  step = checks['step']
  assert step['data_collectives'] == [], step['data_collectives']
  assert 'all-gather' in step['collectives']                # the text embeddings, fsdp params


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  print(json.dumps(run_checks()))
