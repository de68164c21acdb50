"""The paper's recipes as the presets give them: which towers train, the batch and description
sets per update, the loss over the drawn sets, a preset run's schedule under train.max_steps, its
end-of-run 4x3 test, and evaluating its workdir with nothing but the workdir."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax import memory, optim, sharding
from claver_jax.step import draw_sets, make_train_step, soft_cross_entropy, step_keys
from claver_jax.data.mixup import smooth_one_hot
from claver_jax.data.transforms import normalize
from claver_jax.metrics import read_metrics
from claver_jax.models import CLAVER, CLAVERConfig, CLIPConfig, families, write_model_dir
from claver_jax.models.clip import CLIP, pool_index
from conftest import run_cli
from helpers import load_config, run_towers, synthetic_dir, tiny_clip_vocab

CLAVER_PRESETS = [('k400', 'B16,8,kmt'), ('k400', 'B32,8,kmt'), ('k400', 'B16,32,pretrain'),
                  ('k400', 'L14,8,kmct'), ('k600', 'B16,8,kmt'), ('ucf101', 'shots=2'),
                  ('ucf101', 'shots=8,kmct'), ('hmdb51', 'full')]


# ------------------------------------------------------------------------ the presets' settings
@pytest.mark.parametrize('name,arg', CLAVER_PRESETS)
def test_claver_presets_train_both_towers_and_end_with_the_4x3_test(name, arg):
  """The paper's Table 11 headline and the official FIX_IMAGE=False; the official run's end."""
  c = load_config(name, arg)
  assert (c.model.name, c.optim.freeze_image, c.optim.freeze_text) == ('claver', False, False)
  assert c.eval.final_views == '4x3'
  assert load_config('demo').eval.final_views == ''


# (config, argument) -> (clips per GPU per micro-batch, accumulation steps) of the official
# yjyddq/CLAVER configs/<dataset>/<arch>_<frames>.yaml, run on the official README's 8 GPUs.
OFFICIAL_YAMLS = {
    ('k400', 'B32,8,kmt'): (8, 4), ('k400', 'B32,16,kmt'): (8, 4), ('k400', 'B16,8,kmt'): (8, 4),
    ('k400', 'B16,16,kmt'): (4, 8), ('k400', 'B16,32,kmt'): (4, 8),
    ('k400', 'B16,32,pretrain'): (4, 8), ('k400', 'L14,8,kmt'): (4, 8),
    ('k400', 'L14_336,16,kmt'): (1, 32), ('k600', 'B16,8,kmt'): (8, 4),
    ('k600', 'B16,16,kmt'): (4, 8), ('k600', 'B16,32,kmt'): (8, 4), ('k600', 'L14,8,kmt'): (4, 8),
    ('ucf101', 'shots=2'): (4, 2), ('ucf101', 'full'): (4, 2), ('hmdb51', 'shots=16'): (4, 2),
    ('hmdb51', 'full'): (4, 2)}


@pytest.mark.parametrize('preset', list(OFFICIAL_YAMLS))
def test_batch_and_description_sets_per_update_are_the_official_runs(preset):
  """The official configs everywhere: 8 GPUs x clips x accumulation per update, and 5 sets drawn
  per GPU per micro-batch; more draws than sets, so every set is encoded once per step."""
  per_gpu, accumulation = OFFICIAL_YAMLS[preset]
  c = load_config(*preset)
  assert c.train.batch_size == 8 * per_gpu * accumulation
  assert c.text.sets_per_step == 5 * 8 * accumulation
  num_sets, _ = memory.text_shape(c)
  assert num_sets <= c.text.sets_per_step


# --------------------------------------------------------------------- the loss over the draws
TINY = CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=64, vision_layers=1,
                  vision_heads=1, vision_mlp_dim=64, context_length=12, vocab_size=50,
                  text_width=32, text_layers=1, text_heads=1, text_mlp_dim=64, eos_token_id=49)


@pytest.fixture(scope='module')
def tiny_claver():
  return CLAVER(CLAVERConfig(clip=TINY, num_frames=2, temporal='kmt', temporal_layers=1),
                rngs=nnx.Rngs(0))


@pytest.mark.parametrize('preset,num_sets', [(('k400', 'B16,8,kmt'), 26), (('demo', None), 6)])
@pytest.mark.slow
def test_the_step_loss_is_the_mean_over_every_drawn_set(preset, num_sets, tiny_claver):
  """K400's 160 draws of 26 sets (each set encoded once, weighted by its draws) and the demo's 5
  of 6 (the draws encoded): the step's loss is the soft cross-entropy averaged over the K drawn
  sets, duplicates counted, with the text tower training. Tiny towers; mixup off."""
  config = load_config(*preset)
  config.train.batch_size, config.train.mixup_alpha, config.train.cutmix_alpha = 4, 0.0, 0.0
  config.data.num_frames, config.data.image_size = 2, 16
  model = tiny_claver
  rng = np.random.default_rng(0)
  classes = 5
  tokens = np.zeros((num_sets, classes, 12), np.int32)
  for index in np.ndindex(num_sets, classes):
    n = rng.integers(1, 10)
    tokens[index][:n + 2] = [1, *rng.integers(2, 48, n), 49]
  video = rng.integers(0, 256, (4, 2, 16, 16, 3), dtype=np.uint8)
  labels = np.array([0, 1, 4, 2], np.int32)
  draws = config.text.sets_per_step
  drawn = np.asarray(draw_sets(step_keys(config.seed, 1)[1], draws, num_sets))
  assert len(set(drawn.tolist())) < draws or draws > num_sets     # duplicates are counted
  # The reference: every drawn set's loss, one by one.
  targets = smooth_one_hot(labels, classes, config.train.label_smoothing)
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  @nnx.jit
  def set_loss(model, set_tokens):
    features = model.video_features(normalize(video, mean, std))
    logits = model.class_logits(features, model.encode_text(set_tokens)[None])
    return soft_cross_entropy(logits, targets)

  per_set = [float(set_loss(model, jnp.asarray(tokens[a]))) for a in range(num_sets)]
  expected = np.mean([per_set[a] for a in drawn])

  family = families.of(model)
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=10, steps_per_epoch=5)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim, family.group_of))
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(make_train_step(graphdef, config, sharding.make_mesh(config.mesh),
                                       pool_index(tokens, TINY) + 1, False, family.group_of))
  _, out = step(state, {'video': video, 'label': labels}, jnp.asarray(tokens), jnp.int32(1))
  assert float(out['loss']) == pytest.approx(expected, rel=1e-5)
  # Not what equal weights over the sets would give.
  assert abs(np.mean(per_set) - expected) > 1e-4


# ------------------------------------------------------------------------ a preset through the CLI
@pytest.fixture(scope='module')
def tiny_clip_dir(tmp_path_factory):
  """A random tiny CLIP model directory with a CLIP-format vocabulary, as convert.clip_to_flax
  writes one."""
  from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
  vocab, merges = tiny_clip_vocab()
  cfg = run_towers(vocab)
  params = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  return write_model_dir(tmp_path_factory.mktemp('clip') / 'tiny_clip', kind='clip', config=cfg,
                         params=params, tokenizer=(vocab, merges),
                         normalization=(CLIP_MEAN, CLIP_STD))


@pytest.fixture(scope='module')
def k400_run(tiny_clip_dir, tmp_path_factory):
  """configs/k400.py:B16,8,kmt from a tiny CLIP on 36 synthetic mp4s (29 train, 7 val) at 4
  frames of 16 px, batch 8, stopped by train.max_steps=2; float32 and one temporal layer (of a
  1-layer ViT) to compile faster. Two runs of the CLI, about 45 s of CPU time together."""
  root = synthetic_dir(tmp_path_factory.mktemp('k400_preset') / 'set', num_videos=36)
  workdir = root.parent / 'run'
  data = (f'--config.data.root={root}', f'--config.data.val_list={root / "val.txt"}',
          f'--config.data.labels={root / "labels.csv"}', '--config.data.num_frames=4',
          '--config.data.image_size=16', '--config.text.prompts=synthetic_motion',
          '--config.data.num_workers=0', '--config.eval.batch_size=4',
          '--config.model.dtype=float32', '--config.model.temporal_layers=1')
  preset = ('claver_jax.main', '--config=configs/k400.py:B16,8,kmt', f'--workdir={workdir}')
  trained = run_cli(*preset, f'--config.init.clip={tiny_clip_dir}', *data,
                    f'--config.data.train_list={root / "train.txt"}',
                    '--config.train.batch_size=8', '--config.train.max_steps=2',
                    '--config.log_every_steps=1')
  return workdir, data, preset, trained


@pytest.mark.slow
def test_max_steps_caps_the_schedule_the_epochs_define(k400_run):
  """29 clips / 8 = 3 steps per epoch, 60 epochs: a 180-step schedule with 15 warm-up steps. The
  run stops at step 2, at that schedule's rates (the rate logged at step s is the one its
  update used, schedule(s - 1)), not at a 2-step schedule's."""
  workdir, *_ = k400_run
  lr = {r['step']: r['train/lr'] for r in read_metrics(workdir) if 'train/lr' in r}
  assert sorted(lr) == [1, 2]
  assert lr[1] == 0.0 and lr[2] == pytest.approx(12e-6 / 15, rel=1e-5)


