"""Parameter groups: who decays, who learns x10, and that frozen towers do not move."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax import optim
from claver_jax.models import CLAVER, CLAVERConfig, families
from helpers import tiny_clip

TINY = tiny_clip()

group_of = families.get('claver').group_of


def tiny_claver() -> CLAVER:
  return CLAVER(CLAVERConfig(clip=TINY, num_frames=2, temporal='kmt', temporal_layers=1),
                rngs=nnx.Rngs(0))


@pytest.mark.parametrize('path,ndim,expected', [
    ('temporal.blocks.0.attn.qkv.kernel', 2, True),
    ('temporal.blocks.0.attn.qkv.bias', 1, False),
    ('temporal.blocks.0.ln_1.scale', 1, False),
    ('temporal.temporal_embedding', 2, True),
    ('clip.visual.positional_embedding', 2, False),
    ('clip.text.positional_embedding', 2, False),
    ('clip.visual.class_embedding', 1, False),
    ('clip.visual.conv1.kernel', 4, True),
    ('clip.visual.proj', 2, True),
    ('clip.text.token_embedding.embedding', 2, True),
    ('clip.logit_scale', 0, True),
])
def test_weight_decay_mask(path, ndim, expected):
  assert optim.decays(path, ndim) is expected


def official_rules(name: str, shape: tuple[int, ...]) -> dict[str, bool | float]:
  """yjyddq/CLAVER utils/optimizer.py on one of its parameter names: set_weight_decay (1-D
  parameters, '.bias' names and CLAVER.no_weight_decay_keywords() = {'positional_embedding'}
  exempt), the 10x group ('temporal_' in the name) and fix_image (the ViT frozen except
  ln_post, proj and the class embedding)."""
  trainable_fixed = ('temporal_' in name or any(k in name for k in (
      'visual.ln_post', 'visual.proj', 'visual.class_embedding')) or 'visual.' not in name)
  return {'decays': not (len(shape) == 1 or name.endswith('.bias')
                         or 'positional_embedding' in name),
          'lr_multiplier': 10.0 if 'temporal_' in name else 1.0,
          'trainable_under_freeze_image': trainable_fixed}


def test_every_parameter_decays_learns_and_freezes_as_the_official_code_says():
  """Every parameter of a CLAVER, by its official name (the converter's key map): weight decay,
  learning-rate group and the official fix_image (`optim.freeze_image=True`)."""
  import dataclasses
  from convert.claver_to_flax import temporal_entries
  from convert.common import openai_entries
  model = tiny_claver()
  ours = {'.'.join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  entries = [dataclasses.replace(e, dst=f'clip.{e.dst}') for e in openai_entries(TINY)]
  entries += temporal_entries(TINY.vision_width, 2, 1)
  assert sorted(e.dst for e in entries) == sorted(ours), 'the key map misses parameters'
  config = optim.default_config()
  config.freeze_image = True
  trainable = optim.trainable_filter(config, group_of)
  for entry in entries:
    value = ours[entry.dst]
    for name, shape in zip(entry.srcs, entry.shapes):
      official = official_rules(name, shape)
      assert optim.decays(entry.dst, value.ndim) is official['decays'], (entry.dst, name)
      multiplier = config.new_lr_multiplier if group_of(entry.dst) == 'new' else 1.0
      assert multiplier == official['lr_multiplier'], (entry.dst, name)
      assert (trainable(tuple(entry.dst.split('.')), value)
              is official['trainable_under_freeze_image']), (entry.dst, name)


def test_groups():
  assert group_of('clip.visual.blocks.3.mlp.c_fc.kernel') == 'image'
  assert group_of('clip.visual.ln_post.scale') == 'image_head'
  assert group_of('clip.visual.proj') == 'image_head'
  assert group_of('clip.visual.class_embedding') == 'image_head'
  assert group_of('clip.visual.positional_embedding') == 'image'
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


@pytest.mark.slow
def test_new_parts_learn_ten_times_faster_and_frozen_towers_stay():
  config, before, after = one_step(freeze_image=True, freeze_text=False)
  moved = {k: np.abs(after[k] - before[k]).max() for k in before}
  # Adam's first step moves every coordinate by the learning rate (the gradient's sign).
  assert moved['temporal.temporal_embedding'] == pytest.approx(10 * config.lr, rel=1e-3)
  assert moved['clip.text.positional_embedding'] == pytest.approx(config.lr, rel=1e-3)
  # logit_scale is ~2.66, where float32 steps are 2.4e-7: compare to within two of them.
  assert moved['clip.logit_scale'] == pytest.approx(config.lr, abs=5e-7)
  # The official fix_image: the ViT's output head and class token still learn, nothing else.
  head = ('clip.visual.ln_post.scale', 'clip.visual.ln_post.bias', 'clip.visual.proj',
          'clip.visual.class_embedding')
  for k in head:
    assert moved[k] == pytest.approx(config.lr, rel=1e-2), k
  assert all(v == 0 for k, v in moved.items() if k.startswith('clip.visual.') and k not in head)


@pytest.mark.slow
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
    frozen = k.startswith('clip.text.') or (k.startswith('clip.visual.') and group_of(k) == 'image')
    assert unchanged == frozen, k


def test_both_towers_train_by_default():
  """The official FIX_IMAGE=False and the paper's Table 11 headline."""
  assert optim.default_config().freeze_image is False
  assert optim.default_config().freeze_text is False


def test_nothing_frozen_trains_everything():
  _, before, after = one_step(freeze_image=False, freeze_text=False)
  assert all(not np.array_equal(before[k], after[k]) for k in before)


def timm_cosine(t: int, *, base: float, lr_min: float, t_initial: int, warmup_t: int) -> float:
  """timm.scheduler.CosineLRScheduler._get_lr as the official build_scheduler configures it
  (warmup_lr_init=0, cycle_limit=1, cycle_mul=cycle_decay=k_decay=1, no warm-up prefix)."""
  if t < warmup_t:
    return t * base / warmup_t
  if t >= t_initial:
    return lr_min
  return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))


