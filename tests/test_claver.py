"""CLAVER: Kronecker masks, the temporal-modelling family, and parity with a PyTorch CLAVER in
the official checkpoint layout (tests/torch_claver.py, our reconstruction of the official model)."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_claver
import torch_clip
from claver_jax.models import (CLAVER, CLAVERConfig, MASK_KINDS, claver_from_clip,
                               get_preset, kronecker_mask, load)
from conftest import run_cli
from convert.claver_to_flax import convert as convert_claver
from convert.common import ConversionError
from helpers import tiny_clip

TINY = tiny_clip()     # Its vision width gives 2 temporal heads (width / 64); 4 x 5 tokens at T=4.


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('t,l', [(1, 1), (2, 3), (3, 2), (4, 5)])
def test_masks_match_their_definitions(kind, t, l):
  mask = kronecker_mask(kind, t, l)
  assert mask.dtype == bool and mask.shape == (t * l, t * l)
  np.testing.assert_array_equal(mask, torch_claver.loop_mask(kind, t, l).numpy())


def test_masks_are_built_once():
  assert kronecker_mask('kmt', 8, 50) is kronecker_mask('kmt', 8, 50)
  with pytest.raises(ValueError):
    kronecker_mask('kmt', 8, 50)[0, 0] = False  # The cached mask is read-only.
  with pytest.raises(ValueError, match='kmct'):
    kronecker_mask('causal', 2, 2)


def attention_weights(mask: np.ndarray, seed: int = 0) -> np.ndarray:
  """The weights jax.nn.dot_product_attention uses: with identity values, output = weights."""
  s = mask.shape[0]
  q, k = jax.random.normal(jax.random.key(seed), (2, 1, s, 2, s))
  v = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (1, s, 2, s))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])   # [1, S(query), 2, S(key)]
  return np.asarray(out[0].transpose(1, 0, 2))                          # [heads, query, key]


@pytest.mark.parametrize('kind', ['kmt', 'kmct'])
def test_attention_weights_are_zero_where_masked(kind):
  mask = kronecker_mask(kind, 3, 4)
  weights = attention_weights(mask)
  assert (weights[:, ~mask] == 0).all()
  assert (weights[:, mask] > 0).all()
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_kmct_attention_matrix_is_full_rank():
  """The paper's Appendix A: under KMCT the attention matrix has full rank."""
  for seed in range(3):
    for head in attention_weights(kronecker_mask('kmct', 4, 5), seed).astype(np.float64):
      assert np.linalg.matrix_rank(head) == 20
      # Why: the matrix is block lower-triangular and each diagonal block is diagonal (a token
      # sees only itself in its own frame), so its determinant is the product of self-weights.
      assert np.diag(head).min() > 0
      np.testing.assert_allclose(np.linalg.det(head), np.prod(np.diag(head)), rtol=1e-6)


# ---------------------------------------------------------------------------------- the model
def tiny_model(temporal: str, num_frames: int = 4, seed: int = 0) -> CLAVER:
  cfg = CLAVERConfig(clip=TINY, num_frames=num_frames, temporal=temporal, temporal_layers=1)
  model = CLAVER(cfg, rngs=nnx.Rngs(seed))
  if model.temporal is not None:  # Make time visible: the fresh embedding (std .02) is faint.
    model.temporal.temporal_embedding[...] = jax.random.normal(jax.random.key(seed), (4, 128))
  return model


def random_video(b=2, t=4, seed=1):
  return np.asarray(jax.random.normal(jax.random.key(seed), (b, t, 16, 16, 3)))


@pytest.mark.parametrize('temporal,invariant', [('mean', True), ('kmt', False), ('kmct', False),
                                                ('joint', False), ('pipeline', False),
                                                ('cls_only', False)])
@pytest.mark.slow
def test_frame_order(temporal, invariant):
  model = tiny_model(temporal)
  video = random_video()
  embedding = np.asarray(model.encode_video(video))
  reversed_order = np.asarray(model.encode_video(video[:, ::-1]))
  assert embedding.shape == (2, 32)
  difference = np.abs(embedding - reversed_order).max()
  if invariant:
    assert difference < 1e-6
  else:
    assert difference > 1e-3


