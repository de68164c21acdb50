"""Motion prompts (after SiF): the streams, frame order, frozen towers, the parameter budget,
towers from another family's checkpoint, a CLI run, predict."""

from __future__ import annotations

import json
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from claver_jax import optim
from claver_jax.models import build
from claver_jax.models import (CLAVER, XCLIP, CLAVERConfig, CLIPConfig, MotionPrompts,
                               MotionPromptsConfig, XCLIPConfig, families, load, write_model_dir)
from claver_jax.models.motion_prompts import STREAMS
from conftest import REPO, run_cli
from helpers import load_config, steps_on_cached_texts, tiny_clip, unchanged
from test_protocols import SPLITS, motion_dir, zeroshot_config  # noqa: F401 (a fixture)

TINY = tiny_clip()

# Jitted: eager calls dispatch every small op on its own.
streams = nnx.jit(lambda model, video: model.motion.streams(
    model.down(model.frame_embeddings(video))))
tokens_of = nnx.jit(lambda model, streams: model.motion.tokens(model.motion.fuse_streams(streams)))
logits = nnx.jit(lambda model, video, tokens: model.logits(video, tokens))


def tiny_model(**kw) -> MotionPrompts:
  return MotionPrompts(MotionPromptsConfig(clip=TINY, num_frames=4, heads=2, **kw),
                       rngs=nnx.Rngs(0))


def random_video(seed=1):
  return np.asarray(jax.random.normal(jax.random.key(seed), (2, 4, 16, 16, 3)))


# ------------------------------------------------------------------------------------ streams
@pytest.mark.parametrize('fusion,long_term', [('sum', 'mean'), ('concat', 'stride')])
@pytest.mark.slow
def test_zeroing_any_stream_changes_the_output(fusion, long_term):
  model = tiny_model(fusion=fusion, long_term=long_term)
  s = streams(model, random_video())
  assert set(s) == set(STREAMS) and all(v.shape == (2, 4, 8) for v in s.values())   # d = E / 4
  full = np.asarray(tokens_of(model, s))
  for name in STREAMS:
    assert np.abs(np.asarray(s[name])).max() > 1e-4, name
    zeroed = np.asarray(tokens_of(model, {**s, name: jnp.zeros_like(s[name])}))
    # The video embedding is the mean of the motion tokens: it moves too.
    assert np.abs(zeroed.mean(1) - full.mean(1)).max() > 1e-4, name


@pytest.mark.slow
def test_reversing_the_frames_changes_the_motion_tokens_not_the_spatial_mean():
  model = tiny_model()
  video = random_video()
  forward, backward = streams(model, video), streams(model, video[:, ::-1])
  np.testing.assert_allclose(backward['spatial'].mean(1), forward['spatial'].mean(1), atol=1e-6)
  assert np.abs(np.asarray(tokens_of(model, backward) - tokens_of(model, forward))).max() > 1e-3
  # Without the position embedding the spatial stream is just permuted, yet the motion tokens
  # of the reversed clip are not those of the clip reversed: the differences changed sign.
  model.motion.positional_embedding[...] = jnp.zeros((4, 8))
  forward, backward = streams(model, video), streams(model, video[:, ::-1])
  np.testing.assert_allclose(backward['spatial'], forward['spatial'][:, ::-1], atol=1e-6)
  assert np.abs(np.asarray(backward['short']) - np.asarray(forward['short'])[:, ::-1]).max() > 1e-4
  reversed_tokens = np.asarray(tokens_of(model, backward))
  assert np.abs(reversed_tokens - np.asarray(tokens_of(model, forward))[:, ::-1]).max() > 1e-4


@pytest.mark.slow
def test_frame_embeddings_take_no_gradient():
  model = tiny_model()
  video = random_video()
  grads = nnx.grad(lambda m: m.encode_video(video).sum())(model)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['clip']['visual']))
  # The map back to E starts at zero: it learns first, the motion parts from the next step on.
  assert float(jnp.abs(grads['up']['kernel']).max()) > 0


