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
  import tiny_config
  c = tiny_config.get_config()
  c.train.batch_size = 2 * DEVICES
  c.train.grad_accum_steps = grad_accum_steps
  c.train.mixup_alpha, c.train.cutmix_alpha, c.train.mixup_switch_prob = 0.8, 1.0, 0.5
  c.optim.warmup_epochs = 0
  c.text.sets_per_step = 2
  return c


def random_tokens(rng, shape, context: int, vocab: int, eos: int, lengths=(1, 12)):
  """int32 [*shape, context]: a start id, n in [lengths) random ids, `eos`, zero padding (the
  Tokenizer's layout); ids other than eos lie in [3, vocab), so for first-eos pooling eos is not
  the largest."""
  tokens = np.zeros((*shape, context), np.int32)
  for index in np.ndindex(*shape):
    n = rng.integers(*lengths)
    ids = rng.integers(3, vocab, n)
    ids = np.where(ids == eos, 3, ids)
    tokens[index][:n + 2] = [1, *ids, eos]
  return tokens


def text_checks(mesh) -> dict:
  """For both pooling rules: 2 of 3 description sets of 9 classes (texts of 2 to 27 tokens in a
  40-token context) encoded as the train step does (cut, by length, split over the devices) and
  as evaluation does (cut, split over the devices), against the replicated full-context
  encoding: embeddings, gradients of the text tower, per-device FLOPs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from claver_jax import sharding
  from claver_jax.models import CLAVER, CLAVERConfig, CLIPConfig
  from claver_jax.models.clip import needed_context, pool_index
  from claver_jax.evaluate import encode_texts_sharded
  from claver_jax.step import encode_texts_by_length, length_buckets
  rng = np.random.default_rng(0)
  replicated = sharding.replicated(mesh)
  out = {}
  for pooling, eos in (('argmax', 63), ('first_eos', 2)):
    clip = CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                      vision_heads=1, vision_mlp_dim=32, context_length=40, vocab_size=64,
                      text_width=32, text_layers=2, text_heads=2, text_mlp_dim=64,
                      text_pooling=pooling, eos_token_id=eos)
    model = CLAVER(CLAVERConfig(clip=clip, num_frames=2, temporal='mean'), rngs=nnx.Rngs(0))
    table = random_tokens(rng, (3, 9), 40, 64, eos, lengths=(0, 26))    # [A, C, 40]
    cut = needed_context(table, clip)
    lengths_table = pool_index(table, clip) + 1
    buckets = length_buckets(lengths_table, 2)
    tokens = table[[2, 0]].reshape(18, 40)                               # 18 texts: padded
    lengths = lengths_table[[2, 0]].reshape(18)
    cotangent = jax.random.normal(jax.random.key(1), (18, 16))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, replicated)
    ways = {'by_length': (lambda m, t: encode_texts_by_length(m, t, lengths, buckets, mesh),
                          tokens[:, :cut]),
            'cut': (lambda m, t: encode_texts_sharded(m, t, mesh), tokens[:, :cut]),
            'full': (lambda m, t: m.encode_text(t), tokens)}
    results, flops = {}, {}
    for name, (encode, inputs) in ways.items():
      def loss(params, tokens, encode=encode):
        text = encode(nnx.merge(graph, params, rest), tokens)
        return (text * cotangent).sum(), text
      compiled = jax.jit(jax.grad(loss, has_aux=True),
                         in_shardings=(replicated, replicated)).lower(params, inputs).compile()
      grads, text = compiled(params, inputs)
      results[name] = (jax.tree.leaves(grads), text)
      flops[name] = compiled.cost_analysis()['flops']
    g_full, e_full = results['full']
    out[pooling] = dict(context=cut, buckets=buckets, embedding_scale=float(jnp.abs(e_full).max()))
    for name in ('by_length', 'cut'):
      grads, text = results[name]
      out[pooling][name] = dict(
          embedding_diff=float(jnp.abs(text - e_full).max()),
          grad_rel_diff=max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
                            for a, b in zip(grads, g_full)),
          flops_ratio=flops[name] / flops['full'])
  return out


def step_checks(mesh, family_name: str, accums: tuple[int, ...]) -> dict:
  """Losses of 3 steps of the `family_name` model (its text tower training) with each
  grad_accum_steps of `accums` at the same global batch; the compiled step's collectives at the
  last of them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from claver_jax import optim, sharding
  from claver_jax.models import CLIPConfig, families
  from claver_jax.models.clip import pool_index
  from claver_jax.step import make_train_step
  losses, hlo = {}, ''
  for accum in accums:
    config = tiny_config(accum)
    config.model.name = family_name
    config.model.temporal_layers = 1
    family = families.get(family_name)
    clip = CLIPConfig(**{**config.model.clip.to_dict(), 'vocab_size': 64, 'eos_token_id': 63,
                         'image_size': config.data.image_size})
    model = family.module_class(families.model_config(config, clip), rngs=nnx.Rngs(0))
    tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=10,
                                 steps_per_epoch=5)
    optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim,
                                                                    family.group_of))
    graphdef, state = nnx.split((model, optimizer))
    state_sharding = sharding.state_shardings(mesh, state, family.sharding_rules)
    state = jax.device_put(state, state_sharding)
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    num_sets, num_classes = 3, 12
    tokens = random_tokens(np.random.default_rng(1), (num_sets, num_classes), 16, 64, 63)
    lengths = pool_index(tokens, clip) + 1
    tokens = jnp.asarray(tokens)
    step = jax.jit(make_train_step(graphdef, config, mesh, lengths, False, family.group_of),
                   in_shardings=(state_sharding, batch_sharding, replicated, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    data = np.random.default_rng(2)
    b, t, s = config.train.batch_size, config.data.num_frames, config.data.image_size
    batches = [{'video': data.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8),
                'label': data.integers(0, num_classes, b).astype(np.int32)} for _ in range(3)]
    batches = [jax.device_put(x, batch_sharding) for x in batches]
    step = step.lower(state, batches[0], tokens, jnp.int32(1)).compile()
    hlo = step.as_text()
    losses[accum] = []
    for i, batch in enumerate(batches):
      state, metrics = step(state, batch, tokens, jnp.asarray(i + 1, jnp.int32))
      assert bool(metrics['finite'])
      losses[accum].append(float(metrics['loss']))
  return dict(losses={str(a): l for a, l in losses.items()},
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

  # Texts over data x fsdp (fsdp-sharded text tower); the step on the default mesh (data only),
  # for CLAVER and X-CLIP (whose class_logits condition the texts on each video).
  return dict(text=text_checks(mesh(2)), step=step_checks(mesh(1), 'claver', (1, 2)),
              xclip_step=step_checks(mesh(1), 'xclip', (1, 2)))


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


@pytest.mark.parametrize('way', ['by_length', 'cut'])
@pytest.mark.parametrize('pooling', ['argmax', 'first_eos'])
@pytest.mark.slow
def test_texts_split_over_devices_and_cut_to_length_equal_the_full_encoding(checks, pooling,
                                                                            way):
  text = checks['text'][pooling]
  assert text['context'] == 32 and len(text['buckets']) >= 3   # 27 tokens at most, rounded up to 8
  got = text[way]
  assert got['embedding_diff'] <= 1e-6 * max(1.0, text['embedding_scale'])
  assert got['grad_rel_diff'] <= 1e-5
  assert got['flops_ratio'] < 0.25                         # 1/8 of the texts, shorter


@pytest.mark.parametrize('repeats', [False, True])
def test_length_buckets_hold_any_choice_of_sets(repeats):
  """Any `sets` rows (drawn with replacement when `repeats`, as the train step draws K < A)."""
  from itertools import combinations, combinations_with_replacement
  from claver_jax.step import length_buckets
  lengths = np.random.default_rng(0).integers(2, 30, (6, 7))
  lengths[4] = 29                                           # one set of long texts only
  choices = combinations_with_replacement if repeats else combinations
  for sets in (1, 2, 3, 6):
    buckets = length_buckets(lengths, sets, repeats=repeats)
    assert sum(count for count, _ in buckets) == sets * 7
    assert all(context % 8 == 0 for _, context in buckets) and buckets[-1][1] == 32
    contexts = np.repeat([context for _, context in buckets], [count for count, _ in buckets])
    for chosen in choices(range(6), sets):
      assert (np.sort(lengths[list(chosen)].reshape(-1)) <= contexts).all()
  if not repeats:
    assert length_buckets(lengths, 6)[0] == ((lengths <= 8).sum(), 8)   # all sets: exact counts


@pytest.mark.parametrize('family', ['step', 'xclip_step'])
@pytest.mark.slow
def test_accumulation_gives_the_losses_of_one_batch(checks, family):
  """CLAVER and X-CLIP, their text towers training: 2 micro-batches, the losses of 1."""
  losses = checks[family]['losses']
  np.testing.assert_allclose(losses['2'], losses['1'], rtol=1e-5)
  assert len(set(losses['1'])) == 3                        # it trains: three different steps


@pytest.mark.parametrize('family', ['step', 'xclip_step'])
@pytest.mark.slow
def test_accumulated_step_moves_no_data_between_devices(checks, family):
  step = checks[family]
  assert step['data_collectives'] == [], step['data_collectives']
  assert 'all-gather' in step['collectives']                # the text embeddings, fsdp params


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  print(json.dumps(run_checks()))


@pytest.mark.slow
def test_evaluation_takes_the_model_part_of_the_train_state_as_sharded():
  """The train loop hands the eval functions state[0], the model part of its (model, optimizer)
  state, with state_sharding[0]; zero-shot and eval runs hand them nnx.split(model)'s state. The
  same tree with the same partition specs: one set of eval functions, and no array is copied or
  resharded for an evaluation."""
  import types

  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from claver_jax import optim, sharding
  from claver_jax.models import families
  from claver_jax.models.build import make_model
  config = tiny_config(1)
  config.mesh.fsdp = 1
  model = make_model(config, types.SimpleNamespace(vocab_size=100, eot_token_id=99),
                     nnx.Rngs(0))
  family = families.of(model)
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=10, steps_per_epoch=10)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim, family.group_of))
  mesh = sharding.make_mesh(config.mesh)
  _, train_state = nnx.split((model, optimizer))
  _, model_state = nnx.split(model)
  rules = family.sharding_rules
  specs = [s.spec for s in jax.tree.leaves(sharding.state_shardings(mesh, train_state, rules)[0])]
  assert jax.tree.structure(train_state[0]) == jax.tree.structure(model_state)
  assert specs == [s.spec
                   for s in jax.tree.leaves(sharding.state_shardings(mesh, model_state, rules))]
  assert any(spec != P() for spec in specs)             # Sharded parameters are compared too.
  assert all(a is b for a, b in zip(jax.tree.leaves(train_state[0]),
                                    jax.tree.leaves(model_state)))
