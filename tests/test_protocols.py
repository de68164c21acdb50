"""The paper's few-shot and zero-shot protocols: K-shot train lists, configs, zero-shot runs."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax import evaluate, zeroshot
from claver_jax.data import synthetic
from claver_jax.data.pipeline import build_pipelines, default_config
from claver_jax.data.sources import DataError, few_shot_indices, read_labels, read_list
from claver_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from claver_jax.models import CLAVER, CLAVERConfig, load, write_model_dir
from claver_jax.param_paths import path_str
from claver_jax.predict import load_clip_frames
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import load_prompt_set, prompt_tokens
from conftest import REPO, SHARED_REFERENCE, run_cli
from helpers import load_config, run_towers, synthetic_dir, tiny_clip_vocab

FRAMES, SIZE = 4, 16
TEMPLATES = ('a clip of {}.', '{} on screen.')    # What tiny_model_dir records it was trained with.
# Three test splits of different sizes over the 36 clips, overlapping as real splits do not,
# so that their accuracies differ.
SPLITS = {1: range(0, 12), 2: range(10, 30), 3: range(24, 36)}
K600_SPLITS = {1: [3, 0, 7, 9, 11], 2: [1, 2, 3, 4, 5], 3: [11, 10, 6, 8, 0]}   # synthetic classes


@pytest.fixture(scope='module')
def motion_dir(tmp_path_factory):
  """36 synthetic clips (32 px, 8 frames): train.txt (29), val.txt (7), all.txt and split lists."""
  root = synthetic_dir(tmp_path_factory.mktemp('protocols') / 'set', num_videos=36)
  lines = [f'{synthetic.relative_path(i)} {i % synthetic.NUM_CLASSES}\n' for i in range(36)]
  (root / 'all.txt').write_text(''.join(lines))
  for split, indices in SPLITS.items():
    (root / f'test{split}.txt').write_text(''.join(lines[i] for i in indices))
  return root


# ------------------------------------------------------------------------------------ few-shot
def test_few_shot_draw_is_exact_deterministic_and_seeded():
  names = ['a', 'b', 'c', 'd', 'e']
  labels = [i % 5 for i in range(53)]
  draw = few_shot_indices(labels, names, 3, seed=0)
  assert np.bincount([labels[i] for i in draw], minlength=5).tolist() == [3] * 5
  assert draw == sorted(set(draw))                                  # Distinct, in list order.
  assert few_shot_indices(labels, names, 3, seed=0) == draw
  assert few_shot_indices(labels, names, 3, seed=1) != draw
  # A class's draw depends on its own clips only: drop class 'e' and the others keep theirs.
  kept = [i for i, label in enumerate(labels) if label != 4]
  without_e = few_shot_indices([labels[i] for i in kept], names[:4], 3, seed=0)
  assert [kept[i] for i in without_e] == [i for i in draw if labels[i] != 4]


def test_too_few_clips_name_the_class_and_the_counts():
  labels = [0, 0, 0, 1, 2, 2, 2]
  with pytest.raises(DataError) as error:
    few_shot_indices(labels, ['run', 'jump', 'swim', 'sit'], 3, seed=0, where='train.txt')
  message = str(error.value)
  assert "'jump' (id 1): 1" in message and "'sit' (id 3): 0" in message
  assert 'shots=3' in message and 'train.txt' in message and "'run'" not in message


def test_pipeline_keeps_k_clips_per_class_and_writes_the_list(motion_dir, tmp_path, caplog):
  cfg = default_config()
  cfg.update(dict(root=str(motion_dir), train_list=str(motion_dir / 'train.txt'),
                  labels=str(motion_dir / 'labels.csv'), num_frames=FRAMES, image_size=SIZE,
                  batch_size=4, shots=2, shots_seed=3))
  with caplog.at_level(logging.INFO):
    data = build_pipelines(cfg, workdir=tmp_path)
  assert data.num_train == 2 * synthetic.NUM_CLASSES
  written = tmp_path / 'train_2shot_seed3.txt'
  kept = read_list(written)
  assert np.bincount([label for _, label in kept]).tolist() == [2] * synthetic.NUM_CLASSES
  assert set(kept) <= set(read_list(motion_dir / 'train.txt'))
  assert 'Few-shot: 2 clips of each of 12 classes, 24 of the 29 clips' in caplog.text
  batch = next(iter(data.train))
  assert batch['video'].shape == (4, FRAMES, SIZE, SIZE, 3) and not batch['substituted'].any()
  build_pipelines(cfg, workdir=tmp_path / 'again')
  assert (tmp_path / 'again' / written.name).read_text() == written.read_text()
  cfg.shots_seed = 4
  build_pipelines(cfg, workdir=tmp_path)
  assert (tmp_path / 'train_2shot_seed4.txt').read_text() != written.read_text()
  cfg.shots = 3     # 'moving left' has clips 0 and 12 in train; 24 went to val.
  with pytest.raises(DataError, match=r"'moving left' \(id 0\): 2"):
    build_pipelines(cfg)


def test_few_shot_and_full_configs():
  """The paper's few-shot recipe by default (Table 14: from the 20-epoch 32-frame K400 model, 80
  epochs, lr 2e-6 to 2e-8); X-CLIP's (50 epochs from CLIP) as `from_clip`."""
  few = load_config('ucf101', 'shots=4,kmct')
  assert (few.data.shots, few.model.temporal, few.train.epochs) == (4, 'kmct', 80)
  assert (few.optim.lr, few.optim.lr * few.optim.end_lr_ratio) == (2e-6, pytest.approx(2e-8))
  assert (few.train.batch_size, few.train.grad_accum_steps) == (64, 2)
  assert (few.data.num_frames, few.model.arch, few.text.prompts) == (32, 'B16', 'ucf101')
  assert few.init.require == 'checkpoint'
  assert '`configs/k400.py:B16,32,kmct,pretrain`' in few.init.require_from
  assert '`configs/k400.py:B16,32,pretrain`' in load_config('hmdb51', 'shots=2').init.require_from
  xclip = load_config('hmdb51', 'shots=2,from_clip')
  assert (xclip.data.shots, xclip.train.epochs, xclip.init.require) == (2, 50, 'clip')
  full = load_config('hmdb51', 'full')
  assert (full.data.shots, full.train.epochs, full.text.prompts) == (0, 80, 'hmdb51')
  assert full.init.require == 'checkpoint'
  assert load_config('hmdb51', '8').data.shots == 8
  pretrain = load_config('k400', 'B16,32,pretrain')
  assert (pretrain.train.epochs, pretrain.data.num_frames, pretrain.model.arch) == (20, 32, 'B16')
  assert load_config('k400', 'B16,32').train.epochs == 60
  assert load_config('k600', 'B16,32').data.num_workers == pretrain.data.num_workers >= 8
  with pytest.raises(ValueError, match='shots=K'):
    load_config('ucf101', 'shots=3')
  with pytest.raises(ValueError, match='from_clip'):
    load_config('ucf101', 'full,from_clip')