@pytest.mark.slow
def test_video_embedding_is_the_mean_of_normalised_frames():
  model = tiny_model('kmt')
  frames = np.asarray(model.encode_frames(random_video()))
  np.testing.assert_allclose(np.linalg.norm(frames, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(model.encode_video(random_video()), frames.mean(1), atol=1e-6)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  from claver_jax.models.clip import set_remat
  model, video = tiny_model('kmt'), random_video()
  tokens = jnp.asarray([[1, 5, 9, 15] + [0] * 4])

  def loss(m):
    return m.logits(video, tokens).sum()

  def checkpointed_blocks(m):   # Rematerialised regions in the gradient's program.
    graphdef, state = nnx.split(m)
    grad = jax.grad(lambda s: loss(nnx.merge(graphdef, s)))
    return str(jax.make_jaxpr(grad)(state)).count('remat2[')

  # Jitted: eager dispatch compiles every op of the tower on its own (several times slower).
  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  plain_loss, plain_grads = value_and_grad(model)
  assert checkpointed_blocks(model) == 0
  set_remat(model)
  blocks = [m for _, m in nnx.iter_modules(model) if type(m).__name__ == 'ResidualBlock']
  assert len(blocks) == 2 + 1 + 1 and all(b.remat for b in blocks)   # ViT, text, temporal.
  remat_loss, remat_grads = nnx.jit(nnx.value_and_grad(loss))(model)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert checkpointed_blocks(model) == len(blocks)


def test_temporal_blocks_start_at_pytorch_defaults():
  """The official temporal blocks keep PyTorch's initialisation (nothing there overrides it):
  each of our parameters has the official one's distribution (bounds of the uniforms, zeros),
  checked against freshly built torch modules of the same width."""
  torch.manual_seed(0)
  official = {k: v.detach().numpy()
              for k, v in torch_claver.TemporalBlock(128).state_dict().items()}
  model = CLAVER(CLAVERConfig(clip=TINY, num_frames=4, temporal_layers=1), rngs=nnx.Rngs(3))
  block = model.temporal.blocks[0]
  ours = {'temporal_attn.in_proj_weight': block.attn.qkv.kernel, 'temporal_attn.in_proj_bias':
          block.attn.qkv.bias, 'temporal_attn.out_proj.weight': block.attn.out.kernel,
          'temporal_attn.out_proj.bias': block.attn.out.bias,
          'temporal_mlp.c_fc.weight': block.mlp.c_fc.kernel, 'temporal_mlp.c_fc.bias':
          block.mlp.c_fc.bias, 'temporal_mlp.c_proj.weight': block.mlp.c_proj.kernel,
          'temporal_mlp.c_proj.bias': block.mlp.c_proj.bias,
          'temporal_ln_1.weight': block.ln_1.scale, 'temporal_ln_1.bias': block.ln_1.bias}
  for name, param in ours.items():
    got, want = np.asarray(param[...]).ravel(), official[name].ravel()
    assert got.size == want.size, name
    if not want.any() or (want == 1).all():                  # Zero biases, LayerNorm's 1 and 0.
      np.testing.assert_array_equal(got, want, err_msg=name)
      continue
    # Uniforms: the same bound (the largest magnitude) and spread, within sampling noise.
    assert np.abs(got).max() == pytest.approx(np.abs(want).max(), rel=0.05), name
    assert got.std() == pytest.approx(want.std(), rel=0.1), name
  embedding = np.asarray(model.temporal.temporal_embedding[...])
  assert embedding.std() == pytest.approx(0.02, rel=0.15)


def preset_head(preset: str, seed: int = 0):
  """The temporal head of configs/k400.py:PRESET on TINY's towers (1 temporal layer), its
  temporal embedding at std 1 so that frame positions are visible, and its L = 5 tokens."""
  from helpers import load_config
  from claver_jax.models import families
  config = load_config('k400', preset)
  config.model.temporal_layers = 1
  model = CLAVER(families.model_config(config, TINY), rngs=nnx.Rngs(seed))
  head = model.temporal
  head.temporal_embedding[...] = jax.random.normal(jax.random.key(seed), head.temporal_embedding.shape)
  return head, config


@pytest.mark.slow
def test_the_pipeline_head_pools_every_token_not_the_class_tube():
  """Paper §3.2: pipeline attention needs mean pooling over all tokens, else it equals
  class-token-only. On Table 7's pipeline preset (B32, 8 frames), changing only the patch tokens
  changes every frame's output; the class-token-only head ignores them exactly."""
  head, config = preset_head('B32,8,pipeline')
  assert head.kind == 'pipeline' and config.data.num_frames == 8
  tokens = jax.random.normal(jax.random.key(1), (2, 8, 5, 128))
  patches_changed = tokens.at[:, :, 1:].set(jax.random.normal(jax.random.key(2), (2, 8, 4, 128)))
  out, changed = np.asarray(head(tokens)), np.asarray(head(patches_changed))
  assert out.shape == (2, 8, 128)
  assert np.abs(out - changed).max(axis=-1).min() > 1e-2          # every clip, every frame
  # The output is the mean of the frame's L tokens after the blocks over each [T] tube.
  x = tokens + head.temporal_embedding[...][None, :, None]
  x = x.transpose(0, 2, 1, 3).reshape(10, 8, 128)
  for block in head.blocks:
    x = block(x)
  np.testing.assert_allclose(out, x.reshape(2, 5, 8, 128).mean(axis=1), atol=1e-5)
  cls_only, _ = preset_head('B32,8,cls_only')
  assert np.abs(np.asarray(cls_only(tokens)) - np.asarray(cls_only(patches_changed))).max() == 0


@pytest.mark.parametrize('preset', ['B32,8,kmt', 'B32,8,kmct', 'B32,8,joint'])
def test_token_shuffling_before_and_after_the_temporal_embedding(preset):
  """The paper's Table 9 / Fig. 6 probe on its presets: one permutation of the T·L tokens.
  Joint attention is blind to positions after the temporal embedding (post_te changes nothing),
  not before it; KMT and KMCT, whose masks follow frame positions, change either way."""
  from claver_jax.models.temporal import set_token_shuffle
  head, _ = preset_head(preset)
  tokens = jax.random.normal(jax.random.key(1), (2, 8, 5, 128))
  plain = np.asarray(head(tokens))
  shuffled = {}
  for shuffle in ('pre_te', 'post_te'):
    set_token_shuffle(head, shuffle, seed=3)
    shuffled[shuffle] = np.abs(np.asarray(head(tokens)) - plain).max()
  set_token_shuffle(head, 'none')
  np.testing.assert_array_equal(np.asarray(head(tokens)), plain)
  assert shuffled['pre_te'] > 1e-2
  if head.kind == 'joint':
    assert shuffled['post_te'] < 1e-5
  else:
    assert shuffled['post_te'] > 1e-2
  for kind in ('cls_only', 'mean'):
    with pytest.raises(ValueError, match=f'temporal head is {"none" if kind == "mean" else kind}'):
      set_token_shuffle(tiny_model(kind), 'pre_te')


def test_a_path_typo_in_the_registry_raises(monkeypatch):
  """A registry path that names no part of the model is an error naming the family, the field
  and the missing part; a part a variant lacks (CLAVER 'mean': no temporal transformer) is None."""
  from claver_jax.models import families
  assert families.temporal_embedding(tiny_model('mean')) is None
  model, claver = tiny_model('kmt'), families.FAMILIES['claver']
  assert families.temporal_embedding(model) is model.temporal.temporal_embedding
  for field, typo, get in (('vision', 'clip.visaul', families.vision_tower),
                           ('towers', 'clipp', families.clip_towers),
                           ('temporal_embedding', 'temporal.temporal_embeding',
                            families.temporal_embedding)):
    monkeypatch.setitem(families.FAMILIES, 'claver', dataclasses.replace(claver, **{field: typo}))
    missing = typo.split('.')[-1]
    with pytest.raises(AttributeError, match=rf"^families\.FAMILIES\['claver'\]\.{field}="
                       rf"'{typo}' names no part of a CLAVER: \w+ has no '{missing}'"):
      get(model)
  monkeypatch.setitem(families.FAMILIES, 'claver', claver)


def test_default_depth_is_a_third_of_the_vit():
  assert CLAVERConfig(clip=get_preset('ViT-B/16')).temporal_depth == 4
  assert CLAVERConfig(clip=get_preset('ViT-L/14')).temporal_depth == 8
  assert CLAVERConfig(clip=get_preset('ViT-B/16'), temporal_layers=1).temporal_depth == 1
  with pytest.raises(ValueError, match='temporal_layers'):
    CLAVERConfig(clip=TINY)  # 2 // 3 = 0 layers.
  with pytest.raises(ValueError, match='kmct'):
    CLAVERConfig(clip=TINY, temporal='kronecker', temporal_layers=1)


@pytest.mark.parametrize('arch', ['ViT-B/32', 'ViT-B/16', 'ViT-L/14'])
@pytest.mark.parametrize('frames', [8, 16])
@pytest.mark.slow
def test_abstract_shapes_of_presets(arch, frames):
  cfg = CLAVERConfig(clip=get_preset(arch), num_frames=frames)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CLAVER(cfg, rngs=nnx.Rngs(0))))
  video = jax.ShapeDtypeStruct((2, frames, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((5, 77), jnp.int32)
  logits = jax.eval_shape(lambda s, v, t: nnx.merge(graphdef, s).logits(v, t), state, video, tokens)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert state['temporal']['temporal_embedding'].shape == (frames, cfg.clip.vision_width)
  assert len(state['temporal']['blocks']) == cfg.clip.vision_layers // 3


def test_temporal_heads_default_to_the_papers_and_can_be_set():
  assert CLAVERConfig(clip=TINY, temporal_layers=1).temporal_num_heads == 2   # width 128 / 64
  cfg = CLAVERConfig(clip=TINY, num_frames=4, temporal_layers=1, temporal_heads=4)
  model = CLAVER(cfg, rngs=nnx.Rngs(0))
  assert [b.attn.heads for b in model.temporal.blocks] == [4] * cfg.temporal_depth
  assert CLAVERConfig.from_dict(cfg.to_dict()) == cfg
  assert CLAVERConfig.from_dict({**cfg.to_dict(), 'temporal_heads': None}).temporal_num_heads == 2
  with pytest.raises(ValueError, match='temporal_heads=3 must be at least 1 and divide'):
    CLAVERConfig(clip=TINY, temporal_layers=1, temporal_heads=3)


@pytest.mark.slow
def test_sincos_positions_lay_out_the_patch_grid_for_models_from_scratch():
  import types
  import tiny_config
  from claver_jax.models.clip import sincos_position_embedding
  from claver_jax.models.build import make_model
  pe = np.asarray(sincos_position_embedding(4, 64))
  assert pe.shape == (17, 64) and not pe[0].any()                  # The class token's row.
  patch = lambda y, x: pe[1 + 4 * y + x]                            # Row-major, as conv1's.
  np.testing.assert_array_equal(patch(1, 0)[32:], patch(0, 0)[32:])  # Same column: same x.
  np.testing.assert_array_equal(patch(0, 1)[:32], patch(0, 0)[:32])  # Same row: same y.
  distance = lambda a, b: np.linalg.norm(patch(*a) - patch(*b))
  assert distance((0, 0), (0, 1)) < distance((0, 0), (0, 2)) < distance((0, 0), (0, 3))
  with pytest.raises(ValueError, match='divisible by 4'):
    sincos_position_embedding(4, 66)

  config = tiny_config.get_config()
  config.data.image_size = 32                                       # A 4x4 grid of 8 px patches.
  tokenizer = types.SimpleNamespace(vocab_size=100, eot_token_id=99)
  config.model.pos_init = 'sincos'
  model = make_model(config, tokenizer, nnx.Rngs(0))
  np.testing.assert_array_equal(model.clip.visual.positional_embedding[...], pe)
  config.model.pos_init = 'random'
  model = make_model(config, tokenizer, nnx.Rngs(0))
  assert 0.1 < float(jnp.std(model.clip.visual.positional_embedding[...])) < 0.15  # 64 ** -0.5
  config.model.pos_init = 'learned'
  from claver_jax.run_config import check_config
  with pytest.raises(ValueError, match="pos_init='learned'"):
    check_config(config)


@pytest.mark.slow
def test_shapes_are_checked_at_the_boundaries():
  """chex at the video encoder and the train step's inputs: a clip of the wrong frame count or
  size, or a batch that does not match the config, names the shape expected (traced only)."""
  import types
  import tiny_config
  from claver_jax import optim, sharding
  from claver_jax.models import families
  from claver_jax.models.build import make_model
  from claver_jax.step import make_train_step
  config = tiny_config.get_config()                                  # T = 4, S = 16
  model = make_model(config, types.SimpleNamespace(vocab_size=100, eot_token_id=99),
                     nnx.Rngs(0))
  for shape in ((2, 3, 16, 16, 3), (2, 4, 32, 32, 3), (2, 4, 16, 16)):
    with pytest.raises(AssertionError, match=r'expected \(None, 4, 16, 16, 3\)'):
      model.encode_video(jnp.zeros(shape))
  group_of = families.of(model).group_of
  tx, _ = optim.make_optimizer(config.optim, group_of, total_steps=10, steps_per_epoch=5)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=optim.trainable_filter(
      config.optim, group_of))))
  step = make_train_step(graphdef, config, sharding.make_mesh(config.mesh),
                         text_lengths=np.full((6, 12), 32), text_frozen=False,
                         group_of=group_of)
  spec = jax.ShapeDtypeStruct
  batch = {'video': spec((8, 4, 16, 16, 3), jnp.uint8), 'label': spec((8,), jnp.int32)}
  text, at = spec((6, 12, 32), jnp.int32), spec((), jnp.int32)
  jax.eval_shape(step, state, batch, text, at)                       # as the config says: fine
  wrong = {'video': {**batch, 'video': spec((8, 8, 16, 16, 3), jnp.uint8)},
           'label': {**batch, 'label': spec((4,), jnp.int32)},
           'dtype': {**batch, 'video': spec((8, 4, 16, 16, 3), jnp.float32)}}
  for name, bad in wrong.items():
    with pytest.raises(AssertionError, match='Chex'):
      jax.eval_shape(step, state, bad, text, at)


