"""What a new user trips over: config and preset errors, exit paths, wrong data roots, eval over
unreadable videos, the config documentation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from claver_jax import evaluate, run_config, sharding
from claver_jax.data.pipeline import build_pipelines, default_config
from claver_jax.data.sources import DataError, read_list
from claver_jax.models import CLIPConfig, XCLIPConfig, build
from claver_jax.models.families import FAMILIES
from claver_jax.run_config import ConfigError
from conftest import REPO
from helpers import run_towers, synthetic_dir
from test_protocols import tiny_model_dir  # noqa: F401 (a fixture)

TINY = 'tests/tiny_config.py'
TINY_CLIP = run_towers()


def run_main(workdir, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'claver_jax.main', f'--workdir={workdir}', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def model_config_dir(path, kind: str, cfg) -> str:
  """A model directory's config.json alone (no parameters): what the start-up checks read."""
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps(
      {'format': 'claver_jax.model', 'version': 1, 'kind': kind, 'config': cfg.to_dict()}))
  return str(path)


def tiny_config(**init) -> ml_collections.ConfigDict:
  from tiny_config import get_config
  c = get_config()
  c.init.update(init)
  c.text.tokenizer = ''
  return c


# ------------------------------------------------------------------------------- exit paths
@pytest.mark.parametrize('args,message', [
    (('--config=configs/ucf101.py:shots=3',),
     "error: --config=configs/ucf101.py:shots=3: Unknown setting 'shots=3' in 'shots=3': use "
     'shots=K (K in (2, 4, 8, 16))'),
    (('--config=configs/k400.py:B17',),
     "error: --config=configs/k400.py:B17: Unknown preset part 'B17' in 'B17'. Parts: an "
     'architecture'),
    (('--config=configs/k4OO.py',), 'error: --config=configs/k4OO.py: no such config file.'),
    ((f'--config={TINY}', '--config.model.name=clever'),
     "error: config.model.name='clever' is not a model family; use one of ['claver', 'xclip', "
     "'motion_prompts']."),
    ((f'--config={TINY}', '--config.mode=eval', '--config.data.num_crops=3'),
     'error: config.data.num_crops=3 is not read: a mode=eval run sets it from '
     'config.eval.num_crops (1); set --config.eval.num_crops instead.'),
], ids=['few-shot preset', 'k400 preset', 'config file', 'model family', 'key the mode sets'])
@pytest.mark.slow
def test_config_and_preset_errors_keep_their_cause_exit_2_and_write_nothing(tmp_path, args,
                                                                          message):
  workdir = tmp_path / 'never'
  proc = run_main(workdir, *args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(message), lines[0]
  assert not workdir.exists()


def test_keys_a_mode_sets_itself_are_an_error_when_given_another_value(caplog):
  """The config.data keys a run sets itself (run_config.mode_overrides): a value other than the
  default and the run's is a ConfigError naming the key that sets it in that mode; the run's own
  value passes; mode=eval's unread train list is said in the log."""
  from helpers import load_config
  cases = [('train', 'data.num_clips', 4, 'eval.num_clips (1)'),
           ('train', 'data.batch_size', 2, 'train.batch_size (8 per process of 1)'),
           ('eval', 'data.eval_batch_size', 3, 'eval.batch_size (8 per process of 1)'),
           ('zeroshot', 'data.root', '/videos', 'zeroshot.DATASET.root'),
           ('zeroshot', 'data.val_list', 'val.txt', 'zeroshot.DATASET.test_list')]
  for mode, key, value, source in cases:
    c = load_config('zeroshot') if mode == 'zeroshot' else tiny_config()
    c.mode, c.init.checkpoint = mode, c.init.checkpoint or ('/model' if mode == 'zeroshot' else '')
    section, name = key.split('.')
    c[section][name] = value
    with pytest.raises(ConfigError, match=rf'^config\.{re.escape(key)}={re.escape(repr(value))} '
                       rf'is not read: a mode={mode} run sets it from '
                       rf'config\.{re.escape(source)}; set --config\.{source.split(" ")[0]} '
                       r'instead\.$'):
      run_config.check_config(c)
  c = tiny_config()
  c.data.num_clips = c.eval.num_clips = 4          # The value the run gives it: nothing lost.
  c.data.batch_size = c.train.batch_size
  c.mode, c.data.train_list = 'eval', 'train.txt'
  with caplog.at_level('INFO'):
    run_config.check_config(c)
  assert 'config.mode=eval: config.data.train_list=train.txt is not read.' in caplog.text


@pytest.mark.slow
def test_data_and_model_errors_leave_no_workdir(tiny_model_dir, tmp_path):  # noqa: F811
  """A wrong data root stops at start-up (before the workdir is made); a model directory that
  fails to load after it was made leaves no empty workdir behind. Both one line, exit 1."""
  root = synthetic_dir(tmp_path / 'set', num_videos=12, num_frames=4, size=16)
  data_flags = [f'--config.data.{key}={value}' for key, value in dict(
      source='filelist', root=tmp_path, train_list=root / 'train.txt',
      val_list=root / 'val.txt', labels=root / 'labels.csv').items()]
  broken = shutil.copytree(tiny_model_dir, tmp_path / 'no_params')
  shutil.rmtree(broken / 'params')
  cases = {
      tuple(data_flags): f'error: 10 of 10 videos sampled from {root / "train.txt"} cannot be opened '
                         f"under config.data.root='{tmp_path}': {tmp_path / 'videos'}",
      (f'--config.init.checkpoint={broken}', '--config.text.tokenizer='):
          f'error: {broken} has no params/ directory',
  }
  for args, message in cases.items():
    workdir = tmp_path / 'never'
    proc = run_main(workdir, f'--config={TINY}', *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith(message), proc.stderr[-3000:]
    assert not [line for line in lines if 'Traceback' in line]
    assert not workdir.exists()


def test_init_directories_are_checked_before_anything_is_written(tmp_path):
  clip_336 = model_config_dir(tmp_path / 'clip_32px', 'clip',
                              CLIPConfig(**{**TINY_CLIP.to_dict(), 'image_size': 32}))
  not_a_model = tmp_path / 'empty'
  not_a_model.mkdir()
  xclip = model_config_dir(tmp_path / 'xclip', 'xclip', XCLIPConfig(clip=TINY_CLIP, num_frames=4))
  cases = {
      (('clip', str(tmp_path / 'absent')),): f'config.init.clip={tmp_path / "absent"}: no such '
                                              'directory.',
      (('clip', str(not_a_model)),): f'config.init.clip: {not_a_model} is not a claver_jax model '
                                     'directory (no config.json).',
      (('clip', xclip),): f"config.init.clip={xclip} holds a 'xclip' model, not a CLIP; pass it "
                          'as --config.init.checkpoint',
      # A preset's frames (here the tiny config's 16 px) and a CLIP converted at another size:
      # one line, where training died at step 0 with a chex traceback.
      (('clip', clip_336),): f'config.data.image_size=16, but the model in config.init.clip='
                             f'{clip_336} takes 32 px frames; set --config.data.image_size=32',
  }
  for init, message in cases.items():
    with pytest.raises(ConfigError) as error:
      build.check_init(tiny_config(**dict(init)))
    assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_the_towers_only_hint_is_given_only_where_it_works(tmp_path):
  xclip = model_config_dir(tmp_path / 'xclip', 'xclip', XCLIPConfig(clip=TINY_CLIP, num_frames=4))
  with pytest.raises(ConfigError) as error:
    build.model_family(tiny_config(checkpoint=xclip))
  message = str(error.value)
  assert '--config.init.towers_only' not in message
  assert message.endswith("set --config.model.name=xclip to continue it, or start a fresh claver "
                          "from a CLIP (--config.init.clip=DIR): a xclip model has no plain CLIP "
                          'towers to give.')
  clip = model_config_dir(tmp_path / 'clip', 'clip', TINY_CLIP)
  with pytest.raises(ConfigError, match='--config.init.towers_only=True to start a fresh claver'):
    build.model_family(tiny_config(checkpoint=clip))
  build.model_family(tiny_config(checkpoint=clip, towers_only=True))   # The hint, followed.


def test_load_takes_a_workdir_as_predict_and_init_checkpoint_do(tiny_model_dir, tmp_path):  # noqa: F811
  from claver_jax.models import load, load_video_model
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'model').symlink_to(tiny_model_dir)
  assert load(workdir).cfg == load(tiny_model_dir).cfg
  assert load_video_model(workdir).cfg.num_frames == 4


def test_predict_top_k_below_one_is_a_clean_error():
  from claver_jax.predict import predict
  with pytest.raises(ValueError, match=r'^--top_k=0: show at least one label \(top_k >= 1\)\.$'):
    predict('/nowhere', '/nowhere.mp4', ['a', 'b'], top_k=0)


# ------------------------------------------------------------------------------- evaluation
def test_evaluation_scores_only_readable_videos_and_counts_the_rest(tmp_path):
  """Two of the val videos are missing: they are left out of top-1/top-5 and the confusion
  matrix, and counted; more than data.max_substituted of them stops the evaluation."""
  root = synthetic_dir(tmp_path / 'set', num_videos=40, num_frames=4, size=16)
  items = read_list(root / 'val.txt')
  for path, _ in items[:2]:
    (root / path).unlink()
  cfg = default_config()
  cfg.update(dict(root=str(root), val_list=str(root / 'val.txt'), labels=str(root / 'labels.csv'),
                  num_frames=4, image_size=16, eval_batch_size=4, max_substituted=0.25))
  data = build_pipelines(cfg)
  mesh = sharding.make_mesh(sharding.default_config())
  seen = []

  def scores(state, video, text):        # Class 0 for a black clip, else the clip's label.
    seen.append(np.asarray(video))
    return jnp.zeros((video.shape[0], text.shape[1])).at[:, 0].set(1.0)

  tokens = np.zeros((1, 12, 4), np.int32)
  summary = evaluate.run_eval(data, None, lambda state, t: jnp.zeros((t.shape[0], 8)), scores,
                              tokens, mesh)
  assert summary['num_substituted'] == 2 and summary['num_videos'] == len(items) - 2
  assert summary['confusion'].sum() == len(items) - 2
  expected_top1 = 100 * np.mean([label == 0 for _, label in items[2:]])
  assert summary['top1'] == pytest.approx(expected_top1)
  data.max_substituted = 0.1
  with pytest.raises(DataError, match=rf'^2 of {len(items)} eval samples were unreadable'):
    evaluate.run_eval(data, None, lambda state, t: jnp.zeros((t.shape[0], 8)), scores, tokens,
                      mesh)


# ------------------------------------------------------------------------------- the config
def documented_keys(doc: str) -> set[str]:
  """The keys an entry of a config docstring names: the head of each entry's first line (before
  two spaces), e.g. 'train.label_smoothing, mixup_alpha' -> train.label_smoothing, train.mixup_alpha;
  and every dotted name anywhere in it (model.clip)."""
  names = set(re.findall(r'\b[a-z_]+(?:\.[a-z_0-9]+)+\b', doc))
  for line in doc.splitlines():
    if not re.match(r'^    \S', line):
      continue
    head = re.sub(r'\(.*?\)', '', line.strip().split('  ')[0])
    prefix = ''
    for part in head.split(','):
      name = re.match(r'\s*([a-z_0-9.]*)', part).group(1).rstrip('.')
      if '.' in name:
        prefix = name.rsplit('.', 1)[0] + '.'
        names.add(name)
      elif re.fullmatch(r'[a-z_0-9]+', name):
        names.add(prefix + name)
  return names


def test_run_config_documents_every_key():
  """Every key of the base config is named in run_config.py's docstring (data, mesh and each
  family's sub-dict, model.xclip and model.motion: in the docstrings of the default configs they
  come from; optim is documented in optim.py's)."""
  documented = documented_keys(run_config.__doc__)
  sections = {'data': default_config, 'mesh': sharding.default_config,
              **{f'model.{f.config_key}': f.default_config for f in FAMILIES.values()
                 if f.config_key}}
  assert {'model.xclip', 'model.motion'} <= set(sections)
  undocumented = []

  def visit(node, prefix):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if name == 'optim':
        continue
      if name in sections:
        own = sections[name].__doc__
        undocumented.extend(f'{name}.{k}' for k in value.keys()
                            if not re.search(rf'\b{k}\b', own))
      elif isinstance(value, ml_collections.ConfigDict) and value:
        visit(value, f'{name}.')
      elif name not in documented:
        undocumented.append(name)

  visit(run_config.base_config(), '')
  assert not undocumented, undocumented
