"""Temporal heads: what turns per-frame ViT tokens into per-frame class tokens that know the clip.

  kmt, kmct, joint, pipeline  temporal embedding, then pre-LN blocks over all T·L tokens of a clip
                              under that Kronecker mask (see kronecker.py)
  cls_only                    temporal embedding, then the same blocks over the T class tokens only
  mean                        no head: per-frame CLIP embeddings are averaged (the CLIP-Mean baseline)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models.clip import ResidualBlock
from claver_jax.models.kronecker import kronecker_mask

TEMPORAL_KINDS = ('kmt', 'kmct', 'joint', 'pipeline', 'cls_only', 'mean')


class TemporalTransformer(nnx.Module):
  """tokens [B, T, L, D] -> class tokens [B, T, D], attending across frames."""

  def __init__(self, kind: str, num_frames: int, width: int, layers: int, heads: int, *,
               activation: str = 'quick_gelu', layer_norm_eps: float = 1e-5, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if kind not in TEMPORAL_KINDS or kind == 'mean':
      raise ValueError(f'TemporalTransformer kind must be one of {TEMPORAL_KINDS[:-1]}; got {kind!r}.')
    self.kind = kind
    self.num_frames = num_frames
    self.temporal_embedding = nnx.Param(
        jax.nn.initializers.truncated_normal(0.02)(rngs.params(), (num_frames, width)))
    self.blocks = nnx.List([
        ResidualBlock(width, heads, 4 * width, activation=activation,
                      layer_norm_eps=layer_norm_eps, depth=layers, dtype=dtype, rngs=rngs)
        for _ in range(layers)
    ])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t, l, d = tokens.shape
    if t != self.num_frames:
      raise ValueError(f'The clip has {t} frames but the temporal embedding has '
                       f'{self.num_frames}; load the checkpoint with num_frames={t} to resample it.')
    x = tokens + self.temporal_embedding[...].astype(tokens.dtype)[None, :, None, :]
    if self.kind == 'cls_only':
      x, mask = x[:, :, 0], None                                    # [B, T, D], full attention
    else:
      x = x.reshape(b, t * l, d)                                    # frame-major: t·L + l
      mask = kronecker_mask(self.kind, t, l)[None, None]            # [1, 1, TL, TL]
    for block in self.blocks:
      x = block(x, mask=mask)
    return x if self.kind == 'cls_only' else x.reshape(b, t, l, d)[:, :, 0]
