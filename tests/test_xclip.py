"""X-CLIP: parity with transformers and the official layout, frame order, training, predict and
zero-shot through the family interface, converter errors."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import tiny_config
import torch_clip
import torch_xclip
from claver_jax import evaluate, optim
from claver_jax.models.build import make_model
from claver_jax.models import XCLIP, families, load
from claver_jax.models.xclip import XCLIPConfig
from conftest import run_cli
from convert.common import ConversionError
from convert.xclip_to_flax import convert
from helpers import steps_on_cached_texts, tiny_clip, unchanged

TINY = tiny_clip()


# ------------------------------------------------------------------------------------- parity
@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """A random transformers XCLIPModel as an HF directory, inputs and its outputs."""
  model = torch_xclip.tiny_hf_xclip(seed=0)
  hf_dir = tmp_path_factory.mktemp('hf_xclip')
  model.save_pretrained(hf_dir)
  video = torch_xclip.random_video(seed=1)
  _, tokens = torch_clip.random_inputs(seed=2)
  return dict(model=model, hf_dir=hf_dir, video=video, tokens=tokens,
              expected=torch_xclip.hf_outputs(model, video, tokens))


@pytest.fixture(scope='module')
def converted(reference, tmp_path_factory):
  out = tmp_path_factory.mktemp('converted') / 'xclip'
  proc = run_cli('convert.xclip_to_flax', f'--src={reference["hf_dir"]}', f'--out={out}')
  assert 'X-CLIP (hf layout, 3 frames, 1 MIT and 2 prompt layers)' in proc.stdout
  return out


# Jitted: eager X-CLIP dispatches hundreds of small ops, each compiled on its own.
encode_video = nnx.jit(lambda model, video: model.encode_video(video))
logits = nnx.jit(lambda model, video, tokens: model.logits(video, tokens))
encode_tokens = nnx.jit(lambda model, video: model.encode_tokens(video))


def max_diffs(model, reference) -> tuple[float, float]:
  video, tokens, expected = reference['video'], reference['tokens'], reference['expected']
  return (float(np.abs(np.asarray(encode_video(model, video)) - expected['video']).max()),
          float(np.abs(np.asarray(logits(model, video, tokens)) - expected['logits']).max()))


@pytest.mark.slow
def test_parity_with_transformers_through_the_cli(reference, converted):
  model = load(converted)
  assert isinstance(model, XCLIP)
  cfg = model.cfg
  assert (cfg.num_frames, cfg.mit_num_heads, cfg.prompt_num_heads) == (3, 2, 2)
  assert cfg.clip.text_pooling == 'argmax'             # transformers forces it for X-CLIP
  video_diff, logits_diff = max_diffs(model, reference)
  print(f'transformers XCLIPModel: max abs diff video embedding {video_diff:.1e}, '
        f'logits {logits_diff:.1e}')
  assert np.abs(reference['expected']['logits']).max() > 1.0
  assert video_diff <= 1e-5 and logits_diff <= 1e-5
  meta = json.loads((converted / 'config.json').read_text())
  assert meta['kind'] == 'xclip' and meta['source']['templates'] == ['{}']
  np.testing.assert_allclose(meta['normalization']['mean'], [0.485, 0.456, 0.406], atol=1e-6)
  np.testing.assert_allclose(meta['normalization']['std'], [0.229, 0.224, 0.225], atol=1e-6)


@pytest.mark.slow
def test_official_layout_converts_to_the_same_logits(reference, converted, tmp_path):
  state = torch_xclip.hf_to_official_state_dict(reference['model'].state_dict())
  assert 'prompts_generator.norm.weight' in state and 'mit.resblocks.0.attn.in_proj_weight' in state
  src = tmp_path / 'k400_16_8.pth'
  torch.save({'model': state, 'epoch': 29, 'max_accuracy': 83.8}, src)
  out = tmp_path / 'official'
  convert(src, out)
  model = load(out)
  video_diff, logits_diff = max_diffs(model, reference)
  print(f'official layout: max abs diff video embedding {video_diff:.1e}, '
        f'logits {logits_diff:.1e}')
  assert video_diff <= 1e-5 and logits_diff <= 1e-5
  hf_model = load(converted)
  np.testing.assert_allclose(logits(model, reference['video'], reference['tokens']),
                             logits(hf_model, reference['video'], reference['tokens']), atol=1e-6)


@pytest.mark.slow
def test_num_frames_resamples_the_mit_positions(converted, reference, caplog):
  stored = np.asarray(load(converted).mit.positional_embedding[...])
  with caplog.at_level(logging.WARNING):
    model = load(converted, num_frames=6)
  assert 'Resampling the temporal embedding from 3 to 6 frames' in caplog.text
  assert model.mit.positional_embedding.shape == (6, stored.shape[1]) and model.cfg.num_frames == 6
  video = np.concatenate([reference['video']] * 2, axis=1)
  assert logits(model, video, reference['tokens']).shape == (2, 4)
  with pytest.raises(ValueError, match='turned off'):
    load(converted, num_frames=6, resample_frames=False)
  with pytest.raises(ValueError, match='num_frames=6 to resample'):
    load(converted).encode_video(video)


# ---------------------------------------------------------------------------------- converter
@pytest.mark.slow
def test_converter_errors(reference, converted, tiny_clip, tmp_path):
  state = torch_xclip.hf_to_official_state_dict(reference['model'].state_dict())
  del state['visual.transformer.resblocks.1.message_ln.bias']
  state['mit.extra.weight'] = torch.zeros(2, 2)
  state['prompts_generator.alpha'] = torch.zeros(7)
  src = tmp_path / 'broken.safetensors'
  save_file(state, src)
  out = tmp_path / 'out'
  proc = run_cli('convert.xclip_to_flax', f'--src={src}', f'--out={out}', check=False)
  assert proc.returncode != 0
  assert 'missing: visual.transformer.resblocks.1.message_ln.bias' in proc.stderr
  assert 'unexpected: mit.extra.weight (2, 2)' in proc.stderr
  assert 'shape: prompts_generator.alpha is (7,), expected (128,)' in proc.stderr
  assert not out.exists() and not list(tmp_path.glob('.out.*'))
  garbage = tmp_path / 'weights.ckpt'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(ConversionError, match='Unrecognised checkpoint format'):
    convert(garbage, out)
  with pytest.raises(ConversionError, match='holds a plain CLIP.*convert.clip_to_flax'):
    convert(tiny_clip['hf_dir'], out)
  from convert.clip_to_flax import convert as convert_clip
  with pytest.raises(ConversionError, match='holds an X-CLIP checkpoint.*convert.xclip_to_flax'):
    convert_clip(reference['hf_dir'], out)
  edited = tmp_path / 'edited'
  shutil.copytree(reference['hf_dir'], edited)
  config = json.loads((edited / 'config.json').read_text())
  config['vision_config']['mit_hidden_size'] = 512
  (edited / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConversionError, match='mit_hidden_size=512 but projection_dim=128: the MIT '
                     'takes the projected frame embeddings, so transformers'):
    convert(edited, out)
  config['vision_config']['mit_hidden_size'] = 128
  config['vision_config']['mit_intermediate_size'] = 100
  (edited / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConversionError, match='mit_intermediate_size=100 but the weights need 512'):
    convert(edited, out)
  assert not out.exists()


@pytest.mark.slow
def test_any_config_transformers_runs_converts_with_its_logits(tmp_path):
  """Every XCLIPConfig field transformers' XCLIPModel computes with is honoured: an MIT whose
  MLP is not 4x its width, MIT and prompt heads other than the official width // 64, one
  prompt layer, a prompt activation and a text tower's activation and LayerNorm epsilon of
  their own. Logits and video embedding equal transformers'."""
  model = torch_xclip.tiny_hf_xclip(
      seed=3, text=dict(hidden_act='gelu', layer_norm_eps=1e-3),
      vision=dict(mit_intermediate_size=96, mit_num_attention_heads=4, mit_num_hidden_layers=2,
                  layer_norm_eps=1e-4),
      prompt_layers=1, prompt_num_attention_heads=8, prompt_hidden_act='gelu_new',
      prompt_alpha=0.3)
  hf_dir = tmp_path / 'hf'
  model.save_pretrained(hf_dir)
  reference = dict(video=torch_xclip.random_video(seed=4), tokens=torch_clip.random_inputs(5)[1])
  reference['expected'] = torch_xclip.hf_outputs(model, reference['video'], reference['tokens'])
  convert(hf_dir, tmp_path / 'converted')
  converted = load(tmp_path / 'converted')
  cfg = converted.cfg
  assert (cfg.mit_hidden_dim, cfg.mit_num_heads, cfg.mit_layers) == (96, 4, 2)
  assert (cfg.prompt_layers, cfg.prompt_num_heads, cfg.prompt_activation) == (1, 8, 'gelu_tanh')
  assert (cfg.clip.activation, cfg.clip.text_act) == ('quick_gelu', 'gelu')
  assert (cfg.clip.layer_norm_eps, cfg.clip.text_eps) == (1e-4, 1e-3)
  assert converted.mit.blocks[0].mlp.c_fc.kernel.shape == (128, 96)
  video_diff, logits_diff = max_diffs(converted, reference)
  print(f'non-official X-CLIP config: max abs diff video embedding {video_diff:.1e}, '
        f'logits {logits_diff:.1e}')
  assert np.abs(reference['expected']['logits']).max() > 1.0
  assert video_diff <= 1e-5 and logits_diff <= 1e-5