# ----------------------------------------------------------------------------------- zero-shot
K600_SHIPPED = REPO / 'claver_jax' / 'data' / 'k600_zeroshot'
K600_REFERENCE = SHARED_REFERENCE / 'k600_zeroshot'


def _key(name: str) -> str:
  return ' '.join(name.lower().split())


def test_the_shipped_k600_splits_are_the_papers_protocol():
  """Three splits of 160 classes of Kinetics-600 (217 distinct), none a Kinetics-400 class, not
  even renamed ('dyeing hair' is K600's 'dying hair'); their video lists label every clip with a
  class of the split; the copies equal ../shared/reference's and say where they come from."""
  k400 = {_key(n) for n in load_prompt_set('kinetics400')}      # exactly K400's class names
  k600 = set(load_prompt_set('kinetics600'))
  renamed = {'dying hair': 'dyeing hair', 'making bed': 'making the bed'}
  assert set(renamed) <= k400 and set(renamed.values()) <= k600
  distinct = set()
  for split in (1, 2, 3):
    labels, videos = zeroshot.k600_split_files('', split)
    assert labels.parent == K600_SHIPPED
    names = read_labels(labels)
    assert len(names) == len(set(names)) == 160 and set(names) <= k600
    assert not {_key(n) for n in names} & k400
    items = read_list(videos, len(names))
    assert len(items) > 13000 and {label for _, label in items} == set(range(160))
    assert all(path.split('/')[0] in ('train', 'val', 'test') for path, _ in items)
    distinct |= set(names)
    if K600_REFERENCE.is_dir():
      for shipped in (labels, videos):
        assert shipped.read_bytes() == (K600_REFERENCE / shipped.name).read_bytes()
  assert len(distinct) == 217 and not set(renamed.values()) & distinct
  assert 'muzairkhattak/ViFi-CLIP' in (K600_SHIPPED / 'README.md').read_text()
  assert zeroshot.k600_video_path('{label}/{file}', 'test/x_000001_000011.mp4', 'arguing') == (
      'arguing/x_000001_000011.mp4')
  assert zeroshot.k600_video_path('{path}', 'val/y.mp4', 'arguing') == 'val/y.mp4'
  with pytest.raises(ValueError, match=r'path_format=.*\{split\}.*\{path\}, \{subset\}'):
    zeroshot.k600_video_path('{split}/{file}', 'val/y.mp4', 'arguing')