# ---------------------------------------------- parity with a PyTorch CLAVER in the official layout
@pytest.fixture(scope='module')
def official_layout(tmp_path_factory):
  """A random CLAVER (KMT) of our PyTorch reconstruction (tests/torch_claver.py, not the official
  code), in the official checkpoint's key layout, saved as the official code saves it."""
  model = torch_claver.OfficialLayoutCLAVER(num_frames=4, temporal_layers=2, mask='kmt')
  torch_clip.randomize_(model, seed=3)
  path = tmp_path_factory.mktemp('official') / 'claver_k400_b16.pth'
  torch.save({'model': model.state_dict(), 'epoch': 30, 'max_accuracy': 0.0}, path)
  images, tokens = torch_clip.random_inputs(seed=5, n_images=2)
  video = np.stack([images, images[::-1]], axis=0)[:, :, :, :, :]         # [2, 2, H, W, 3]
  video = np.concatenate([video, video[:, ::-1] * 0.5], axis=1)           # [2, 4, H, W, 3]
  return dict(model=model, path=path, video=video.astype(np.float32), tokens=tokens)


@torch.no_grad()
def reference_outputs(model, video, tokens):
  v = torch.from_numpy(video).permute(0, 1, 4, 2, 3)
  t = torch.from_numpy(tokens).long()
  return model.encode_video(v).numpy(), model.video_logits(v, t).numpy()


