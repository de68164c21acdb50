"""The FLOPs report counts what the model does, and the k400 config presets parse."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest

from claver_jax.flops import report
from claver_jax.models import CLAVERConfig
from claver_jax.presets import parse_preset
from conftest import REPO, run_cli
from helpers import tiny_clip

TINY = tiny_clip()


def vit_flops_by_hand(clip, frames: int) -> float:
  """CLIP's ViT over `frames` images, counted from its config (2 FLOPs per multiply-add): the
  patch embedding, per layer over L = grid + 1 tokens of width D the matmuls (qkv 3D², out D²,
  MLP 2DM) and attention's scores + weighted sum (2·L·D per token), the class token's proj."""
  grid = (clip.image_size // clip.patch_size) ** 2
  l, d, m = grid + 1, clip.vision_width, clip.vision_mlp_dim
  patches = 2 * grid * clip.patch_size ** 2 * 3 * d
  layer = 2 * l * (4 * d * d + 2 * d * m) + 2 * 2 * l * l * d
  return frames * (patches + clip.vision_layers * layer + 2 * d * clip.embed_dim)


def test_vit_share_matches_a_hand_count():
  """The ViT's share of a view against the count above (XLA adds the elementwise ops: layer
  norms, activations, softmax, under 2% on this config)."""
  cfg = CLAVERConfig(clip=TINY, num_frames=4, temporal='kmt', temporal_layers=1)
  r = report(cfg)
  assert r['vit'] * 1e9 == pytest.approx(vit_flops_by_hand(TINY, 4), rel=0.03)


def test_temporal_head_matches_a_hand_count():
  """Matmuls of one pre-LN block over S = T·L tokens of width D: qkv 3D², out D², MLP 8D², and
  attention scores + weighted sum 2·S·D per token; 2 FLOPs per multiply-add."""
  layers, t = 2, 4
  cfg = CLAVERConfig(clip=TINY, num_frames=t, temporal='kmt', temporal_layers=layers)
  s, d = t * TINY.num_image_tokens, TINY.vision_width
  by_hand = layers * 2 * s * (12 * d * d + 2 * s * d)
  assert report(cfg)['temporal'] * 1e9 == pytest.approx(by_hand, rel=0.05)


@pytest.mark.slow
def test_cli_on_the_k400_config():
  proc = run_cli('claver_jax.flops', '--config=configs/k400.py:B32,8')
  match = re.search(r'per view: ([\d.]+) GFLOPs .*ViT over 8 frames ([\d.]+)', proc.stdout)
  assert match, proc.stdout
  total, vit = map(float, match.groups())
  # CLIP ViT-B/32 is 4.4 GMACs per 224px image: 8 frames are about 70 GFLOPs.
  assert 68 < vit < 73 and total > vit


def load_k400():
  spec = importlib.util.spec_from_file_location('k400', REPO / 'configs' / 'k400.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_k400_presets():
  k400 = load_k400()
  c = k400.get_config('L14_336,32,kmct')
  assert (c.model.arch, c.data.num_frames, c.model.temporal, c.data.image_size) == (
      'L14_336', 32, 'kmct', 336)
  d = k400.get_config(None)
  assert (d.model.arch, d.data.num_frames, d.model.temporal) == ('B16', 8, 'kmt')
  assert d.data.num_workers >= 8         # Accelerator hosts: decoding in worker processes.
  assert parse_preset('16, B32') == {'name': 'claver', 'arch': 'B32', 'num_frames': 16,
                                     'temporal': 'kmt'}
  with pytest.raises(ValueError, match='e.g. "B16,16,kmct"'):
    parse_preset('B16,12')
  with pytest.raises(ValueError, match='a CLAVER part'):
    parse_preset('B16,kmct,xclip')


def test_k400_xclip_preset_is_the_official_recipe():
  c = load_k400().get_config('B16,8,xclip')
  assert (c.model.name, c.model.arch, c.data.num_frames) == ('xclip', 'B16', 8)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.new_lr_multiplier) == (8e-6, 0.001, 10.0)
  assert (c.train.epochs, c.optim.warmup_epochs, c.train.batch_size) == (30, 5.0, 256)
  assert (c.optim.freeze_image, c.optim.freeze_text) == (False, True)
  assert (c.train.label_smoothing, c.train.mixup_alpha, c.train.cutmix_alpha) == (0.1, 0.8, 1.0)
  assert (c.text.templates, c.text.prompts) == ('{}', '')
  assert c.data.mean == pytest.approx((0.485, 0.456, 0.406), abs=1e-6)
  assert (c.model.xclip.mit_layers, c.model.xclip.prompt_layers,
          c.model.xclip.prompt_alpha) == (1, 2, 0.1)


@pytest.mark.slow
def test_xclip_flops_count_the_messages_mit_and_prompts():
  """The cross-frame blocks cost more than CLIP's by the message token; scoring grows with C."""
  from claver_jax.models import XCLIPConfig
  cfg = XCLIPConfig(clip=TINY, num_frames=4, mit_heads=2, prompt_heads=2)
  r = report(cfg, num_classes=10)
  assert r['vit'] * 1e9 == pytest.approx(vit_flops_by_hand(TINY, 4), rel=0.03)
  assert 0 < r['temporal'] < r['vit'] and r['classes'] > 0
  assert report(cfg, num_classes=20)['classes'] == pytest.approx(2 * r['classes'], rel=0.1)
  proc = run_cli('claver_jax.flops', '--config=configs/k400.py:B32,8,xclip')
  assert 'xclip B32, 8 frames at 224 px, 1 MIT and 2 prompt layers' in proc.stdout


