"""The Flax CLIP equals PyTorch CLIP on the same (random) weights, through the converter."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_clip
from claver_jax.models import CLIP, get_preset, load
from conftest import run_cli
from convert.clip_to_flax import convert

TOL = 1e-5


def flax_outputs(model, images, tokens) -> dict[str, np.ndarray]:
  return {'image': np.asarray(model.encode_image(images)),
          'text': np.asarray(model.encode_text(tokens)),
          'logits': np.asarray(model.logits(images, tokens))}


def max_abs_diffs(got: dict, expected: dict) -> dict[str, float]:
  return {k: float(np.abs(got[k] - expected[k]).max()) for k in expected}


def assert_parity(got: dict, expected: dict, tol: float = TOL) -> None:
  diffs = max_abs_diffs(got, expected)
  print('max abs diff:', diffs)
  for k in expected:
    assert got[k].shape == expected[k].shape, k
    # Outputs must be O(1) for an absolute tolerance to mean anything.
    assert np.abs(expected[k]).max() > 0.5, (k, np.abs(expected[k]).max())
  assert max(diffs.values()) <= tol, diffs


@pytest.mark.slow
def test_hf_directory_through_cli(tiny_clip, converted_hf):
  model = load(converted_hf)
  assert model.cfg.text_pooling == 'first_eos' and model.cfg.eos_token_id == torch_clip.EOT
  assert_parity(flax_outputs(model, tiny_clip['images'], tiny_clip['tokens']),
                tiny_clip['expected'])


@pytest.fixture(scope='module')
def openai_clip(tiny_clip):
  """The same weights in OpenAI's layout, in a PyTorch model built like OpenAI's."""
  model = torch_clip.OpenAICLIP().eval()
  model.load_state_dict(torch_clip.hf_to_openai_state_dict(tiny_clip['model'].state_dict()),
                        strict=True)
  return model


def test_openai_reference_agrees_with_hf(tiny_clip, openai_clip):
  """Checks the test's own OpenAI-layout renaming before using it as a reference."""
  got = torch_clip.openai_outputs(openai_clip, tiny_clip['images'], tiny_clip['tokens'])
  assert_parity(got, tiny_clip['expected'])


# OpenAI distributes TorchScript archives, so the test makes one; torch warns about tracing.
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::DeprecationWarning')
@pytest.mark.slow
def test_openai_torchscript_archive_through_cli(tiny_clip, openai_clip, tmp_path):
  images, tokens = tiny_clip['images'], tiny_clip['tokens']
  example = (torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long())
  archive = tmp_path / 'ViT-tiny.pt'
  torch.jit.save(torch.jit.trace(openai_clip, example), str(archive))
  out = tmp_path / 'flax'
  proc = run_cli('convert.clip_to_flax', f'--src={archive}', f'--out={out}')
  assert 'openai-layout CLIP (torchscript)' in proc.stdout
  model = load(out)
  assert model.cfg.text_pooling == 'argmax'
  assert_parity(flax_outputs(model, images, tokens),
                torch_clip.openai_outputs(openai_clip, images, tokens))


@pytest.mark.parametrize('container', ['torch', 'safetensors'])
@pytest.mark.slow
def test_openai_state_dict_files(tiny_clip, openai_clip, tmp_path, container):
  state = {k: v.detach().clone() for k, v in openai_clip.state_dict().items()}
  if container == 'torch':  # As fine-tuning code saves it: wrapped, under DataParallel names.
    src = tmp_path / 'clip.pth'
    torch.save({'model': {f'module.{k}': v for k, v in state.items()}, 'epoch': 3}, src)
  else:
    from safetensors.torch import save_file
    src = tmp_path / 'clip.safetensors'
    save_file(state, src)
  convert(src, tmp_path / 'flax')
  images, tokens = tiny_clip['images'], tiny_clip['tokens']
  assert_parity(flax_outputs(load(tmp_path / 'flax'), images, tokens),
                torch_clip.openai_outputs(openai_clip, images, tokens))


def test_hf_pytorch_model_bin(tiny_clip, tmp_path):
  hf_dir = tmp_path / 'hf_bin'
  tiny_clip['model'].save_pretrained(hf_dir, safe_serialization=False)
  if not (hf_dir / 'pytorch_model.bin').exists():  # Newer transformers may only write safetensors.
    for f in hf_dir.glob('*.safetensors'):
      f.unlink()
    torch.save(tiny_clip['model'].state_dict(), hf_dir / 'pytorch_model.bin')
  convert(hf_dir, tmp_path / 'flax')
  assert_parity(flax_outputs(load(tmp_path / 'flax'), tiny_clip['images'], tiny_clip['tokens']),
                tiny_clip['expected'])


def _with_eos(tiny_clip, tmp_path, eos: int):
  """The same weights under a config with another eos_token_id, as HF model and converted dir."""
  hf = torch_clip.tiny_hf_clip(seed=0, eos_token_id=eos)
  hf.load_state_dict(tiny_clip['model'].state_dict())
  hf_dir = tmp_path / f'hf_eos{eos}'
  hf.save_pretrained(hf_dir)
  convert(hf_dir, tmp_path / f'flax_eos{eos}')
  return hf, load(tmp_path / f'flax_eos{eos}')