def k600_split_dir(motion_dir):
  """Three 'K600 splits' of the synthetic set in the shipped format: 5 classes each (ids 0..4 in
  the split's order), their clips listed without the 'videos/' prefix."""
  names = read_labels(motion_dir / 'labels.csv')
  directory = motion_dir / 'k600_splits'
  directory.mkdir(exist_ok=True)
  for split, classes in K600_SPLITS.items():
    (directory / f'split{split}_labels.csv').write_text(
        'id,name\n' + ''.join(f'{j},{names[c]}\n' for j, c in enumerate(classes)))
    (directory / f'split{split}_videos.txt').write_text(''.join(
        f'{path.removeprefix("videos/")} {classes.index(label)}\n'
        for path, label in read_list(motion_dir / 'all.txt') if label in classes))
  return directory


def random_params(cfg: CLAVERConfig, seed: int = 0) -> dict:
  """Random parameters of a CLAVER, drawn with numpy (no per-initialiser compiles): fan-in
  scaled normals, unit LayerNorm scales, CLIP's initial logit scale."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path_str(path)
    if name.endswith('logit_scale'):
      return np.asarray(np.log(1 / 0.07), np.float32)
    if name.endswith('scale'):
      return np.ones(leaf.shape, np.float32)
    std = np.prod(leaf.shape[:-1]) ** -0.5 if len(leaf.shape) > 1 else 0.1
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  abstract = nnx.eval_shape(lambda: CLAVER(cfg, rngs=nnx.Rngs(0)))
  return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory):
  """A random tiny KMT CLAVER (4 frames of 16 px) with a tiny CLIP-format vocabulary, recording
  TEMPLATES as a run's WORKDIR/model does, and ImageNet's input normalisation."""
  vocab, merges = tiny_clip_vocab()
  clip = run_towers(vocab, image_size=SIZE, context_length=77)
  cfg = CLAVERConfig(clip=clip, num_frames=FRAMES, temporal='kmt', temporal_layers=1)
  return write_model_dir(tmp_path_factory.mktemp('model') / 'tiny', kind='claver', config=cfg,
                         params=random_params(cfg), tokenizer=(vocab, merges),
                         source={'templates': list(TEMPLATES)},
                         normalization=(IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture(scope='module')
def independent_top_k(tiny_model_dir):
  """(root, items, class_names) -> top-1 / top-5 (%) of the videos `items`, read one by one as
  predict reads them and normalised as the directory records, scored over the class names, the
  model's recorded TEMPLATES and the synthetic_motion texts: softmax over classes per description
  set, mean over sets."""
  model, tokenizer = load(tiny_model_dir), load_tokenizer(tiny_model_dir)

  @nnx.jit
  def scores(model, video, tokens):
    a, c, s = tokens.shape
    text = model.encode_text(tokens.reshape(a * c, s)).reshape(a, c, -1)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    embedding = model.encode_video(normalize(video, IMAGENET_MEAN, IMAGENET_STD))
    logits = jnp.exp(model.clip.logit_scale[...]) * jnp.einsum('be,ace->abc', embedding, text)
    return jax.nn.softmax(logits, axis=-1).mean(axis=0)

  def top_k(root, items, class_names) -> tuple[float, float]:
    texts = prompt_tokens(class_names, tokenizer, 'synthetic_motion', templates=TEMPLATES)
    video = np.stack([load_clip_frames(root / path, FRAMES, SIZE) for path, _ in items])
    s = np.asarray(scores(model, jnp.asarray(video), jnp.asarray(texts.tokens)))
    labels = np.array([label for _, label in items])
    return (100 * evaluate.topk_correct(s, labels, 1).mean(),
            100 * evaluate.topk_correct(s, labels, 5).mean())

  return top_k


@pytest.mark.slow
def test_a_temporal_head_other_than_the_checkpoints_is_one_config_error(tiny_model_dir, tmp_path):
  """`shots=2,kmct` from a KMT checkpoint would train KMT: a one-line config error naming both,
  before anything is written. The KMCT few-shot and zero-shot columns start from the KMCT
  pretrain preset, the paper's 20-epoch 32-frame recipe with the KMCT head."""
  from claver_jax.models.build import model_family
  from claver_jax.run_config import ConfigError
  kmct = load_config('k400', 'B16,32,kmct,pretrain')
  kmt = load_config('k400', 'B16,32,pretrain')
  assert (kmct.model.temporal, kmct.train.epochs, kmct.data.num_frames) == ('kmct', 20, 32)
  assert kmct.to_dict() == {**kmt.to_dict(), 'model': {**kmt.model.to_dict(), 'temporal': 'kmct'}}
  config = load_config('ucf101', 'shots=2,kmct')
  config.init.checkpoint = str(tiny_model_dir)                   # a KMT model
  message = (f"config.model.temporal='kmct' but config.init.checkpoint={tiny_model_dir} holds a "
             "'kmt' model; set --config.model.temporal=kmt, or start from a kmct checkpoint "
             '(e.g. the workdir of a configs/k400.py:B16,32,kmct,pretrain run).')
  with pytest.raises(ConfigError) as error:
    model_family(config)
  assert str(error.value) == message
  config.model.temporal = 'kmt'
  model_family(config)                                     # the checkpoint's own head
  workdir = tmp_path / 'never'
  proc = run_cli('claver_jax.main', '--config=configs/ucf101.py:shots=2,kmct',
                 f'--workdir={workdir}', f'--config.init.checkpoint={tiny_model_dir}',
                 check=False)
  assert proc.returncode == 2 and proc.stderr.strip() == f'error: {message}'
  assert not workdir.exists()


