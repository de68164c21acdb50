"""CLAVER: CLIP's towers plus a Kronecker-mask temporal transformer over every frame token.

    >>> model = CLAVER(CLAVERConfig(clip=get_preset('ViT-B/16'), num_frames=8), rngs=nnx.Rngs(0))
    >>> model.encode_video(video)       # float32 [B, T, H, W, 3], normalised -> [B, embed_dim]
    >>> model.encode_text(tokens)       # int32 [N, context] -> [N, embed_dim], projected
    >>> model.logits(video, tokens)     # [B, N], exp(logit_scale) * <video, normalised text>

The video encoder: the ViT encodes the B·T frames (all L tokens, before `ln_post`); a temporal head
(temporal.py) turns them into one class token per frame; each goes through `ln_post` and `proj`
and is L2-normalised; the video embedding is their mean over T, not re-normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from claver_jax.models.clip import (CLIP, FINAL_PRECISION, CLIPConfig, check_known_fields,
                                    l2_normalize, logit_scale_factor)
from claver_jax.models.kronecker import ATTENTION_IMPLEMENTATIONS
from claver_jax.models.temporal import TEMPORAL_KINDS, TemporalTransformer


@dataclasses.dataclass(frozen=True)
class CLAVERConfig:
  """clip: the towers. temporal: one of TEMPORAL_KINDS. temporal_layers: None = vision_layers // 3.
  temporal_heads: None = the paper's vision_width / 64 (the ViT's own count for widths that 64
  does not divide). attention: how the Kronecker attention is computed, 'dense' | 'chunked' |
  'auto' (kronecker.py); the same parameters and results, other memory and time."""
  clip: CLIPConfig = CLIPConfig()
  num_frames: int = 8
  temporal: str = 'kmt'
  temporal_layers: int | None = None
  temporal_heads: int | None = None
  attention: str = 'auto'

  def __post_init__(self):
    if isinstance(self.clip, dict):
      object.__setattr__(self, 'clip', CLIPConfig.from_dict(self.clip))
    if self.temporal not in TEMPORAL_KINDS:
      raise ValueError(f'temporal={self.temporal!r}; choose one of {TEMPORAL_KINDS}.')
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'attention={self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.')
    if self.num_frames < 1:
      raise ValueError(f'num_frames={self.num_frames} must be at least 1.')
    if self.temporal_heads is not None and (
        self.temporal_heads < 1 or self.clip.vision_width % self.temporal_heads):
      raise ValueError(f'temporal_heads={self.temporal_heads} must be at least 1 and divide the '
                       f'vision width {self.clip.vision_width}.')
    if self.temporal != 'mean' and self.temporal_depth < 1:
      raise ValueError(
          f'The temporal transformer would have {self.temporal_depth} layers (vision_layers '
          f'{self.clip.vision_layers} // 3); set temporal_layers to at least 1.')

  @property
  def temporal_depth(self) -> int:
    """The paper's default is a third of the ViT's depth; its ablation also uses 1 and 1/6."""
    if self.temporal == 'mean':
      return 0
    return self.temporal_layers if self.temporal_layers is not None else self.clip.vision_layers // 3

  @property
  def summary(self) -> str:
    """What the model adds to its CLIP, in words (for reports)."""
    return f'temporal {self.temporal} ({self.temporal_depth} layers)'

  @property
  def temporal_num_heads(self) -> int:
    if self.temporal_heads is not None:
      return self.temporal_heads
    width = self.clip.vision_width
    return width // 64 if width % 64 == 0 else self.clip.vision_heads

  def to_dict(self) -> dict[str, Any]:
    return {'clip': self.clip.to_dict(), 'num_frames': self.num_frames,
            'temporal': self.temporal, 'temporal_layers': self.temporal_layers,
            'temporal_heads': self.temporal_heads, 'attention': self.attention}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLAVERConfig:
    """Fields a directory lacks take their defaults (one written before `attention`: 'auto')."""
    check_known_fields(cls, d)
    return cls(**{**d, 'clip': CLIPConfig.from_dict(d['clip'])})


class CLAVER(nnx.Module):

  def __init__(self, cfg: CLAVERConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.clip = CLIP(cfg.clip, dtype=dtype, rngs=rngs)
    c = cfg.clip
    self.temporal = None if cfg.temporal == 'mean' else TemporalTransformer(
        cfg.temporal, cfg.num_frames, c.vision_width, cfg.temporal_depth, cfg.temporal_num_heads,
        attention=cfg.attention, activation=c.activation, layer_norm_eps=c.layer_norm_eps,
        dtype=dtype, rngs=rngs)

  def encode_frames(self, video: jax.Array) -> jax.Array:
    """[B, T, S, S, 3] (T = cfg.num_frames, S = the image size) -> [B, T, embed_dim]:
    L2-normalised per-frame embeddings."""
    size, frames = self.cfg.clip.image_size, self.cfg.num_frames
    chex.assert_shape(video, (None, frames, size, size, 3), custom_message=(
        f'the model takes clips of {frames} frames of {size}x{size}x3; for another frame count, '
        f'load the checkpoint with num_frames=T to resample its temporal embedding'))
    b, t = video.shape[:2]
    tokens = self.clip.visual.encode_tokens(video.reshape(b * t, *video.shape[2:]))
    tokens = tokens.reshape(b, t, *tokens.shape[1:])              # [B, T, L, D]
    cls = tokens[:, :, 0] if self.temporal is None else self.temporal(tokens)
    return l2_normalize(self.clip.visual.pool(cls))

  def encode_video(self, video: jax.Array) -> jax.Array:
    """[B, T, S, S, 3] -> [B, embed_dim]: the mean over T of normalised frame embeddings."""
    return self.encode_frames(video).mean(axis=1)

  def video_features(self, video: jax.Array) -> jax.Array:
    """What `class_logits` needs of a video: its embedding [B, embed_dim]."""
    return self.encode_video(video)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[N, context] -> [N, embed_dim], projected, not normalised."""
    return self.clip.encode_text(tokens)

  def class_logits(self, features: jax.Array, text: jax.Array) -> jax.Array:
    """Video embeddings [B, E], text [A, C, E] (A description sets of C classes, not
    normalised) -> [A, B, C]: exp(logit_scale) * <video, normalised text>."""
    return logit_scale_factor(self.clip.logit_scale[...]) * jnp.einsum(
        'be,ace->abc', features, l2_normalize(text), precision=FINAL_PRECISION)

  def logits(self, video: jax.Array, tokens: jax.Array) -> jax.Array:
    """-> [B, N]: exp(logit_scale) * <video embedding, normalised text embedding>."""
    return self.class_logits(self.video_features(video), self.encode_text(tokens)[None])[0]


def claver_from_clip(clip: CLIP, cfg: CLAVERConfig, *, dtype=jnp.float32,
                     rngs: nnx.Rngs) -> CLAVER:
  """A CLAVER whose towers are `clip`'s weights and whose temporal parts are fresh."""
  if clip.cfg != cfg.clip:
    raise ValueError(f'The CLIP weights are for {clip.cfg} but the CLAVER config has {cfg.clip}.')
  model = CLAVER(cfg, dtype=dtype, rngs=rngs)
  nnx.update(model.clip, nnx.state(clip, nnx.Param))
  return model


def config_for_run(clip: CLIPConfig, config: ml_collections.ConfigDict) -> CLAVERConfig:
  """The CLAVERConfig a run config describes, on the towers `clip` (CLAVER's keys are
  config.model's own: temporal, temporal_layers, temporal_heads, attention)."""
  return CLAVERConfig(clip=clip, num_frames=config.data.num_frames,
                      temporal=config.model.temporal,
                      temporal_layers=config.model.get('temporal_layers'),
                      temporal_heads=config.model.get('temporal_heads'),
                      attention=config.model.get('attention', 'auto'))