@pytest.mark.slow
def test_a_fresh_model_scores_as_clip_mean():
  """Every map back to the embed dim starts at zero: the cosines are CLIP-Mean's (which does not
  re-normalise its mean frame embedding, hence the norms)."""
  model = tiny_model()
  mean = CLAVER(CLAVERConfig(clip=TINY, num_frames=4, temporal='mean'), rngs=nnx.Rngs(1))
  nnx.update(mean.clip, nnx.state(model.clip, nnx.Param))
  video = random_video()
  tokens = np.random.default_rng(0).integers(1, TINY.vocab_size, (5, 8)).astype(np.int32)
  got, want = np.asarray(logits(model, video, tokens)), np.asarray(logits(mean, video, tokens))
  norms = np.linalg.norm(np.asarray(nnx.jit(lambda m, v: m.encode_video(v))(mean, video)), axis=-1)
  np.testing.assert_allclose(got * norms[:, None], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- towers from another family
@pytest.fixture(scope='module')
def claver_dir(tmp_path_factory):
  """A tiny CLAVER as a run exports it (tests/tiny_config.py, learnt tokenizer): the source of
  the towers."""
  from claver_jax.data import synthetic
  from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
  from claver_jax.text.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp('claver')
  config = tiny_config.get_config()
  tokenizer = train_tokenizer([f'{n} moving' for n in synthetic.CLASS_NAMES], root / 'tokenizer',
                              num_merges=50)
  model = build.make_model(config, tokenizer, nnx.Rngs(0))
  build.export_model(model, tokenizer, root / 'model', {'templates': ['{}.']},
                     (CLIP_MEAN, CLIP_STD))
  return root / 'model'


def motion_config(checkpoint, **overrides):
  config = tiny_config.get_config('motion_prompts')
  config.init.checkpoint = str(checkpoint)
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


@pytest.mark.slow
def test_towers_come_from_another_familys_checkpoint(claver_dir):
  source = load(claver_dir)
  tokenizer = types.SimpleNamespace(vocab_size=source.cfg.clip.vocab_size)
  model = build.make_model(motion_config(claver_dir), tokenizer, nnx.Rngs(0))
  assert isinstance(model, MotionPrompts) and model.cfg.clip == source.cfg.clip
  for a, b in zip(jax.tree.leaves(nnx.state(model.clip)), jax.tree.leaves(nnx.state(source.clip))):
    np.testing.assert_array_equal(a, b)
  # The `mean` baseline from the same checkpoint: CLAVER's CLIP-Mean on the same towers.
  mean = build.make_model(motion_config(claver_dir, **{'model.name': 'claver',
                                                       'model.temporal': 'mean'}),
                          tokenizer, nnx.Rngs(0))
  assert isinstance(mean, CLAVER) and mean.temporal is None
  np.testing.assert_array_equal(mean.clip.visual.proj[...], source.clip.visual.proj[...])


@pytest.mark.slow
def test_init_rules_are_explicit(claver_dir, tmp_path):
  with pytest.raises(ValueError, match="holds a 'claver' model but config.model.name="
                     "'motion_prompts'.*--config.init.towers_only=True"):
    build.model_family(motion_config(claver_dir, **{'init.towers_only': False}))
  with pytest.raises(ValueError, match='trains on frozen CLIP towers: set '
                     '--config.optim.freeze_image=True'):
    build.model_family(motion_config(claver_dir, **{'optim.freeze_image': False}))
  with pytest.raises(ValueError, match='towers_only=True takes the towers of '
                     'config.init.checkpoint, which is empty'):
    build.model_family(motion_config(''))
  with pytest.raises(ValueError, match='trains on frozen CLIP towers: pass them'):
    build.model_family(motion_config('', **{'init.towers_only': False}))
  xclip = XCLIP(XCLIPConfig(clip=TINY, num_frames=4, mit_heads=2, prompt_heads=2),
                rngs=nnx.Rngs(0))
  xclip_dir = write_model_dir(tmp_path / 'xclip', kind='xclip', config=xclip.cfg,
                              params=nnx.to_pure_dict(nnx.state(xclip, nnx.Param)),
                              normalization=((0.5,) * 3, (0.5,) * 3))
  with pytest.raises(ValueError, match='holds a xclip model, which has no plain CLIP towers'):
    build.model_family(motion_config(xclip_dir))
  assert build.model_family(motion_config(claver_dir)).name == 'motion_prompts'


# ------------------------------------------------------------------------------ a train step
@pytest.mark.slow
def test_four_train_steps_learn_and_leave_the_towers_alone(claver_dir):
  config = motion_config(claver_dir)
  config.optim.warmup_epochs = 0.0
  source = load(claver_dir)
  model = build.make_model(config, types.SimpleNamespace(vocab_size=source.cfg.clip.vocab_size),
                           nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = np.zeros((2, 3, 8), np.int32)                   # A=2 sets of C=3 classes
  tokens[..., 0], tokens[..., 1:4] = 1, rng.integers(2, source.cfg.clip.vocab_size - 1, (2, 3, 3))
  tokens[..., 4] = source.cfg.clip.vocab_size - 1
  losses, before, after = steps_on_cached_texts(model, config, tokens, rng)
  assert losses[-1] < losses[0], losses
  for part, moves in (('clip', False), ('down', True), ('motion', True), ('up', True),
                      ('prompts', True), ('communication', True)):
    assert unchanged(before[part], after[part]) != moves, part


# ---------------------------------------------------------------------------- the budget
def test_the_presets_start_where_their_recipes_say():
  from claver_jax.data.transforms import CLIP_MEAN
  k400 = load_config('k400', 'B16,8,motion_prompts')
  assert (k400.init.require, k400.optim.lr, k400.text.templates) == ('clip', 3e-4, '{}')
  assert tuple(k400.data.mean) == CLIP_MEAN and k400.train.epochs == 30
  few = load_config('ucf101', 'shots=2,motion_prompts')
  assert (few.data.shots, few.init.require, few.train.epochs) == (2, 'clip', 50)
  full = load_config('hmdb51', 'full,motion_prompts')
  assert full.init.require == 'checkpoint'
  assert 'configs/k400.py:B16,32,motion_prompts' in full.init.require_from
  demo = load_config('demo', 'motion_prompts')
  assert (demo.init.require, demo.init.towers_only, demo.text.tokenizer) == ('checkpoint', True, '')
  with pytest.raises(ValueError, match='pretrain'):
    load_config('k400', 'B16,32,pretrain,motion_prompts')


@pytest.mark.parametrize('name,arg', [('k400', 'B16,8,motion_prompts'),
                                      ('k400', 'B32,8,motion_prompts'),
                                      ('k400', 'L14,8,motion_prompts'),
                                      ('k600', 'B16,16,motion_prompts'),
                                      ('ucf101', 'shots=2,motion_prompts'),
                                      ('hmdb51', 'full,motion_prompts'),
                                      ('demo', 'motion_prompts')])
@pytest.mark.slow
def test_the_configs_train_at_most_five_percent_of_the_towers(name, arg):
  config = load_config(name, arg)
  assert config.model.name == 'motion_prompts'
  assert config.optim.freeze_image and config.optim.freeze_text
  family = families.get('motion_prompts')
  if name == 'demo':   # Its towers' vocabulary is learnt by the run; 514 is the least it can be.
    clip = CLIPConfig(**{**config.model.clip.to_dict(), 'vocab_size': 514, 'eos_token_id': 513,
                         'image_size': config.data.image_size})
    cfg = families.model_config(config, clip)
  else:
    cfg = families.model_config(config)
  model = nnx.eval_shape(lambda: MotionPrompts(cfg, rngs=nnx.Rngs(0)))
  trainable, towers = optim.count_parameters(model, config.optim, family.group_of)
  assert trainable <= family.trainable_budget * towers, (trainable, towers)
  if (config.model.arch, cfg.num_frames) == ('B16', 8):   # The figure in configs/k400.py.
    assert (trainable, towers) == (828_544, 149_620_737)


# ------------------------------------------------------------------------ a run, predict
@pytest.fixture(scope='module')
def motion_run(claver_dir, tmp_path_factory):
  """tests/tiny_config.py:motion_prompts (the demo's preset) through the CLI, 3 steps, from the
  tiny CLAVER's towers."""
  workdir = tmp_path_factory.mktemp('run') / 'motion'
  proc = run_cli('claver_jax.main', '--config=tests/tiny_config.py:motion_prompts',
                 f'--workdir={workdir}', f'--config.init.checkpoint={claver_dir}',
                 '--config.train.max_steps=3')
  return workdir, proc


@pytest.mark.slow
def test_the_run_prints_its_count_exports_and_keeps_the_towers(motion_run, claver_dir):
  workdir, proc = motion_run
  model = load(workdir / 'model')
  assert isinstance(model, MotionPrompts)
  config = tiny_config.get_config('motion_prompts')
  trainable, towers = optim.count_parameters(model, config.optim, families.of(model).group_of)
  assert f"Trainable parameters: {trainable:,}, {100 * trainable / towers:.2f}% of the CLIP " \
         f"towers' {towers:,}." in proc.stderr
  assert ('above its budget of 5%' in proc.stderr) == (trainable > 0.05 * towers)
  meta = json.loads((workdir / 'model' / 'config.json').read_text())
  assert meta['kind'] == 'motion_prompts'
  source = load(claver_dir)
  for a, b in zip(jax.tree.leaves(nnx.state(model.clip)), jax.tree.leaves(nnx.state(source.clip))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_predict_on_a_synthetic_mp4(motion_run, tmp_path):
  from claver_jax.data import synthetic
  from claver_jax.data.transforms import normalize
  from claver_jax.predict import load_clip_frames
  from claver_jax.text import load_tokenizer
  from claver_jax.text.prompts import prompt_tokens
  clip, _ = synthetic.make_clip(3, num_frames=8, size=32)
  video = tmp_path / 'clip.mp4'
  synthetic.write_mp4(video, clip)
  labels = list(synthetic.CLASS_NAMES[:4]) + ['juggling fire']
  proc = run_cli('claver_jax.predict', f'--checkpoint={motion_run[0]}', f'--video={video}',
                 '--labels', *labels, '--json')
  got = {r['label']: r['score'] for r in json.loads(proc.stdout)}
  # Independently: what the directory records (normalisation, texts, test view), per text
  # variant a softmax over the labels of `logits`, averaged.
  directory = motion_run[0] / 'model'
  meta = json.loads((directory / 'config.json').read_text())
  model, tokenizer = load(directory), load_tokenizer(directory)
  tokens = prompt_tokens(labels, tokenizer, None, templates=meta['source']['templates'],
                         name=meta['source']['bare_name'],
                         context_length=model.cfg.clip.context_length).tokens
  frames = load_clip_frames(video, 4, 16, meta['source']['eval_resize_ratio'])
  video = normalize(frames[None], tuple(meta['normalization']['mean']),
                    tuple(meta['normalization']['std']))
  want = np.mean([jax.nn.softmax(logits(model, video, t)[0]) for t in tokens], axis=0)
  np.testing.assert_allclose([got[label] for label in labels], want, atol=1e-5)


@pytest.mark.slow
def test_eval_and_zero_shot_take_it_like_the_other_families(motion_run, claver_dir, motion_dir,
                                                            tmp_path):
  from claver_jax import zeroshot
  workdir, _ = motion_run
  metrics = workdir / 'metrics.jsonl'
  trained = [json.loads(line) for line in metrics.read_text().splitlines()]
  run_cli('claver_jax.main', '--config=tests/tiny_config.py:motion_prompts', f'--workdir={workdir}',
          f'--config.init.checkpoint={claver_dir}', '--config.mode=eval')
  evaluated = json.loads(metrics.read_text().splitlines()[-1])
  assert evaluated['step'] == 3
  assert evaluated['eval/top1'] == [m for m in trained if 'val/top1' in m][-1]['val/top1']
  report = zeroshot.run_zeroshot(zeroshot_config(workdir, motion_dir, 'ucf101'),
                                 str(tmp_path / 'zeroshot'))
  runs = report['datasets']['ucf101']['runs']
  assert {name: r['num_videos'] for name, r in runs.items()} == {
      f'split{s}': len(clips) for s, clips in SPLITS.items()}


# ---------------------------------------------------------------------- sharding and FLOPs
def test_sharding_rules_cover_the_new_parameters():
  from jax.sharding import PartitionSpec as P
  from claver_jax.models.families import FAMILIES
  from claver_jax.sharding import spec_for
  abstract = nnx.eval_shape(lambda: tiny_model(fusion='concat'))
  params = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  matrices = {'.'.join(map(str, p)): v.shape for p, v in params.items()
              if len(v.shape) == 2 and p[0] != 'clip' and not p[-1].endswith('embedding')
              and p[-1] != 'queries'}
  assert {'down.kernel', 'up.kernel', 'motion.fuse.kernel', 'motion.short_mlp.c_fc.kernel',
          'motion.blocks.0.attn.qkv.kernel', 'prompts.cross_attn.q_proj.kernel',
          'prompts.generator.decoder.0.cross_attn.proj.kernel', 'prompts.up.kernel',
          'communication.text_cross_attn.proj.kernel',
          'communication.video_up.kernel'} <= set(matrices)
  rules = FAMILIES['motion_prompts'].sharding_rules
  unsharded = [p for p, shape in matrices.items() if spec_for(p, shape, 2, rules) == P()]
  assert unsharded == [], unsharded


def test_sharding_logs_each_parameter_it_cannot_shard(caplog):
  """Over fsdp=3, which divides most tiny widths but not the concatenated streams' 3d, each
  matrix a rule names is listed with the dim that does not divide, and those no rule names as
  such, in one log record; over fsdp=2 only those no rule names; fsdp=1 logs nothing."""
  from claver_jax.models.families import FAMILIES
  from claver_jax.sharding import log_unsharded
  state = nnx.state(nnx.eval_shape(lambda: tiny_model(fusion='concat')))
  rules = FAMILIES['motion_prompts'].sharding_rules
  with caplog.at_level(logging.INFO, logger='root'):
    lines = log_unsharded(state, 3, rules)
  assert [r.getMessage().count('\n  ') for r in caplog.records] == [len(lines)]
  assert {'down.kernel [32, 8]: dim 0 (32) does not divide by fsdp=3',
          'up.kernel [8, 32]: dim 1 (32) does not divide by fsdp=3',
          'clip.visual.conv1.kernel [8, 8, 3, 128]: dim 3 (128) does not divide by fsdp=3',
          'prompts.queries [8, 8]: no rule shards it'} <= set(lines)
  assert not [line for line in lines if line.startswith('motion.fuse.kernel [24, 8]')]
  assert log_unsharded(state, 2, rules) == [
      'clip.text.positional_embedding [8, 64]: no rule shards it',
      'clip.visual.positional_embedding [5, 128]: no rule shards it',
      'motion.positional_embedding [4, 8]: no rule shards it',
      'motion.short_conv.kernel [3, 1, 8]: no rule shards it',
      'prompts.queries [8, 8]: no rule shards it']
  assert log_unsharded(state, 1, rules) == []


def test_flat_keys_of_earlier_versions_name_their_new_place():
  """--config.model.motion_width (before each family had its sub-dict) names
  config.model.motion.width, as the CLI's one-line error (cli.unknown_key)."""
  from claver_jax import cli
  assert cli.unknown_key([f'--config={REPO / "configs" / "demo.py"}:motion_prompts',
                          '--config.model.motion_width=64']) == (
      '--config.model.motion_width: config.model.motion_width is now config.model.motion.width '
      "(each model family's keys are in its own sub-dict).")


@pytest.mark.slow
def test_flops_count_the_tower_and_the_new_parts():
  from claver_jax.flops import report
  from test_flops import vit_flops_by_hand
  cfg = MotionPromptsConfig(clip=TINY, num_frames=4, heads=2)
  r = report(cfg, num_classes=10)
  # The ViT's class-token path over T frames: all of the video side's cost but the new parts'.
  assert r['vit'] * 1e9 == pytest.approx(vit_flops_by_hand(TINY, 4), rel=0.03)
  assert 0 < r['temporal'] < r['vit'] and r['classes'] > 0
  proc = run_cli('claver_jax.flops', '--config=configs/k400.py:B16,8,motion_prompts')
  assert ('motion_prompts B16, 8 frames at 224 px, 1 motion layers of width 128'
          in proc.stdout)
