"""Motion prompts on frozen CLIP towers, after "Seeing in Flowing" (SiF: Du et al., ACM MM 2023,
arXiv 2308.04828). A reconstruction: SiF's code and full text are not public, only its abstract
and reviews, which name three blocks (two-stream motion modelling, motion-aware prompts,
multimodal communication). Every design choice below is ours (README: Motion prompts).

    >>> model = MotionPrompts(MotionPromptsConfig(clip=get_preset('ViT-B/16'), num_frames=8),
    ...                       rngs=nnx.Rngs(0))
    >>> model.encode_video(video)       # float32 [B, T, H, W, 3], normalised -> [B, E]
    >>> model.encode_text(tokens)       # int32 [N, context] -> [N, E], CLIP's, not normalised
    >>> model.logits(video, tokens)     # [B, N], against the per-video texts

E is CLIP's embed dim, T the frames, f [B, T, E] the frozen image tower's L2-normalised per-frame
embeddings (no gradient flows into them).
  motion         Short-term stream: adjacent differences f[t+1] - f[t] (0 after the last frame)
                 through a depthwise temporal convolution (kernel 3) and an MLP. Long-term stream:
                 differences to the clip mean f[t] - mean(f), or over a stride of T/2
                 (f[t + T/2] - f[t], 0 past the end), through an MLP. Spatial stream: f + a
                 temporal position embedding. Fused by a sum (or concatenation + linear), then
                 pre-LN transformer blocks over T: the motion tokens [B, T, E]; their mean over T
                 is the video embedding [B, E].
  prompts        n learnt queries cross-attend to the motion tokens: the motion prompts [B, n, E].
                 Each L2-normalised class text attends to its video's prompts (X-CLIP's prompt
                 generator, one layer); the result, through a learnt gate [E] initialised small,
                 is added to it: per-video texts [B, C, E].
  communication  one cross-attention each way, with residuals: the video embedding attends to
                 its C per-video texts and each text to the video embedding.
  logits         exp(logit_scale) <normalised video embedding, normalised per-video text>; the
                 logit scale is CLIP's, frozen with the towers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models.clip import (CLIP, MLP, CLIPConfig, ResidualBlock, check_known_fields,
                                    l2_normalize)
from claver_jax.models.xclip import CrossAttention, PromptGenerator, init_like_official

LONG_TERM = ('mean', 'stride')
FUSIONS = ('sum', 'concat')
STREAMS = ('spatial', 'short', 'long')


@dataclasses.dataclass(frozen=True)
class MotionPromptsConfig:
  """clip: the (frozen) towers. num_frames: T, the rows of the temporal position embedding.
  layers, heads: the motion transformer (heads None = embed_dim // 64, 1 where 64 does not
  divide); the prompts and the communication use the same heads. long_term: 'mean' | 'stride'.
  fusion: 'sum' | 'concat'. num_prompts: n learnt queries. prompt_gate: the initial value of the
  gate [E] on the prompts added to the texts."""
  clip: CLIPConfig = CLIPConfig()
  num_frames: int = 8
  layers: int = 1
  heads: int | None = None
  long_term: str = 'mean'
  fusion: str = 'sum'
  num_prompts: int = 8
  prompt_gate: float = 0.1

  def __post_init__(self):
    if isinstance(self.clip, dict):
      object.__setattr__(self, 'clip', CLIPConfig.from_dict(self.clip))
    problems = []
    for name in ('num_frames', 'layers', 'num_prompts'):
      if getattr(self, name) < 1:
        problems.append(f'{name}={getattr(self, name)} must be at least 1')
    if self.heads is not None and (self.heads < 1 or self.clip.embed_dim % self.heads):
      problems.append(f'heads={self.heads} must be at least 1 and divide the embed dim '
                      f'{self.clip.embed_dim}')
    if self.long_term not in LONG_TERM:
      problems.append(f'long_term={self.long_term!r} (choose one of {LONG_TERM})')
    if self.fusion not in FUSIONS:
      problems.append(f'fusion={self.fusion!r} (choose one of {FUSIONS})')
    if problems:
      raise ValueError('Invalid MotionPromptsConfig: ' + '; '.join(problems) + '.')

  @property
  def num_heads(self) -> int:
    e = self.clip.embed_dim
    return self.heads or (e // 64 if e % 64 == 0 else 1)

  @property
  def summary(self) -> str:
    """What the model adds to its CLIP, in words (for reports)."""
    return (f'{self.layers} motion layers ({self.long_term} long-term, {self.fusion} fusion), '
            f'{self.num_prompts} motion prompts')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> MotionPromptsConfig:
    check_known_fields(cls, d)
    return cls(**{**d, 'clip': CLIPConfig.from_dict(d['clip'])})


def _shift_difference(frames: jax.Array, stride: int) -> jax.Array:
  """[B, T, E] -> f[t + stride] - f[t], zero where t + stride is past the last frame."""
  t = frames.shape[1]
  if stride >= t:
    return jnp.zeros_like(frames)
  ahead = frames[:, stride:] - frames[:, :t - stride]
  return jnp.concatenate([ahead, jnp.zeros_like(frames[:, :stride])], axis=1)


# ---------------------------------------------------------------------------------------------
# Two-stream motion modelling
# ---------------------------------------------------------------------------------------------
class MotionModelling(nnx.Module):
  """Per-frame embeddings f [B, T, E] -> motion tokens [B, T, E] (streams, fusion, blocks)."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, e = cfg.clip, cfg.clip.embed_dim
    self.num_frames = cfg.num_frames
    self.long_term = cfg.long_term
    self.positional_embedding = nnx.Param(
        jax.nn.initializers.truncated_normal(0.02)(rngs.params(), (cfg.num_frames, e)))
    self.short_conv = nnx.Conv(e, e, (3,), padding='SAME', feature_group_count=e, rngs=rngs)
    mlp = dict(activation=c.activation, fc_std=e ** -0.5, proj_std=0.02, dtype=jnp.float32,
               rngs=rngs)
    self.short_mlp = MLP(e, e // 2, **mlp)
    self.long_mlp = MLP(e, e // 2, **mlp)
    self.fuse = nnx.Linear(3 * e, e, rngs=rngs) if cfg.fusion == 'concat' else None
    self.blocks = nnx.List([
        ResidualBlock(e, cfg.num_heads, 2 * e, activation=c.activation,
                      layer_norm_eps=c.layer_norm_eps, depth=cfg.layers, rngs=rngs)
        for _ in range(cfg.layers)
    ])

  def streams(self, frames: jax.Array) -> dict[str, jax.Array]:
    """f [B, T, E] -> {'spatial', 'short', 'long'}, each [B, T, E]."""
    t = frames.shape[1]
    if t != self.num_frames:
      raise ValueError(f'The clip has {t} frames but the temporal position embedding has '
                       f'{self.num_frames}; load the checkpoint with num_frames={t} to resample '
                       'it.')
    short = self.short_mlp(self.short_conv(_shift_difference(frames, 1)))
    if self.long_term == 'mean':
      long = frames - frames.mean(axis=1, keepdims=True)
    else:
      long = _shift_difference(frames, max(t // 2, 1))
    return {'spatial': frames + self.positional_embedding[...], 'short': short,
            'long': self.long_mlp(long)}

  def fuse_streams(self, streams: dict[str, jax.Array]) -> jax.Array:
    """The three streams -> [B, T, E]: their sum, or a linear map of their concatenation."""
    if self.fuse is None:
      return streams['spatial'] + streams['short'] + streams['long']
    return self.fuse(jnp.concatenate([streams[s] for s in STREAMS], axis=-1))

  def tokens(self, fused: jax.Array) -> jax.Array:
    """Fused streams [B, T, E] -> motion tokens [B, T, E] (the transformer over T)."""
    for block in self.blocks:
      fused = block(fused)
    return fused

  def __call__(self, frames: jax.Array) -> jax.Array:
    return self.tokens(self.fuse_streams(self.streams(frames)))


# ---------------------------------------------------------------------------------------------
# Motion-aware prompts
# ---------------------------------------------------------------------------------------------
class MotionAwarePrompts(nnx.Module):
  """Motion tokens -> n motion prompts (learnt queries cross-attend to them); class texts ->
  per-video texts (each text attends to the prompts, through a gate initialised small)."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, e = cfg.clip, cfg.clip.embed_dim
    self.queries = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_prompts, e)))
    self.query_norm = nnx.LayerNorm(e, epsilon=c.layer_norm_eps, rngs=rngs)
    self.motion_norm = nnx.LayerNorm(e, epsilon=c.layer_norm_eps, rngs=rngs)
    self.cross_attn = CrossAttention(e, cfg.num_heads, rngs=rngs)
    init_like_official(self.cross_attn, rngs)
    self.generator = PromptGenerator(e, 1, cfg.num_heads, cfg.prompt_gate, mlp_dim=e,
                                     activation=c.activation, layer_norm_eps=c.layer_norm_eps,
                                     rngs=rngs)

  def learn(self, motion: jax.Array) -> jax.Array:
    """Motion tokens [B, T, E] -> motion prompts [B, n, E]."""
    queries = jnp.broadcast_to(self.queries[...], (motion.shape[0], *self.queries.shape))
    return queries + self.cross_attn(self.query_norm(queries), self.motion_norm(motion))

  def __call__(self, texts: jax.Array, prompts: jax.Array) -> jax.Array:
    """Texts [B, N, E], motion prompts [B, n, E] -> per-video texts [B, N, E]."""
    return texts + self.generator(texts, prompts)


# ---------------------------------------------------------------------------------------------
# Multimodal communication
# ---------------------------------------------------------------------------------------------
class MultimodalCommunication(nnx.Module):
  """The video embedding [G, E] and its texts [G, C, E] attend to each other once, at the same
  time, with residuals."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, e = cfg.clip, cfg.clip.embed_dim
    self.video_norm = nnx.LayerNorm(e, epsilon=c.layer_norm_eps, rngs=rngs)
    self.text_norm = nnx.LayerNorm(e, epsilon=c.layer_norm_eps, rngs=rngs)
    self.video_cross_attn = CrossAttention(e, cfg.num_heads, rngs=rngs)   # video asks the texts
    self.text_cross_attn = CrossAttention(e, cfg.num_heads, rngs=rngs)    # texts ask the video
    init_like_official(self, rngs)

  def __call__(self, video: jax.Array, texts: jax.Array) -> tuple[jax.Array, jax.Array]:
    v, t = self.video_norm(video)[:, None], self.text_norm(texts)
    return video + self.video_cross_attn(v, t)[:, 0], texts + self.text_cross_attn(t, v)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class MotionPrompts(nnx.Module):
  """The video-text model family interface (see models/families.py) for motion prompts."""

  def __init__(self, cfg: MotionPromptsConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.clip = CLIP(cfg.clip, dtype=dtype, rngs=rngs)
    self.motion = MotionModelling(cfg, rngs=rngs)
    self.prompts = MotionAwarePrompts(cfg, rngs=rngs)
    self.communication = MultimodalCommunication(cfg, rngs=rngs)

  def frame_embeddings(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> f [B, T, E]: the frozen image tower's L2-normalised frame embeddings,
    with no gradient."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f'video must be [B, T, H, W, 3]; got shape {video.shape}.')
    b, t = video.shape[:2]
    frames = self.clip.visual(video.reshape(b * t, *video.shape[2:])).reshape(b, t, -1)
    return jax.lax.stop_gradient(l2_normalize(frames))

  def encode_video(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> [B, E]: the mean of the motion tokens, before the communication with
    any text; not normalised."""
    return self.motion(self.frame_embeddings(video)).mean(axis=1)

  def video_features(self, video: jax.Array) -> dict[str, jax.Array]:
    """-> {'video': [B, E], 'prompts': [B, n, E]}: what `class_logits` needs of a video."""
    motion = self.motion(self.frame_embeddings(video))
    return {'video': motion.mean(axis=1), 'prompts': self.prompts.learn(motion)}

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[N, context] -> [N, E], projected, not normalised."""
    return self.clip.encode_text(tokens)

  def class_logits(self, features: dict[str, jax.Array], text: jax.Array) -> jax.Array:
    """features of B videos, text [A, C, E] (A description sets of C classes, not normalised)
    -> [A, B, C]: the per-video texts and the video embedding communicate within each set, then
    exp(logit_scale) * cosine."""
    video, prompts = features['video'], features['prompts']
    (a, c, e), b = text.shape, video.shape[0]
    texts = jnp.broadcast_to(l2_normalize(text).reshape(1, a * c, e), (b, a * c, e))
    texts = self.prompts(texts, prompts).reshape(b * a, c, e)
    video, texts = self.communication(jnp.repeat(video, a, axis=0), texts)
    video, texts = l2_normalize(video).reshape(b, a, e), l2_normalize(texts).reshape(b, a, c, e)
    return jnp.exp(self.clip.logit_scale[...]) * jnp.einsum('bae,bace->abc', video, texts)

  def logits(self, video: jax.Array, tokens: jax.Array) -> jax.Array:
    """-> [B, N]: every video against every text, the texts made for that video."""
    return self.class_logits(self.video_features(video), self.encode_text(tokens)[None])[0]


def motion_prompts_from_clip(clip: CLIP, cfg: MotionPromptsConfig, *, dtype=jnp.float32,
                             rngs: nnx.Rngs) -> MotionPrompts:
  """Motion prompts on `clip`'s towers and logit scale, the new parts fresh."""
  if clip.cfg != cfg.clip:
    raise ValueError(f'The CLIP weights are for {clip.cfg} but the motion-prompts config has '
                     f'{cfg.clip}.')
  model = MotionPrompts(cfg, dtype=dtype, rngs=rngs)
  nnx.update(model.clip, nnx.state(clip, nnx.Param))
  return model
