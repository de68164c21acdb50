"""The faster formulations in models/clip.py equal the plain ones they replace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax.models import kronecker_mask
from claver_jax.models.clip import (CLIPConfig, ResidualBlock, TextTransformer, VisionTransformer,
                                    attention)


@pytest.mark.parametrize('masking', ['none', 'causal', 'mask', 'mask+causal'])
@pytest.mark.slow
def test_attention_equals_jax_dot_product_attention(masking):
  b, s, h, d = 2, 7, 3, 8
  q, k, v = jax.random.normal(jax.random.key(0), (3, b, s, h, d))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (b, 1, s, s)) | jnp.eye(s, dtype=bool)
  kwargs = {'mask': mask if 'mask' in masking else None, 'is_causal': 'causal' in masking}
  expected = jax.nn.dot_product_attention(q, k, v, **kwargs)                # [B, S, H, D]
  heads_major = lambda x: x.transpose(0, 2, 1, 3)
  got = heads_major(attention(heads_major(q), heads_major(k), heads_major(v), **kwargs))
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.slow
def test_patch_embedding_equals_the_convolution():
  """Odd sizes: 7-pixel patches on a 3x3 grid, 10 channels."""
  cfg = CLIPConfig(image_size=21, patch_size=7, vision_width=10, vision_heads=2)
  visual = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(2), (3, 21, 21, 3))
  convolved = visual.conv1(images)                                           # [N, 3, 3, 10]
  np.testing.assert_allclose(visual.embed_patches(images), convolved.reshape(3, 9, 10),
                             atol=1e-5)


def tiny_text(pooling: str) -> tuple[TextTransformer, jax.Array]:
  cfg = CLIPConfig(context_length=9, vocab_size=50, text_width=32, text_layers=2, text_heads=2,
                   text_mlp_dim=48, eos_token_id=49, text_pooling=pooling)
  tokens = np.random.default_rng(0).integers(1, 48, (4, 9)).astype(np.int32)
  for row, length in enumerate([1, 9, 4, 6]):               # End of text first, last, between.
    tokens[row, length - 1], tokens[row, length:] = 49, 0
  return TextTransformer(cfg, rngs=nnx.Rngs(0)), jnp.asarray(tokens)


@pytest.mark.parametrize('pooling', ['argmax', 'first_eos'])
@pytest.mark.slow
def test_text_tower_pools_before_its_last_block(pooling):
  text, tokens = tiny_text(pooling)
  full = lambda m: m.pool(m.encode_tokens(tokens), tokens)
  np.testing.assert_allclose(nnx.jit(lambda m: m(tokens))(text), nnx.jit(full)(text), atol=1e-6)
  # Training differentiates the short path: its gradients are the full path's.
  grads = [nnx.jit(nnx.grad(lambda m, f=f: (f(m) ** 2).sum()))(text)
           for f in (lambda m: m(tokens), full)]
  for got, expected in zip(*(jax.tree.leaves(nnx.to_pure_dict(g)) for g in grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.slow
def test_block_at_positions_gives_the_rows_of_the_block(remat):
  """Under a Kronecker mask (T = 3 frames of L = 4 tokens), the rows of each frame's first token."""
  block = ResidualBlock(16, 2, 32, rngs=nnx.Rngs(0))
  block.remat = remat
  x = jax.random.normal(jax.random.key(3), (2, 12, 16))
  mask = jnp.asarray(kronecker_mask('kmct', 3, 4))
  positions = jnp.array([[0, 4, 8], [0, 4, 8]])
  expected = block(x, mask=mask)[:, positions[0]]
  got = block.at_positions(x, positions, mask=mask[positions[0]][None, None])
  np.testing.assert_allclose(got, expected, atol=1e-6)