def test_hf_pooling_at_first_eos_token(tiny_clip, tmp_path):
  """eos_token_id=500 is not the largest id: HF pools at its first occurrence, not at argmax."""
  hf, model = _with_eos(tiny_clip, tmp_path, eos=500)
  assert model.cfg.text_pooling == 'first_eos' and model.cfg.eos_token_id == 500
  tokens = tiny_clip['tokens'].copy()
  tokens[:, 2] = 500            # eos early...
  tokens[:, 3] = 997            # ...followed by a larger id, where argmax would pool.
  images = tiny_clip['images']
  expected = torch_clip.hf_outputs(hf, images, tokens)
  got = flax_outputs(model, images, tokens)
  assert_parity(got, expected)
  at_argmax = np.asarray(model.text.pool(model.text.encode_tokens(tokens),
                                         np.where(tokens == 500, 0, tokens)))
  assert np.abs(at_argmax - expected['text']).max() > 1e-2  # The two rules really differ here.


def test_hf_legacy_eos_2_pools_at_argmax(tiny_clip, tmp_path):
  hf, model = _with_eos(tiny_clip, tmp_path, eos=2)
  assert model.cfg.text_pooling == 'argmax'
  images, tokens = tiny_clip['images'], tiny_clip['tokens']
  assert_parity(flax_outputs(model, images, tokens), torch_clip.hf_outputs(hf, images, tokens))


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(tiny_clip, converted_hf):
  """Embeddings: relative L2 error <= 2e-2. Logits: the error in cosine units, i.e. relative to
  the logit scale, <= 2e-2 (relative to the logits themselves it is inflated wherever the cosine
  is near 0, as it is for random weights)."""
  images, tokens = tiny_clip['images'], tiny_clip['tokens']
  fp32 = flax_outputs(load(converted_hf), images, tokens)
  model = load(converted_hf, dtype=jnp.bfloat16)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)  # Params stay fp32; only compute is bf16.
  bf16 = flax_outputs(model, images, tokens)
  for k in fp32:
    assert bf16[k].dtype == np.float32
  for k in ('image', 'text'):
    rel = np.linalg.norm(bf16[k] - fp32[k]) / np.linalg.norm(fp32[k])
    print(f'bf16 relative error {k}: {rel:.2e}')
    assert 0 < rel <= 2e-2, (k, rel)
  scale = float(np.exp(model.logit_scale[...]))
  cos_err = np.abs(bf16['logits'] - fp32['logits']).max() / scale
  rel = np.linalg.norm(bf16['logits'] - fp32['logits']) / np.linalg.norm(fp32['logits'])
  print(f'bf16 logits: max cosine error {cos_err:.2e}, relative L2 {rel:.2e}')
  assert 0 < cos_err <= 2e-2, cos_err


def test_token_outputs_before_pooling(tiny_clip, converted_hf):
  model = load(converted_hf)
  images, tokens = tiny_clip['images'], tiny_clip['tokens']
  embedding, image_tokens = model.encode_image(images, return_tokens=True)
  cfg = model.cfg
  assert image_tokens.shape == (len(images), cfg.num_image_tokens, cfg.vision_width)
  np.testing.assert_allclose(model.visual.pool(image_tokens[:, 0]), embedding, atol=1e-6)
  text_embedding, states = model.encode_text(tokens, return_tokens=True)
  assert states.shape == (len(tokens), tokens.shape[1], cfg.text_width)
  np.testing.assert_allclose(model.text.pool(states, tokens), text_embedding, atol=1e-6)


def test_jit_matches_eager(tiny_clip, converted_hf):
  model = load(converted_hf)
  images = tiny_clip['images']
  jitted = nnx.jit(lambda m, x: m.encode_image(x))(model, images)
  np.testing.assert_allclose(jitted, model.encode_image(images), atol=TOL)


def test_wrong_image_size_is_a_clear_error(converted_hf):
  model = load(converted_hf)
  with pytest.raises(ValueError, match='--image_size'):
    model.encode_image(np.zeros((1, 48, 48, 3), np.float32))


# OpenAI's released parameter counts (the CLIP README's notebook prints them).
@pytest.mark.parametrize('name,count', [('ViT-B/32', 151_277_313), ('ViT-B/16', 149_620_737),
                                        ('ViT-L/14', 427_616_513),
                                        ('ViT-L/14@336', 427_944_193)])
@pytest.mark.slow
def test_presets_have_openai_parameter_counts(name, count):
  abstract = nnx.eval_shape(lambda: CLIP(get_preset(name), rngs=nnx.Rngs(0)))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == count


def test_preset_aliases():
  assert get_preset('B16') == get_preset('ViT-B/16')
  with pytest.raises(ValueError, match='ViT-B/32'):
    get_preset('ViT-H/14')


def test_config_json_is_readable(converted_hf):
  meta = json.loads((converted_hf / 'config.json').read_text())
  assert meta['kind'] == 'clip' and meta['source']['layout'] == 'hf'
  assert meta['config']['vision_layers'] == 2 and meta['config']['image_size'] == torch_clip.IMAGE


def test_model_directory_can_move(converted_hf, tmp_path, tiny_clip):
  moved = tmp_path / 'moved'
  shutil.copytree(converted_hf, moved)
  np.testing.assert_array_equal(load(moved).encode_image(tiny_clip['images']),
                                load(converted_hf).encode_image(tiny_clip['images']))