@pytest.mark.slow
def test_a_run_ends_with_the_multi_view_test_and_its_workdir_evaluates_alone(k400_run):
  """The preset's run ends with eval.final_views='4x3' of its final weights (test/* in
  metrics.jsonl beside the 1-view val/*); the documented 4x3 eval command then needs no
  --config.init.clip: the model and tokenizer come from WORKDIR/model, the weights from the
  latest checkpoint, which are the tested ones, so the two agree."""
  workdir, data, preset, trained = k400_run
  rows = read_metrics(workdir)
  val = [r for r in rows if 'val/top1' in r]
  test = [r for r in rows if 'test/top1' in r]
  assert [r['step'] for r in val] == [2] and val[0]['views'] == '1x1'
  assert len(test) == 1 and test[0]['step'] == 2 and test[0]['views'] == '4x3'
  assert 0 <= test[0]['test/top1'] <= test[0]['test/top5'] <= 100
  assert test[0]['test/num_videos'] == 7
  tested = json.loads((workdir / 'eval' / 'test' / 'per_class.json').read_text())
  assert (tested['step'], tested['views']) == (2, '4x3')
  assert tested['top1'] == pytest.approx(test[0]['test/top1'])
  assert 'test (4x3 views), step 2: top-1' in trained.stderr              # the end-of-run summary
  evaluated = run_cli(*preset, '--config.mode=eval', '--config.eval.num_clips=4',
                      '--config.eval.num_crops=3', *data)
  assert 'is built from' in evaluated.stderr
  last = read_metrics(workdir)[-1]
  assert last['step'] == 2 and last['eval/top1'] == pytest.approx(test[0]['test/top1'])
  assert last['eval/top5'] == pytest.approx(test[0]['test/top5'])
