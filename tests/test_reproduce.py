"""docs/reproduce.md cannot rot: every command in it parses and resolves as the CLI resolves it,
uses only what earlier commands make, tests what its training command trained; a training and its
token-shuffled test run a few steps on tiny towers (same presets), and the KMCT few-shot command
builds the KMCT model of its checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from claver_jax import zeroshot
from claver_jax.models.build import make_model
from claver_jax.run import evaluate_workdir
from claver_jax.train import train_and_evaluate
from claver_jax.data import synthetic
from claver_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from claver_jax.metrics import read_metrics
from claver_jax.models import CLAVER, CLAVERConfig, CLIP, families, load, write_model_dir
from claver_jax.param_paths import path_str
from claver_jax.run_config import check_config
from claver_jax.text.prompts import TEMPLATES, build_prompt_texts, load_prompt_set
from claver_jax.text.tokenizer import train_tokenizer
from conftest import REPO
from helpers import run_towers

# ml_collections' config_flags loads config files with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

DOC = REPO / 'docs' / 'reproduce.md'
TABLES = (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13)
CONFIG_MODULES = ('claver_jax.main', 'claver_jax.zeroshot')


# --------------------------------------------------------------------------------- the document
@dataclasses.dataclass
class Command:
  section: str
  argv: list[str]           # after `python -m`: the module, then its arguments
  row: dict[str, str] | None

  @property
  def module(self) -> str:
    return self.argv[0]

  def flag(self, name: str) -> str | None:
    values = [a.split('=', 1)[1] for a in self.argv if a.startswith(f'--{name}=')]
    return values[-1] if values else None


def _cells(line: str) -> list[str]:
  return [c.strip().strip('`') for c in line.strip().strip('|').split('|')]


def _expand(text: str, values: dict[str, str]) -> str:
  for _ in range(5):                         # cells may name setup variables ($HMDB1)
    text = re.sub(r'\$\{?([A-Z][A-Z0-9_]*)\}?', lambda m: values.get(m.group(1), m.group(0)),
                  text)
  return text


def parse_doc(text: str) -> tuple[dict[str, str], list[Command], dict[str, str]]:
  """-> (setup variables, commands in order with table rows expanded, section texts)."""
  lines = text.splitlines()
  blocks, tables, sections = [], [], {}
  section, i = '', 0
  while i < len(lines):
    line = lines[i]
    if line.startswith('## '):
      section = line[3:]
      sections[section] = ''
    elif line.startswith('```bash'):
      end = lines.index('```', i + 1)
      blocks.append((section, i, lines[i + 1:end]))
      i = end
    elif line.startswith('|'):
      rows = []
      while i < len(lines) and lines[i].startswith('|'):
        rows.append(_cells(lines[i]))
        i += 1
      tables.append((section, i - len(rows), [dict(zip(rows[0], r)) for r in rows[2:]]))
      continue
    if section:
      sections[section] += line + '\n'
    i += 1
  variables: dict[str, str] = {}
  commands = []
  for section, start, body in blocks:
    joined = '\n'.join(body).replace('\\\n', ' ')
    following = [t for t in tables if t[0] == section and t[1] > start]
    rows = following[0][2] if following else []
    for statement in joined.splitlines():
      statement = statement.strip()
      if not statement or statement.startswith('#'):
        continue
      assignment = re.fullmatch(r'([A-Z][A-Z0-9_]*)=(.*)', statement)
      if assignment:
        variables[assignment.group(1)] = shlex.split(assignment.group(2))[0]
        continue
      names = set(re.findall(r'\$\{?([A-Z][A-Z0-9_]*)', statement))
      uses_rows = bool(rows) and bool(names & set(rows[0]))
      for row in (rows if uses_rows else [None]):
        argv = shlex.split(_expand(_expand(statement, row or {}), variables))
        assert argv[:2] == ['python', '-m'], statement
        assert not any('$' in a for a in argv), f'{section}: unresolved variable in {argv}'
        commands.append(Command(section, argv[2:], row))
  return variables, commands, sections


@pytest.fixture(scope='module')
def doc():
  return parse_doc(DOC.read_text())


@contextlib.contextmanager
def in_repo():
  before = os.getcwd()
  os.chdir(REPO)
  try:
    yield
  finally:
    os.chdir(before)


def parse_config(command: Command):
  """The config and workdir `python -m claver_jax.main ARGS` runs with (its own flag parser)."""
  argv = ['main', *command.argv[1:]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)       # the overrides it accepts, as main's
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  with in_repo():
    values(argv)
  return values.config, values.workdir


def defined_flags(module: str) -> tuple[set[str], set[str]]:
  """(flags, required flags) that a module's absl definitions declare, read from its source, with
  those of the modules whose key flags it adopts (the converters adopt convert.common's)."""
  source = (REPO / (module.replace('.', '/') + '.py')).read_text()
  defined, required = set(), set()
  for chunk in source.split('DEFINE_')[1:]:
    match = re.match(r"\w+\(\s*'(\w+)'", chunk)
    if match:
      defined.add(match.group(1))
      if 'required=True' in chunk.split('flags.')[0]:
        required.add(match.group(1))
  for adopted in re.findall(r'adopt_module_key_flags\((\w+)\)', source):
    package = re.search(rf'^from ([\w.]+) import {adopted}$', source, re.M).group(1)
    more, more_required = defined_flags(f'{package}.{adopted}')
    defined, required = defined | more, required | more_required
  return defined, required


# ------------------------------------------------------------------------------ static checks
def test_every_table_has_its_section_and_commands(doc):
  _, commands, sections = doc
  for number in TABLES:
    titles = [s for s in sections if re.search(rf'\bTables? (\d+(, | and ))*{number}\b', s)
              or re.search(rf'\band {number}\b', s)]
    assert titles, f'no section for Table {number}'
    assert any(c.section in titles for c in commands), f'Table {number} has no command'
  table8 = [s for s in sections if s.startswith('Table 8')]
  assert table8 and 'protocol unknown' in table8[0]


def test_every_command_resolves_and_uses_only_what_earlier_ones_make(doc, tmp_path):
  """Each command's flags exist (required ones given); each config command resolves to a
  checked config and a buildable model config; inputs (CLIPs, checkpoints, list files) are made
  by an earlier command; each test (mode=eval) tests what its training command trained."""
  _, commands, _ = doc
  made: set[str] = set()
  trained: dict[str, dict] = {}
  checked = 0
  for command in commands:
    where = f'{command.section}: {shlex.join(command.argv)}'
    if command.module not in CONFIG_MODULES:
      defined, required = defined_flags(command.module)
      given = {a[2:].split('=', 1)[0] for a in command.argv[1:] if a.startswith('--')}
      assert given <= defined, f'{where}: unknown flags {given - defined}'
      assert required <= given, f'{where}: missing {required - given}'
      out = command.flag('out')
      if command.module == 'claver_jax.data.annotations':
        names = ([command.flag('split_name') or 'train'] if command.flag('format') == 'kinetics'
                 else ['train', 'test'])
        made |= {f'{out}/{n}.txt' for n in names} | {f'{out}/labels.csv'}
      else:
        made.add(out)
      continue
    config, workdir = parse_config(command)
    check_config(config)
    for key in ('clip', 'checkpoint'):
      if config.init[key]:
        assert config.init[key] in made, f'{where}: nothing earlier makes {config.init[key]}'
    if config.mode == 'zeroshot':
      runs, skipped = zeroshot.plan_runs(config, tmp_path / 'plan')
      assert not skipped and [r.dataset for r in runs] == ['ucf101'] * 3 + ['hmdb51'] * 3 + [
          'k600'] * 3, where
      for run in runs[:6]:
        assert {run.list_path, run.labels} <= made, f'{where}: {run.list_path}, {run.labels}'
      continue
    for key in ('train_list', 'val_list', 'labels'):
      assert config.data[key] in made, f'{where}: nothing earlier makes {config.data[key]}'
    model_config = families.model_config(config)           # a valid model of that family
    assert model_config.num_frames == config.data.num_frames
    settings = config.to_dict()
    if config.mode == 'eval':
      assert (config.eval.num_clips, config.eval.num_crops) == (4, 3), where
      if config.init.checkpoint:            # A model directory (converted), tested as it is.
        checked += 1
        continue
      assert workdir in trained, f'{where}: no training command makes {workdir}'
      test_free = {k: v for k, v in settings.items() if k not in ('mode', 'eval')}
      assert test_free == trained[workdir], f'{where}: tests another model than {workdir} trained'
    else:
      assert config.mode == 'train'
      settings = {k: v for k, v in settings.items() if k not in ('mode', 'eval')}
      # A run listed in two tables is one run: the same settings.
      assert trained.setdefault(workdir, settings) == settings, f'{where}: {workdir} differs'
      made.add(workdir)
    checked += 1
  assert checked >= 60


def test_the_rows_are_the_papers_settings(doc):
  """What each table varies is what the row's command varies."""
  _, commands, _ = doc
  configs = {}
  for command in commands:
    if command.module in CONFIG_MODULES:
      config, workdir = parse_config(command)
      if config.mode == 'train':
        configs[Path(workdir).name] = config
  assert configs['k400_b32_8_kmt'].model.arch == 'B32' and configs['k400_b32_8_kmt'].data.num_frames == 8
  assert configs['k400_l14_336_16_kmct'].data.image_size == 336
  depth = {name: families.model_config(configs[name]).temporal_depth
           for name in ('t6_kmt_1layer', 't6_kmt_sixth', 't6_kmt_third')}
  assert depth == {'t6_kmt_1layer': 1, 't6_kmt_sixth': 2, 't6_kmt_third': 4}
  assert configs['t6_mean'].text.aspects == '' and configs['t6_mean'].model.temporal == 'mean'
  assert configs['t10_name'].text.templates == '{}'
  assert configs['t10_synonyms'].text.aspects == 'decomposition,synonyms'
  assert configs['t6_mean_prompts'].text.aspects == 'decomposition,synonyms,body_parts'
  assert (configs['t11_neither'].optim.freeze_image, configs['t11_neither'].optim.freeze_text) == (
      True, True)
  assert not configs['t11_both'].optim.freeze_image and not configs['t11_both'].optim.freeze_text
  kmct = configs['k400_pretrain_kmct']
  assert (kmct.model.temporal, kmct.train.epochs, kmct.data.num_frames) == ('kmct', 20, 32)
  assert configs['hmdb51_16shot_kmct'].data.shots == 16
  assert configs['hmdb51_16shot_kmct'].model.temporal == 'kmct'
  assert configs['k600_b16_8_kmt'].text.prompts == 'kinetics600'
  shuffles = sorted(parse_config(c)[0].eval.token_shuffle for c in commands
                    if c.section.startswith('Table 9'))
  assert shuffles == ['none'] * 3 + ['post_te'] * 3 + ['pre_te'] * 3


# ------------------------------------------------------------------------- a few steps, tiny
def random_params(module) -> dict:
  """Random parameters of a module's abstract state, drawn with numpy (no compiles)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path_str(path)
    if name.endswith('logit_scale'):
      return np.asarray(np.log(1 / 0.07), np.float32)
    if name.endswith('scale'):
      return np.ones(leaf.shape, np.float32)
    std = np.prod(leaf.shape[:-1]) ** -0.5 if len(leaf.shape) > 1 else 0.1
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  abstract = nnx.eval_shape(module)
  return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def tiny(config, paths: dict[str, Path]):
  """The same preset on tiny towers and the synthetic set, for a couple of steps: inputs the doc
  names are mapped to `paths`."""
  for key in ('clip', 'checkpoint'):
    if config.init[key]:
      config.init[key] = str(paths[config.init[key]])
  config.data.update(dict(source='synthetic', image_size=16, synthetic_size=16,
                          synthetic_frames=8, synthetic_videos=48, num_workers=0, flip_prob=0.0))
  if config.text.prompts:
    config.text.prompts = 'synthetic_motion'
  config.model.dtype = 'float32'            # bf16 compiles and runs slower on a CPU
  config.train.update(dict(batch_size=8, max_steps=2))
  config.eval.batch_size = 8
  config.log_every_steps = 1
  return config


@pytest.fixture(scope='module')
def tiny_inputs(tmp_path_factory):
  """What the doc's runs start from, on tiny towers: a CLIP (for ckpt/clip_b32) and a KMCT
  model of 32 frames (for runs/k400_pretrain_kmct), random, with a vocabulary learnt on the
  synthetic set's texts (short texts: few length groups to compile)."""
  root = tmp_path_factory.mktemp('inputs')
  texts, _ = build_prompt_texts(list(synthetic.CLASS_NAMES), load_prompt_set('synthetic_motion'),
                                templates=TEMPLATES)
  tokenizer = train_tokenizer([t for row in texts for t in row], root / 'bpe', num_merges=400)
  vocab, merges = tokenizer.vocab, tokenizer.merges
  clip_cfg = run_towers(vocab, vision_layers=3, context_length=77)   # 3 layers: 1 temporal.
  clip_dir = write_model_dir(root / 'clip', kind='clip', config=clip_cfg,
                             params=random_params(lambda: CLIP(clip_cfg, rngs=nnx.Rngs(0))),
                             tokenizer=(vocab, merges), normalization=(IMAGENET_MEAN, IMAGENET_STD))
  kmct_cfg = CLAVERConfig(clip=clip_cfg, num_frames=32, temporal='kmct')
  kmct_dir = write_model_dir(
      root / 'kmct', kind='claver', config=kmct_cfg,
      params=random_params(lambda: CLAVER(kmct_cfg, rngs=nnx.Rngs(0))), tokenizer=(vocab, merges),
      normalization=(IMAGENET_MEAN, IMAGENET_STD), source={'templates': ['{}']})
  return {'ckpt/clip_b32': clip_dir, 'runs/k400_pretrain_kmct': kmct_dir}


def find(commands: list[Command], section: str, **row) -> Command:
  """The command of `section` for the table row with these cells."""
  return next(c for c in commands if c.section.startswith(section) and c.row
              and all(c.row.get(k) == v for k, v in row.items()))


def test_the_kmct_few_shot_command_builds_the_kmct_model_of_its_checkpoint(doc, tiny_inputs):
  """Table 13's `hmdb51.py:shots=2,kmct` from the KMCT pretrain model trains that model, head
  and weights (before, the checkpoint's head was silently replaced by config.model.temporal's
  default; now a mismatch is a config error): the model a run builds, on tiny towers."""
  from claver_jax.text import load_tokenizer
  config, _ = parse_config(find(doc[1], 'Tables 3 and 13', CONFIG='hmdb51.py:shots=2,kmct'))
  config = tiny(config, tiny_inputs)
  assert (config.model.temporal, config.data.shots, config.data.num_frames) == ('kmct', 2, 32)
  checkpoint = config.init.checkpoint
  model = make_model(config, load_tokenizer(checkpoint), nnx.Rngs(0))
  assert isinstance(model, CLAVER) and model.temporal.kind == 'kmct'
  source = nnx.to_pure_dict(nnx.state(load(checkpoint), nnx.Param))
  built = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(built)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow   # A short training and a test on tiny towers, compiled afresh (~30 s).
def test_a_training_and_its_shuffled_test_run_on_tiny_towers(doc, tiny_inputs, tmp_path):
  """Table 1's B32,8,kmt trains two steps; Table 9's pre_te test evaluates that run."""
  _, commands, _ = doc
  config, workdir = parse_config(find(commands, 'Table 1', PRESET='B32,8,kmt'))
  run = tmp_path / workdir
  metrics = train_and_evaluate(tiny(config, tiny_inputs), str(run))
  assert np.isfinite(metrics['val/top1'])
  assert [r['step'] for r in read_metrics(run) if 'train/loss' in r] == [1, 2]
  config, workdir = parse_config(find(commands, 'Table 9', PRESET='B32,8,kmt',
                                      FLAGS='--config.eval.token_shuffle=pre_te'))
  assert tmp_path / workdir == run
  config = tiny(config, tiny_inputs)
  assert (config.mode, config.eval.token_shuffle) == ('eval', 'pre_te')
  tested = evaluate_workdir(config, str(run))
  assert 0 <= tested['eval/top1'] <= 100 and read_metrics(run)[-1]['step'] == 2