@pytest.mark.parametrize('epochs,warmup_epochs,steps_per_epoch', [(6, 1.0, 7), (20, 5.0, 3),
                                                                  (3, 0.5, 5), (4, 0.0, 4)])
def test_schedule_is_timms_cosine_at_every_step(epochs, warmup_epochs, steps_per_epoch):
  """Every step of short schedules, for the base group and the 10x group, against the formula:
  t_initial = all steps, warmup_t = the warm-up steps (truncated), lr_min = lr / 100 for every
  group (timm's lr_min is one number), no warm-up prefix."""
  config = optim.default_config()
  config.warmup_epochs = warmup_epochs
  total = int(epochs * steps_per_epoch)
  warmup = int(warmup_epochs * steps_per_epoch)
  for multiplier in (1.0, 10.0):
    schedule = optim.learning_rate_schedule(config, total_steps=total,
                                            steps_per_epoch=steps_per_epoch,
                                            peak=multiplier * config.lr)
    got = np.asarray(jax.vmap(schedule)(jnp.arange(total + 3)))
    expected = [timm_cosine(t, base=multiplier * config.lr, lr_min=config.lr / 100,
                            t_initial=total, warmup_t=warmup) for t in range(total + 3)]
    # float32: within 2e-6 of each value, or 1e-7 of the peak near the end of the cosine.
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7 * multiplier * config.lr)


def test_warmup_ends_below_the_peak_as_the_official_schedule():
  """The cosine runs from step 0: at the end of 5 warm-up epochs the rate is 0.983 of its peak
  for 60 epochs, 0.855 for the 20-epoch pretrain (the issue's figures)."""
  config = optim.default_config()
  for epochs, ratio in ((60, 0.983), (20, 0.855)):
    schedule = optim.learning_rate_schedule(config, total_steps=epochs * 100, steps_per_epoch=100)
    assert float(schedule(500)) / config.lr == pytest.approx(ratio, abs=1e-3)
    assert float(schedule(499)) / config.lr == pytest.approx(499 / 500)


def test_optimizer_steps_follow_each_groups_schedule():
  """The AdamW the loop builds: at each of 8 steps, the temporal parts (10x) and the text tower
  (1x) move by their group's rate of that step (Adam's step is the rate, for constant
  gradients), weight decay off."""
  config = optim.default_config()
  config.warmup_epochs, config.weight_decay = 1.0, 0.0
  model = tiny_claver()
  wrt = optim.trainable_filter(config, group_of)
  tx, _ = optim.make_optimizer(config, group_of, total_steps=8, steps_per_epoch=2)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, wrt))
  for t in range(8):
    before = (np.asarray(model.temporal.temporal_embedding[...]),
              np.asarray(model.clip.text.positional_embedding[...]))
    optimizer.update(model, grads)
    moved = [np.abs(before[0] - model.temporal.temporal_embedding[...]).max(),
             np.abs(before[1] - model.clip.text.positional_embedding[...]).max()]
    for got, multiplier in zip(moved, (10.0, 1.0)):
      expected = timm_cosine(t, base=multiplier * config.lr, lr_min=config.lr / 100, t_initial=8,
                             warmup_t=2)
      assert got == pytest.approx(expected, rel=2e-3, abs=1e-9), (t, multiplier)
