"""Parameter groups: who decays, who learns x10, and that frozen towers do not move."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax import optim
from claver_jax.models import CLAVER, CLAVERConfig, families
from test_claver import TINY

group_of = families.get('claver').group_of


def tiny_claver() -> CLAVER:
  return CLAVER(CLAVERConfig(clip=TINY, num_frames=2, temporal='kmt', temporal_layers=1),
                rngs=nnx.Rngs(0))


@pytest.mark.parametrize('path,ndim,expected', [
    ('temporal.blocks.0.attn.qkv.kernel', 2, True),
    ('temporal.blocks.0.attn.qkv.bias', 1, False),
    ('temporal.blocks.0.ln_1.scale', 1, False),
    ('temporal.temporal_embedding', 2, False),
    ('clip.visual.positional_embedding', 2, False),
    ('clip.text.positional_embedding', 2, False),
    ('clip.visual.class_embedding', 1, False),
    ('clip.visual.conv1.kernel', 4, True),
    ('clip.visual.proj', 2, True),
    ('clip.text.token_embedding.embedding', 2, True),
    ('clip.logit_scale', 0, False),
])
def test_weight_decay_mask(path, ndim, expected):
  assert optim.decays(path, ndim) is expected


def test_groups():
  assert group_of('clip.visual.blocks.3.mlp.c_fc.kernel') == 'image'
  assert group_of('clip.text.ln_final.scale') == 'text'
  assert group_of('temporal.temporal_embedding') == 'new'
  assert group_of('clip.logit_scale') == 'base'


def one_step(freeze_image: bool, freeze_text: bool, text_lr_multiplier: float = 1.0):
  """One AdamW step with unit gradients; returns (before, after) parameter dicts by path."""
  config = optim.default_config()
  config.freeze_image, config.freeze_text = freeze_image, freeze_text
  config.text_lr_multiplier = text_lr_multiplier
  config.warmup_epochs, config.weight_decay = 0.0, 0.0
  model = tiny_claver()
  wrt = optim.trainable_filter(config, group_of)
  tx, schedule = optim.make_optimizer(config, group_of, total_steps=10, steps_per_epoch=5)
  assert float(schedule(0)) == pytest.approx(config.lr)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  before = {'.'.join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, wrt))
  optimizer.update(model, grads)
  after = {'.'.join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}
  return config, before, after


def test_new_parts_learn_ten_times_faster_and_frozen_towers_stay():
  config, before, after = one_step(freeze_image=True, freeze_text=False)
  moved = {k: np.abs(after[k] - before[k]).max() for k in before}
  # Adam's first step moves every coordinate by the learning rate (the gradient's sign).
  assert moved['temporal.temporal_embedding'] == pytest.approx(10 * config.lr, rel=1e-3)
  assert moved['clip.text.positional_embedding'] == pytest.approx(config.lr, rel=1e-3)
  # logit_scale is ~2.66, where float32 steps are 2.4e-7: compare to within two of them.
  assert moved['clip.logit_scale'] == pytest.approx(config.lr, abs=5e-7)
  assert all(v == 0 for k, v in moved.items() if k.startswith('clip.visual.'))


def test_text_tower_learning_rate_multiplier():
  config, before, after = one_step(freeze_image=False, freeze_text=False, text_lr_multiplier=0.1)
  moved = {k: np.abs(after[k] - before[k]).max() for k in before}
  # Float32 steps of these weights are up to 3e-8: compare to 1%.
  assert moved['clip.text.token_embedding.embedding'] == pytest.approx(0.1 * config.lr, rel=1e-2)
  assert moved['clip.text.blocks.0.attn.qkv.kernel'] == pytest.approx(0.1 * config.lr, rel=1e-2)
  assert moved['clip.visual.conv1.kernel'] == pytest.approx(config.lr, rel=1e-3)
  assert moved['temporal.temporal_embedding'] == pytest.approx(10 * config.lr, rel=1e-3)


def test_freezing_the_text_tower_too():
  _, before, after = one_step(freeze_image=True, freeze_text=True)
  for k in before:
    unchanged = np.array_equal(before[k], after[k])
    assert unchanged == (k.startswith('clip.visual.') or k.startswith('clip.text.')), k


def test_nothing_frozen_trains_everything():
  _, before, after = one_step(freeze_image=False, freeze_text=False)
  assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_schedule_warms_up_then_decays_to_a_hundredth():
  config = optim.default_config()
  schedule = optim.learning_rate_schedule(config, total_steps=100, steps_per_epoch=4)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(config.lr / 2)      # halfway through 5 epochs
  assert float(schedule(20)) == pytest.approx(config.lr)
  assert float(schedule(100)) == pytest.approx(config.lr / 100)
  values = [float(schedule(s)) for s in range(20, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))           # cosine: monotone decay