@pytest.mark.parametrize('mask', ['kmt', 'kmct'])
@pytest.mark.slow
def test_parity_with_our_pytorch_claver_in_the_official_layout(official_layout, mask, tmp_path):
  """Converted from an official-layout checkpoint, our model computes what the PyTorch
  reconstruction computes (tests/torch_claver.py, written from the paper and the official code's
  module names; the official code itself is not run here)."""
  reference = official_layout['model']
  reference.mask = mask
  expected_video, expected_logits = reference_outputs(reference, official_layout['video'],
                                                     official_layout['tokens'])
  out = tmp_path / f'claver_{mask}'
  if mask == 'kmt':  # Through the CLI, as a user would.
    proc = run_cli('convert.claver_to_flax', f'--src={official_layout["path"]}', f'--out={out}')
    assert 'CLAVER (kmt, 4 frames, 2 temporal layers)' in proc.stdout
    # The official pipeline's input normalisation: ImageNet's.
    recorded = json.loads((out / 'config.json').read_text())['normalization']
    np.testing.assert_allclose(recorded['mean'], np.array([123.675, 116.28, 103.53]) / 255)
    np.testing.assert_allclose(recorded['std'], np.array([58.395, 57.12, 57.375]) / 255)
  else:
    convert_claver(official_layout['path'], out, mask=mask)
  model = load(out)
  assert model.cfg.temporal == mask and model.cfg.num_frames == 4
  video = np.asarray(model.encode_video(official_layout['video']))
  logits = np.asarray(model.logits(official_layout['video'], official_layout['tokens']))
  diffs = (np.abs(video - expected_video).max(), np.abs(logits - expected_logits).max())
  print(f'{mask}: max abs diff video embedding {diffs[0]:.2e}, logits {diffs[1]:.2e}')
  assert np.abs(expected_logits).max() > 1.0
  assert diffs[1] <= 1e-4 and diffs[0] <= 1e-5