# ------------------------------------------------------------------------------- frame order
@pytest.mark.slow
def test_frame_order_reaches_the_video_only_through_the_mit_positions():
  cfg = XCLIPConfig(clip=TINY, num_frames=4, mit_heads=2, prompt_heads=2)
  model = XCLIP(cfg, rngs=nnx.Rngs(0))
  model.mit.positional_embedding[...] = jax.random.normal(jax.random.key(0), (4, 32))
  video = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 16, 16, 3)))
  order = np.array([2, 0, 3, 1])
  # The cross-frame messages have no positions: permuting the frames permutes the tokens.
  tokens = np.asarray(encode_tokens(model, video))
  np.testing.assert_allclose(np.asarray(encode_tokens(model, video[:, order])), tokens[:, order],
                             atol=1e-5)
  # ...and so the frame embeddings; but the MIT's positions make the video embedding depend on it.
  assert np.abs(np.asarray(encode_video(model, video[:, order]))
                - np.asarray(encode_video(model, video))).max() > 1e-3
  model.mit.positional_embedding[...] = jnp.zeros((4, 32))
  np.testing.assert_allclose(encode_video(model, video[:, order]), encode_video(model, video),
                             atol=1e-5)


# -------------------------------------------------------------------------------------- train
def tiny_xclip_config():
  """configs/demo.py shrunk (tests/tiny_config.py) with X-CLIP's recipe: text frozen."""
  config = tiny_config.get_config()
  config.model.name = 'xclip'
  config.optim.freeze_image, config.optim.freeze_text = False, True
  config.optim.new_lr_multiplier, config.optim.warmup_epochs = 10.0, 0.0
  return config


