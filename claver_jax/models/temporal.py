"""Temporal heads: what turns per-frame ViT tokens into per-frame class tokens that know the clip.

  kmt, kmct, joint  temporal embedding, then pre-LN blocks over all T·L tokens of a clip under that
                    Kronecker mask (kronecker.py; `attention` picks dense or chunked attention)
  pipeline          the same blocks, each of the L spatial positions a sequence of its T tokens
                    (the pipeline mask, computed as [B·L, T] attention without a mask)
  cls_only          temporal embedding, then the same blocks over the T class tokens only
  mean              no head: per-frame CLIP embeddings are averaged (the CLIP-Mean baseline)

The blocks are clip.py's ResidualBlocks (the same parameters, `set_remat` applies); for the
Kronecker kinds their attention goes through `kronecker_attention`. They start as the official
ones do, at PyTorch's defaults (`init_like_pytorch`), the temporal embedding at a normal of std
0.02.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models.clip import ResidualBlock, torch_linear_default
from claver_jax.models.kronecker import ATTENTION_IMPLEMENTATIONS, kronecker_attention

TEMPORAL_KINDS = ('kmt', 'kmct', 'joint', 'pipeline', 'cls_only', 'mean')


class TemporalTransformer(nnx.Module):
  """tokens [B, T, L, D] -> class tokens [B, T, D], attending across frames."""

  def __init__(self, kind: str, num_frames: int, width: int, layers: int, heads: int, *,
               attention: str = 'auto', activation: str = 'quick_gelu',
               layer_norm_eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in TEMPORAL_KINDS or kind == 'mean':
      raise ValueError(f'TemporalTransformer kind must be one of {TEMPORAL_KINDS[:-1]}; got {kind!r}.')
    if attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'attention={attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.')
    self.kind = kind
    self.attention = attention
    self.num_frames = num_frames
    # timm's trunc_normal_(std=0.02) with its default bounds (+-2, absolute): never reached.
    self.temporal_embedding = nnx.Param(
        jax.nn.initializers.normal(0.02)(rngs.params(), (num_frames, width)))
    self.blocks = nnx.List([
        ResidualBlock(width, heads, 4 * width, activation=activation,
                      layer_norm_eps=layer_norm_eps, depth=layers, dtype=dtype, rngs=rngs)
        for _ in range(layers)
    ])
    for block in self.blocks:
      init_like_pytorch(block, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t, l, d = tokens.shape
    if t != self.num_frames:
      raise ValueError(f'The clip has {t} frames but the temporal embedding has '
                       f'{self.num_frames}; load the checkpoint with num_frames={t} to resample it.')
    x = tokens + self.temporal_embedding[...].astype(tokens.dtype)[None, :, None, :]
    if self.kind == 'cls_only':
      x = x[:, :, 0]                                                # [B, T, D], full attention
      for block in self.blocks:
        x = block(x)
      return x
    if self.kind == 'pipeline':
      x = x.transpose(0, 2, 1, 3).reshape(b * l, t, d)              # [B·L, T, D], no mask
      for block in self.blocks:
        x = block(x)
      return x.reshape(b, l, t, d)[:, 0]
    x = x.reshape(b, t * l, d)                                      # frame-major: t·L + l
    attend = functools.partial(kronecker_attention, kind=self.kind, num_frames=t,
                               implementation=self.attention)
    for block in self.blocks:
      if block.remat:
        x = nnx.remat(lambda block, x: _block_forward(block, x, attend))(block, x)
      else:
        x = _block_forward(block, x, attend)
    return x.reshape(b, t, l, d)[:, :, 0]


def init_like_pytorch(block: ResidualBlock, rngs: nnx.Rngs) -> None:
  """The official temporal blocks' start: PyTorch's defaults, which nothing there overrides
  (CLIP's `initialize_parameters` reaches the text tower only). nn.MultiheadAttention: packed
  q/k/v Xavier-uniform, out_proj U(±1/sqrt(D)), both biases 0; each nn.Linear of the MLP
  U(±1/sqrt(fan_in)) for kernel and bias; LayerNorms 1 and 0 (already nnx's)."""
  attn, mlp = block.attn, block.mlp
  width, hidden = attn.out.kernel.shape[0], mlp.c_proj.kernel.shape[0]
  attn.qkv.kernel[...] = jax.nn.initializers.xavier_uniform()(rngs.params(),
                                                              attn.qkv.kernel.shape)
  attn.qkv.bias[...] = jnp.zeros(attn.qkv.bias.shape)
  attn.out.kernel[...] = torch_linear_default(width)(rngs.params(), attn.out.kernel.shape)
  attn.out.bias[...] = jnp.zeros(attn.out.bias.shape)
  for linear, fan_in in ((mlp.c_fc, width), (mlp.c_proj, hidden)):
    linear.kernel[...] = torch_linear_default(fan_in)(rngs.params(), linear.kernel.shape)
    linear.bias[...] = torch_linear_default(fan_in)(rngs.params(), linear.bias.shape)


def _block_forward(block: ResidualBlock, x: jax.Array, attend: Callable) -> jax.Array:
  """`block` on x [B, S, D] with its attention computed by attend(q, k, v [B, S, H, Dh])."""
  b, s, d = x.shape
  heads = block.attn.heads
  qkv = block.attn.qkv(block.ln_1(x)).reshape(b, s, 3, heads, d // heads)
  y = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  x = x + block.attn.out(y.reshape(b, s, d))
  return x + block.mlp(block.ln_2(x))