@pytest.mark.slow
def test_broken_model_directories_give_one_clear_error(tiny_model_dir, motion_dir, tmp_path):
  """No params/, or a parameter shard cut short: one line naming the directory and the problem,
  from load() and from predict's CLI."""
  import shutil
  no_params = shutil.copytree(tiny_model_dir, tmp_path / 'no_params')
  shutil.rmtree(no_params / 'params')
  cut = shutil.copytree(tiny_model_dir, tmp_path / 'cut')
  shard = max((p for p in (cut / 'params').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  cases = {no_params: f'{no_params} has no params/ directory',
           cut: f'{cut}/params: a parameter shard is unreadable (corrupt or cut short): '}
  video = motion_dir / read_list(motion_dir / 'val.txt')[0][0]
  for directory, message in cases.items():
    hook, policy, reports = sys.unraisablehook, asyncio.get_event_loop_policy(), []
    sys.unraisablehook = reports.append
    try:
      with pytest.raises(ValueError, match=re.escape(message)):
        load(directory)
      gc.collect()
      # The failed restore's other reads were drained, not silenced: nothing reported, and no
      # global hook or event-loop policy left changed.
      assert sys.unraisablehook == reports.append and reports == []
      assert asyncio.get_event_loop_policy() is policy
    finally:
      sys.unraisablehook = hook
    proc = run_cli('claver_jax.predict', f'--checkpoint={directory}', f'--video={video}',
                   '--labels', 'a', 'b', check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(f'error: {message}')


def zeroshot_config(model_dir, motion_dir, datasets: str):
  c = load_config('zeroshot', datasets)
  c.init.checkpoint = str(model_dir)
  c.model.dtype = 'float32'
  c.data.update(dict(num_frames=FRAMES, image_size=SIZE))
  c.eval.batch_size = 4
  c.zeroshot.ucf101.update(dict(root=str(motion_dir), test_list=str(motion_dir / 'test{split}.txt'),
                                labels=str(motion_dir / 'labels.csv'), prompts='synthetic_motion'))
  c.zeroshot.k600.update(dict(root=str(motion_dir), path_format='videos/{path}',
                              split_dir=str(k600_split_dir(motion_dir)),
                              prompts='synthetic_motion'))
  return c


@pytest.fixture(scope='module')
def zeroshot_run(tiny_model_dir, motion_dir, tmp_path_factory):
  """The run's workdir, config and report; and how often evaluation gathered across processes."""
  workdir = tmp_path_factory.mktemp('zeroshot')
  config = zeroshot_config(tiny_model_dir, motion_dir, 'ucf101,hmdb51,k600')
  gathers = []
  real = evaluate.multihost_utils.process_allgather
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate.multihost_utils, 'process_allgather',
                  lambda *a, **kw: (gathers.append(1), real(*a, **kw))[1])
    report = zeroshot.run_zeroshot(config, str(workdir))
  return workdir, config, report, len(gathers)


def test_k600_split_lists_leave_the_root_only_when_allowed(tmp_path):
  """A split_dir of one's own whose list names absolute paths: an error naming the key, unless
  config.data.allow_outside_root, as for every other list."""
  import ml_collections
  from claver_jax.data.sources import DataError
  split_dir = tmp_path / 'splits'
  split_dir.mkdir()
  (split_dir / 'split1_labels.csv').write_text('id,name\n0,abseiling\n')
  (split_dir / 'split1_videos.txt').write_text('/elsewhere/a.mp4 0\n')
  cfg = ml_collections.ConfigDict(dict(splits=(1,), split_dir=str(split_dir), root=str(tmp_path),
                                       path_format='{path}', prompts=''))
  with pytest.raises(DataError, match='allow_outside_root'):
    zeroshot._k600_runs(cfg, tmp_path / 'out', write=False)
  (run,) = zeroshot._k600_runs(cfg, tmp_path / 'out', write=True, allow_outside_root=True)
  assert (tmp_path / 'out' / 'split1' / 'val.txt').read_text() == '/elsewhere/a.mp4 0\n'
  assert run.name == 'split1'


@pytest.mark.slow
def test_a_zero_shot_run_holds_its_workdir(zeroshot_run):
  """One run per workdir, as in training: the finished run let go of WORKDIR/.lock, and while
  another holds it a zero-shot run on it stops at once, naming the holder's host and pid. A
  training's workdir takes a zero-shot run: its model is init.checkpoint's, so the workdir's
  checkpoints are no resume to compare with."""
  import os
  import socket
  from claver_jax.run_config import resume_differences
  from claver_jax.workdir import WorkdirError, WorkdirLock
  workdir, config, *_ = zeroshot_run
  trained = json.loads(config.to_json_best_effort())
  trained['model']['arch'], trained['mode'] = 'L14', 'train'
  assert resume_differences(trained, config) == []
  holder = WorkdirLock(workdir)                  # Free: the run released it.
  try:
    with pytest.raises(WorkdirError, match=f'host {socket.gethostname()}, pid {os.getpid()}'):
      zeroshot.run_zeroshot(config, str(workdir))
  finally:
    holder.release()


@pytest.mark.slow
def test_split_results_and_their_mean_and_std(zeroshot_run, independent_top_k, motion_dir):
  workdir, _, report, _ = zeroshot_run
  assert report == json.loads((workdir / 'zeroshot.json').read_text())
  assert report['templates'] == list(TEMPLATES)          # the model directory's own
  assert 'hmdb51' in report['skipped'] and 'hmdb51' not in report['datasets']
  ucf = report['datasets']['ucf101']
  names = read_labels(motion_dir / 'labels.csv')
  expected = {f'split{s}': independent_top_k(motion_dir, read_list(motion_dir / f'test{s}.txt'),
                                             names)
              for s in SPLITS}
  assert list(ucf['runs']) == list(expected)
  for name, (top1, top5) in expected.items():
    run = ucf['runs'][name]
    assert run['num_videos'] == len(SPLITS[int(name[-1])])
    assert run['top1'] == pytest.approx(top1) and run['top5'] == pytest.approx(top5)
  top1s, top5s = zip(*expected.values())
  assert len(set(top1s)) > 1 or len(set(top5s)) > 1, 'all splits score alike: std checks nothing'
  assert ucf['top1_mean'] == pytest.approx(np.mean(top1s))
  assert ucf['top1_std'] == pytest.approx(np.std(top1s))
  assert ucf['top5_mean'] == pytest.approx(np.mean(top5s))
  assert ucf['top5_std'] == pytest.approx(np.std(top5s))
  assert (workdir / 'zeroshot' / 'ucf101' / 'split2' / 'per_class.json').is_file()


@pytest.mark.slow
def test_evaluation_gathers_once_per_evaluation(zeroshot_run):
  """Scores stay on the devices through an evaluation: one gather per run, not one per batch."""
  _, config, report, gathers = zeroshot_run
  runs = [r for d in report['datasets'].values() for r in d['runs'].values()]
  assert len(runs) == 6 and gathers == 6
  assert sum(r['num_videos'] for r in runs) > 6 * config.eval.batch_size   # several batches each


@pytest.mark.slow
def test_k600_splits_and_their_mean_and_std(zeroshot_run, independent_top_k, motion_dir):
  """Each split: its own classes and videos (paths under path_format), top-1 / top-5 as
  independently computed; mean ± std over the three, of top-1 and of top-5."""
  workdir, _, report, _ = zeroshot_run
  k600 = report['datasets']['k600']
  names = read_labels(motion_dir / 'labels.csv')
  runs = k600['runs']
  assert list(runs) == ['split1', 'split2', 'split3']
  all_items = read_list(motion_dir / 'all.txt')
  for split, run in zip(K600_SPLITS, runs.values()):
    classes = [names[c] for c in K600_SPLITS[split]]
    assert run['split'] == split and run['num_classes'] == 5
    split_dir = workdir / 'zeroshot' / 'k600' / f'split{split}'
    assert read_labels(split_dir / 'labels.csv') == classes
    listed = read_list(split_dir / 'val.txt')
    assert sorted(listed) == sorted((p, classes.index(names[l])) for p, l in all_items
                                    if names[l] in classes)
    top1, top5 = independent_top_k(motion_dir, listed, classes)
    assert run['top1'] == pytest.approx(top1) and run['top5'] == pytest.approx(top5)
  for metric in ('top1', 'top5'):
    values = [r[metric] for r in runs.values()]
    assert k600[f'{metric}_mean'] == pytest.approx(np.mean(values))
    assert k600[f'{metric}_std'] == pytest.approx(np.std(values))


def test_a_failing_dataset_keeps_the_results_of_those_before_it(tiny_model_dir, motion_dir,
                                                                 tmp_path):
  """HMDB-51 fails after UCF-101 finished (a class of its labels has no prompts): zeroshot.json
  holds UCF-101's results, marked unfinished."""
  from claver_jax.text.prompts import MissingPromptsError
  config = zeroshot_config(tiny_model_dir, motion_dir, 'ucf101,hmdb51')
  config.zeroshot.ucf101.splits = (1,)
  renamed = tmp_path / 'labels.csv'
  renamed.write_text((motion_dir / 'labels.csv').read_text().replace('moving left', 'juggling'))
  config.zeroshot.hmdb51.update(dict(root=str(motion_dir), test_list=str(motion_dir / 'test1.txt'),
                                     labels=str(renamed), prompts='synthetic_motion', splits=(1,)))
  with pytest.raises(MissingPromptsError, match="'juggling': not in the prompt set"):
    zeroshot.run_zeroshot(config, str(tmp_path))
  report = json.loads((tmp_path / 'zeroshot.json').read_text())
  assert report['finished'] is False and list(report['datasets']) == ['ucf101']
  assert report['datasets']['ucf101']['runs']['split1']['num_videos'] == len(SPLITS[1])


def test_nothing_configured_is_a_clear_error(tiny_model_dir, tmp_path):
  config = load_config('zeroshot')
  config.init.checkpoint = str(tiny_model_dir)
  config.data.image_size = SIZE
  with pytest.raises(ValueError, match='nothing to evaluate'):
    zeroshot.run_zeroshot(config, str(tmp_path))
  config.zeroshot.hmdb51.root = '/somewhere'
  with pytest.raises(ValueError, match=r'hmdb51: test_list, labels not set'):
    zeroshot.run_zeroshot(config, str(tmp_path))


@pytest.mark.slow
def test_the_zeroshot_command_is_main_for_zero_shot_configs_only(tmp_path):
  """`python -m claver_jax.zeroshot` is claver_jax.main (its flags, start-up, one-line errors)
  for zero-shot configs: a train config is one line and exit 2, as is a zero-shot one without
  init.checkpoint; neither leaves a workdir."""
  workdir = tmp_path / 'never'
  for config, message in (
      ('tests/tiny_config.py', "error: config.mode='train': python -m claver_jax.zeroshot runs "
                               'zero-shot configs (configs/zeroshot.py); run this one with '
                               'python -m claver_jax.main.'),
      ('configs/zeroshot.py', 'error: config.init.checkpoint is empty: set it to the '
                              'K400-trained model directory')):
    proc = run_cli('claver_jax.zeroshot', f'--config={config}', f'--workdir={workdir}',
                   '--num_processes=0', check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_cli_on_eight_devices_skips_unset_datasets_and_matches_the_direct_call(
    zeroshot_run, tiny_model_dir, tmp_path, monkeypatch):
  _, config, report, _ = zeroshot_run
  ucf = config.zeroshot.ucf101
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  proc = run_cli('claver_jax.zeroshot', '--config=configs/zeroshot.py', f'--workdir={tmp_path}',
                 f'--config.init.checkpoint={tiny_model_dir}', '--config.model.dtype=float32',
                 f'--config.data.num_frames={FRAMES}', f'--config.data.image_size={SIZE}',
                 '--config.eval.batch_size=8', '--config.mesh.fsdp=2',
                 f'--config.zeroshot.ucf101.root={ucf.root}',
                 f'--config.zeroshot.ucf101.test_list={ucf.test_list}',
                 f'--config.zeroshot.ucf101.labels={ucf.labels}',
                 '--config.zeroshot.ucf101.prompts=synthetic_motion')
  cli = json.loads((tmp_path / 'zeroshot.json').read_text())
  assert list(cli['datasets']) == ['ucf101'] and set(cli['skipped']) == {'hmdb51', 'k600'}
  assert 'skipping hmdb51' in proc.stderr and 'over fsdp=2' in proc.stderr
  for key in ('top1_mean', 'top1_std', 'top5_mean', 'top5_std'):
    assert cli['datasets']['ucf101'][key] == pytest.approx(report['datasets']['ucf101'][key])
  assert 'mean ± std' in proc.stdout and 'split3' in proc.stdout


@pytest.mark.slow
def test_the_zero_shot_report_gives_mean_and_std_per_dataset(zeroshot_run):
  """run_zeroshot writes WORKDIR/report.md (+ .html): a row per dataset with the mean ± std of
  what zeroshot.json holds, a row per split or draw, the skipped datasets and the figures."""
  workdir, _, report, _ = zeroshot_run
  text = (workdir / 'report.md').read_text()
  assert text.startswith(f'# Zero-shot report: {workdir.name}')
  for dataset, summary in report['datasets'].items():
    mean_std = (f"top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}; "
                f"top-5 {summary['top5_mean']:.2f} ± {summary['top5_std']:.2f}")
    assert f'| {dataset} | mean ± std | {len(summary["runs"])} |' in text and mean_std in text
    for run, r in summary['runs'].items():
      assert (f'|  | {run} |  | {r["num_videos"]} | top-1 {r["top1"]:.2f}; top-5 {r["top5"]:.2f}'
              in text)
  assert 'hmdb51: skipped (no paths' in text
  assert ('![ucf101 split1: per-class top-1, worst first](zeroshot/ucf101/split1/per_class.png)'
          in text)
  assert (workdir / 'config.json').is_file() and (workdir / 'report.html').is_file()
  assert 'Command:' not in text                       # called from Python: no command line