def test_the_ten_times_group_is_exactly_the_new_parts():
  config = tiny_xclip_config().optim
  config.weight_decay = 0.0
  model = make_model(tiny_xclip_config(), types.SimpleNamespace(vocab_size=100,
                                                                      eot_token_id=99),
                           nnx.Rngs(0))
  family = families.of(model)
  paths = ['.'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  new = {p for p in paths if family.group_of(p) == 'new'}
  assert new == {p for p in paths if '.message_' in p or p.startswith(('mit.', 'prompts_'))}
  assert any('.message_attn.' in p for p in new)
  assert any(p.startswith('prompts_visual') for p in new)
  tx, _ = optim.make_optimizer(config, family.group_of, total_steps=10, steps_per_epoch=10)
  wrt = optim.trainable_filter(config, family.group_of)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  before = {'.'.join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}
  nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model,
                                          jax.tree.map(jnp.ones_like, nnx.state(model, wrt)))
  after = {'.'.join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}
  moved = {p: np.abs(after[p] - before[p]).max() for p in paths}
  for p in paths:   # Adam's first step moves every coordinate by its learning rate.
    expected = {'new': 10 * config.lr, 'image': config.lr, 'text': 0.0}[family.group_of(p)]
    assert moved[p] == pytest.approx(expected, rel=1e-2, abs=5e-7), p
  assert family.group_of('logit_scale') == 'text'      # frozen with it, as the official code does