@pytest.mark.slow
def test_num_frames_resampling(official_layout, tmp_path, caplog):
  out = tmp_path / 'claver'
  convert_claver(official_layout['path'], out)
  stored = np.asarray(load(out).temporal.temporal_embedding[...])
  with caplog.at_level(logging.WARNING):
    model = load(out, num_frames=8)
  assert 'Resampling the temporal embedding from 4 to 8 frames' in caplog.text
  resampled = np.asarray(model.temporal.temporal_embedding[...])
  assert resampled.shape == (8, stored.shape[1]) and model.cfg.num_frames == 8
  # Half-frame centres: new frame i of 8 sits at (i + .5) / 2 - .5 in the old frames' index.
  np.testing.assert_allclose(resampled[3], (stored[1] + stored[2]) / 2 + (stored[1] - stored[2]) / 4,
                             atol=1e-6)
  video8 = np.concatenate([official_layout['video'], official_layout['video']], axis=1)
  assert model.encode_video(video8).shape == (2, 64)
  with pytest.raises(ValueError, match='resampling of the temporal embedding turned off'):
    load(out, num_frames=8, resample_frames=False)
  with pytest.raises(AssertionError, match='load the checkpoint with num_frames=T to resample'):
    load(out).encode_video(video8)


@pytest.mark.slow
def test_claver_from_converted_clip(tiny_clip, converted_hf):
  clip = load(converted_hf)
  cfg = CLAVERConfig(clip=clip.cfg, num_frames=3, temporal='kmct', temporal_layers=1)
  model = claver_from_clip(clip, cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.encode_text(tiny_clip['tokens']),
                                clip.encode_text(tiny_clip['tokens']))
  # Every CLIP weight came along; the temporal parts are fresh (std .02 embedding).
  for a, b in zip(jax.tree.leaves(nnx.state(model.clip)), jax.tree.leaves(nnx.state(clip))):
    np.testing.assert_array_equal(a, b)
  assert 0.005 < float(jnp.std(model.temporal.temporal_embedding[...])) < 0.05
  video = np.stack([tiny_clip['images'][:3]] * 2)
  assert model.encode_video(video).shape == (2, clip.cfg.embed_dim)
  with pytest.raises(ValueError, match='CLAVER config has'):
    claver_from_clip(clip, dataclasses.replace(cfg, clip=TINY), rngs=nnx.Rngs(0))


def test_converter_rejects_plain_clip_and_lists_unexpected_keys(official_layout, tmp_path):
  plain = torch_clip.hf_to_openai_state_dict(torch_clip.tiny_hf_clip().state_dict())
  torch.save(plain, tmp_path / 'clip.pt')
  with pytest.raises(ConversionError, match='plain CLIP'):
    convert_claver(tmp_path / 'clip.pt', tmp_path / 'a')
  state = dict(official_layout['model'].state_dict())
  state['prompts_generator.alpha'] = torch.zeros(3)
  torch.save({'model': state}, tmp_path / 'extra.pth')
  with pytest.raises(ConversionError, match='unexpected: prompts_generator.alpha'):
    convert_claver(tmp_path / 'extra.pth', tmp_path / 'b')
  assert not (tmp_path / 'b').exists()
  convert_claver(tmp_path / 'extra.pth', tmp_path / 'b', ignore_keys='^prompts_generator')
  assert load(tmp_path / 'b').cfg.temporal_depth == 2