@pytest.mark.slow
def test_step_flops_add_back_the_trips_loops_hide():
  """The chunked kernel's loops run each body once in XLA's count: with the other trips added
  back, its forward + backward counts about what the dense attention's does (same products)."""
  from claver_jax import flops, sharding
  from claver_jax.models.kronecker import kronecker_attention
  from claver_jax.run_config import base_config
  mesh = sharding.make_mesh(base_config().mesh)
  x = jax.ShapeDtypeStruct((2, 6 * 10, 2, 16), jnp.float32)

  def make(implementation):
    loss = lambda q, k, v: kronecker_attention(q, k, v, kind='kmt', num_frames=6,
                                               implementation=implementation).sum()
    return lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  counted, hidden = flops.step_flops(make('chunked'), mesh, x, x, x)
  dense_counted, dense_hidden = flops.step_flops(make('dense'), mesh, x, x, x)
  assert dense_hidden == 0 and hidden > 2 * counted        # 6 query chunks x 5 key chunks
  assert 0.9 < (counted + hidden) / dense_counted < 1.6      # + recomputed scores in backward


@pytest.mark.slow
def test_text_work_per_update_of_the_k400_preset():
  """configs/k400.py:B16,8,kmt draws 160 sets per update (the official 8 GPUs x 4 micro-batches x
  5), more than its A sets: A x 400 texts per update, an eighth per device; the text tower's
  forward + backward per text near a hand count (3x the forward's 2 FLOPs per multiply-add: per
  token and layer 12 D^2 for the matmuls and 2 S D for attention), the official per GPU
  K x 400 / 8 texts at 77 tokens."""
  from claver_jax.flops import text_report
  from claver_jax.memory import text_shape
  config = load_k400().get_config('B16,8,kmt')
  sets, classes = text_shape(config)
  r = text_report(config, num_devices=8, text_length=32)
  assert (r['draws'], r['sets'], r['classes']) == (160, sets, 400) and sets < 160
  assert r['texts'] == sets * 400 and r['per_device'] == -(-sets * 400 // 8)
  d, s, layers = 512, 32, 12
  by_hand = 3 * 2 * layers * s * (12 * d * d + 2 * s * d)
  assert r['tflops_per_device'] * 1e12 / r['per_device'] == pytest.approx(by_hand, rel=0.15)
  assert r['official_texts_per_gpu'] == 160 * 400 // 8
  d77 = 3 * 2 * layers * 77 * (12 * d * d + 2 * 77 * d)
  assert r['official_tflops_per_gpu'] * 1e12 / 8000 == pytest.approx(d77, rel=0.15)