@pytest.mark.slow
def test_four_train_steps_learn_with_the_text_tower_frozen():
  """Four steps on one batch (the loss falls): the text tower and logit scale stay put, the ViT,
  MIT and prompt generator move."""
  config = tiny_xclip_config()
  config.optim.lr = 1e-3
  tokenizer = types.SimpleNamespace(vocab_size=100, eot_token_id=99)
  model = make_model(config, tokenizer, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = np.zeros((2, 3, 8), np.int32)                   # A=2 sets of C=3 classes
  tokens[..., 0], tokens[..., 1:4], tokens[..., 4] = 98, rng.integers(1, 98, (2, 3, 3)), 99
  losses, before, after = steps_on_cached_texts(model, config, tokens, rng)
  assert losses[-1] < losses[0], losses
  for tower, moves in (('text', False), ('logit_scale', False), ('visual', True), ('mit', True),
                       ('prompts_generator', True)):
    assert unchanged(before[tower], after[tower]) != moves, tower


# ------------------------------------------------------------------- a run, predict, zero-shot
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)     # A normalisation of the run's own.


@pytest.fixture(scope='module')
def xclip_run(tmp_path_factory):
  """tests/tiny_config.py as X-CLIP through the CLI, 2 steps, with its own data.mean/std."""
  workdir = tmp_path_factory.mktemp('run') / 'xclip'
  run_cli('claver_jax.main', '--config=tests/tiny_config.py', f'--workdir={workdir}',
          '--config.model.name=xclip', '--config.train.max_steps=2',
          f'--config.data.mean={MEAN}', f'--config.data.std={STD}')
  return workdir


@pytest.mark.slow
def test_the_run_exports_an_xclip_directory_with_its_normalisation(xclip_run):
  meta = json.loads((xclip_run / 'model' / 'config.json').read_text())
  assert meta['kind'] == 'xclip' and meta['normalization'] == {'mean': list(MEAN),
                                                                'std': list(STD)}
  assert isinstance(load(xclip_run / 'model'), XCLIP)


@functools.lru_cache(maxsize=None)
def loaded(model_dir):
  """(model, tokenizer) of a model directory, loaded once."""
  from claver_jax.text import load_tokenizer
  return load(model_dir), load_tokenizer(model_dir)


def expected_scores(model_dir, video_path, labels, mean, std, templates=None) -> np.ndarray:
  """Predict's scores, computed independently: per template a softmax over the labels of
  `logits`, averaged over the templates. By default the texts (templates, bare name) and the test
  view are those the directory records, as predict's; given templates, the bare name and the
  paper's view, as zero-shot's."""
  from claver_jax.data.transforms import TEST_RESIZE_RATIO, normalize
  from claver_jax.predict import load_clip_frames
  from claver_jax.text.prompts import prompt_tokens, resolve_templates
  model, tokenizer = loaded(model_dir)
  source = json.loads((model_dir / 'config.json').read_text())['source']
  name, ratio = (True, TEST_RESIZE_RATIO) if templates else (source['bare_name'],
                                                             source['eval_resize_ratio'])
  templates = templates or resolve_templates(source['templates'])
  tokens = prompt_tokens(labels, tokenizer, None, templates=templates, name=name,
                         context_length=model.cfg.clip.context_length).tokens
  frames = load_clip_frames(video_path, model.cfg.num_frames, model.cfg.clip.image_size, ratio)
  video = normalize(frames[None], mean, std)
  return np.mean([jax.nn.softmax(logits(model, video, t)[0]) for t in tokens], axis=0)


@pytest.mark.slow
def test_predict_uses_the_recorded_normalisation(xclip_run, tmp_path, caplog):
  from claver_jax import predict
  from claver_jax.data import synthetic
  from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
  clip, _ = synthetic.make_clip(7, num_frames=8, size=32)
  video = tmp_path / 'clip.mp4'
  synthetic.write_mp4(video, clip)
  labels = list(synthetic.CLASS_NAMES[:5])
  proc = run_cli('claver_jax.predict', f'--checkpoint={xclip_run}', f'--video={video}',
                 '--labels', *labels, '--json')
  got = {r['label']: r['score'] for r in json.loads(proc.stdout)}
  model_dir = xclip_run / 'model'
  want = expected_scores(model_dir, video, labels, MEAN, STD)
  np.testing.assert_allclose([got[label] for label in labels], want, atol=1e-5)
  clip_normalised = expected_scores(model_dir, video, labels, CLIP_MEAN, CLIP_STD)
  assert np.abs(clip_normalised - want).max() > 1e-4, 'the normalisation changes nothing here'
  # A directory that records none: CLIP's, with a notice.
  old = tmp_path / 'old_model'
  shutil.copytree(model_dir, old)
  meta = json.loads((old / 'config.json').read_text())
  del meta['normalization']
  (old / 'config.json').write_text(json.dumps(meta))
  with caplog.at_level(logging.WARNING):
    result = predict.predict(old, video, labels)
  assert 'records no input normalisation; using CLIP' in caplog.text
  np.testing.assert_allclose([{r['label']: r['score'] for r in result}[label] for label in labels],
                             clip_normalised, atol=1e-5)


@pytest.mark.slow
def test_zeroshot_on_an_xclip_directory(xclip_run, tmp_path):
  """configs/zeroshot.py with X-CLIP's protocol (class names alone) on one split."""
  import importlib.util
  from claver_jax import zeroshot
  from claver_jax.data.sources import read_labels, read_list
  from conftest import REPO
  from helpers import synthetic_dir
  root = synthetic_dir(tmp_path / 'set', num_videos=15)
  spec = importlib.util.spec_from_file_location('zeroshot_config', REPO / 'configs' / 'zeroshot.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('ucf101')
  config.init.checkpoint = str(xclip_run)
  config.model.dtype = 'float32'
  config.data.update(dict(num_frames=4, image_size=16))
  config.text.templates = '{}'
  config.eval.batch_size = 4
  config.zeroshot.ucf101.update(dict(root=str(root), test_list=str(root / 'train.txt'),
                                     labels=str(root / 'labels.csv'), prompts='', splits=(1,)))
  report = zeroshot.run_zeroshot(config, str(tmp_path / 'out'))
  run = report['datasets']['ucf101']['runs']['split1']
  names, items = read_labels(root / 'labels.csv'), read_list(root / 'train.txt')
  scores = [expected_scores(xclip_run / 'model', root / path, names, MEAN, STD, ['{}'])
            for path, _ in items]
  labels = np.array([label for _, label in items])
  top1, top5 = (100 * evaluate.topk_correct(np.stack(scores), labels, k).mean() for k in (1, 5))
  assert run['num_videos'] == len(items)
  assert run['top1'] == pytest.approx(top1) and run['top5'] == pytest.approx(top5)


@pytest.mark.slow
def test_family_errors_come_before_the_workdir(xclip_run, tmp_path):
  workdir = tmp_path / 'w'
  proc = run_cli('claver_jax.main', '--config=tests/tiny_config.py', f'--workdir={workdir}',
                 '--config.model.name=xclips', check=False)
  assert proc.returncode != 0 and "config.model.name='xclips' is not a model family" in proc.stderr
  proc = run_cli('claver_jax.main', '--config=tests/tiny_config.py', f'--workdir={workdir}',
                 f'--config.init.checkpoint={xclip_run / "model"}', '--config.text.tokenizer=',
                 check=False)
  assert proc.returncode != 0 and "holds a 'xclip' model" in proc.stderr
  assert '--config.model.name=xclip' in proc.stderr and not workdir.exists()


def test_few_shot_configs_take_xclip_with_its_recipe():
  import importlib.util
  from conftest import REPO
  spec = importlib.util.spec_from_file_location('hmdb51', REPO / 'configs' / 'hmdb51.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('shots=4,xclip')
  assert (c.model.name, c.data.shots, c.train.epochs, c.optim.lr) == ('xclip', 4, 50, 2e-6)
  assert (c.text.templates, c.text.prompts) == ('{}', '')
  assert (c.optim.freeze_image, c.optim.freeze_text) == (False, True)
  assert module.get_config('shots=4').model.name == 'claver'


def test_sharding_rules_cover_the_new_parameters():
  from jax.sharding import PartitionSpec as P
  from claver_jax.models.families import FAMILIES
  from claver_jax.sharding import spec_for
  abstract = nnx.eval_shape(lambda: XCLIP(XCLIPConfig(clip=TINY, num_frames=4), rngs=nnx.Rngs(0)))
  params = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  matrices = {'.'.join(map(str, p)): v.shape for p, v in params.items()
              if len(v.shape) >= 2 and not p[-1].endswith('embedding')}
  assert {'prompts_visual_proj', 'visual.blocks.0.message_fc.kernel',
          'prompts_generator.decoder.0.cross_attn.q_proj.kernel',
          'prompts_generator.decoder.0.cross_attn.proj.kernel',
          'mit.blocks.0.mlp.c_fc.kernel'} <= set(matrices)
  rules = FAMILIES['xclip'].sharding_rules
  unsharded = [p for p, shape in matrices.items() if spec_for(p, shape, 2, rules) == P()]
  assert unsharded == [], unsharded


def test_old_flat_keys_name_their_new_place(tmp_path):
  """The flat key of earlier versions, --config.model.xclip_mit_layers, is one line through the
  CLI naming config.model.xclip.mit_layers (exit 2, no workdir); a config file that sets it is
  a ConfigError naming it too."""
  from claver_jax.run_config import ConfigError, base_config, check_config
  proc = run_cli('claver_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
                 '--config.model.xclip_mit_layers=2', check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      'error: --config.model.xclip_mit_layers: config.model.xclip_mit_layers is now '
      "config.model.xclip.mit_layers (each model family's keys are in its own sub-dict)."]
  assert not (tmp_path / 'w').exists()
  config = base_config()
  config.model.xclip_prompt_alpha = 0.2
  with pytest.raises(ConfigError, match=r'^config\.model\.xclip_prompt_alpha is now '
                     r'config\.model\.xclip\.prompt_alpha'):
    check_config(config)


def test_run_options_are_the_familys(converted):
  """load()'s run options are the family's (Family.run_options): CLAVER's attention is an error
  on an X-CLIP directory."""
  assert families.get('xclip').run_options == ()
  with pytest.raises(ValueError, match=r'^attention is a run option of claver models; .* holds '
                     r'a xclip model'):
    load(converted, attention='dense')
