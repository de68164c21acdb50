"""Motion prompts on frozen CLIP towers, after "Seeing in Flowing" (SiF: Du et al., ACM MM 2023,
arXiv 2308.04828). A reconstruction: SiF's code and full text are not public, only its abstract
and reviews, which name three blocks (two-stream motion modelling, motion-aware prompts,
multimodal communication). Every design choice below is ours (docs/models.md: Motion prompts).

    >>> model = MotionPrompts(MotionPromptsConfig(clip=get_preset('ViT-B/16'), num_frames=8),
    ...                       rngs=nnx.Rngs(0))
    >>> model.encode_video(video)       # float32 [B, T, H, W, 3], normalised -> [B, E]
    >>> model.encode_text(tokens)       # int32 [N, context] -> [N, E], CLIP's, not normalised
    >>> model.logits(video, tokens)     # [B, N], against the per-video texts

E is CLIP's embed dim, T the frames, f [B, T, E] the frozen image tower's L2-normalised per-frame
embeddings (no gradient flows into them), d the width of the new parts (E / 4 by default: that
keeps them within 5% of the towers' parameters at every size, the demo's included). `down`
(E -> d) brings frames and texts to the width; linear maps d -> E bring results back.
  motion         x = down(f) [B, T, d]. Short-term stream: adjacent differences x[t+1] - x[t]
                 (0 after the last frame) through a depthwise temporal convolution (kernel 3) and
                 an MLP. Long-term stream: differences to the clip mean x[t] - mean(x), or over a
                 stride of T/2 (x[t + T/2] - x[t], 0 past the end), through an MLP. Spatial
                 stream: x + a temporal position embedding. Fused by a sum (or concatenation +
                 linear), then pre-LN transformer blocks over T: the motion tokens [B, T, d].
                 The video embedding [B, E] is the mean of f (CLIP-Mean's) plus up(the mean
                 motion token).
  prompts        n learnt queries cross-attend to the motion tokens: the motion prompts [B, n, d].
                 Each L2-normalised class text, brought to the width, attends to its video's
                 prompts (X-CLIP's prompt generator, one layer, with its gate [d] initialised
                 small); the result, brought to E, is added to it: per-video texts [B, C, E].
  communication  one cross-attention each way at the width: the video embedding attends to its
                 C per-video texts and each text to the video embedding; the results, brought to
                 E, are added to them.
  logits         exp(logit_scale) <normalised video embedding, normalised per-video text>; the
                 logit scale is CLIP's, frozen with the towers.
Every map back to E starts at zero, so a fresh model has the cosines of CLIP-Mean with the same
towers: what the towers know zero-shot is where training starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models.clip import (CLIP, FINAL_PRECISION, MLP, CLIPConfig, ResidualBlock,
                                    check_known_fields, l2_normalize, logit_scale_factor)
from claver_jax.models.xclip import CrossAttention, PromptGenerator, init_like_official

LONG_TERM = ('mean', 'stride')
FUSIONS = ('sum', 'concat')
STREAMS = ('spatial', 'short', 'long')


@dataclasses.dataclass(frozen=True)
class MotionPromptsConfig:
  """clip: the (frozen) towers. num_frames: T, the rows of the temporal position embedding.
  width: d, the width of the new parts (None: embed_dim // 4); they meet CLIP's embed dim E
  through linear maps. layers, heads: the motion transformer (heads None = d // 64, 1 where 64
  does not divide); the prompts and the communication use the same heads. long_term: 'mean' |
  'stride'. fusion: 'sum' | 'concat'. num_prompts: n learnt queries. prompt_gate: the initial
  value of the gate [d] on the prompts added to the texts."""
  clip: CLIPConfig = CLIPConfig()
  num_frames: int = 8
  width: int | None = None
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
    if self.width is not None and self.width < 1:
      problems.append(f'width={self.width} must be at least 1')
    if self.heads is not None and (self.heads < 1 or self.num_width % self.heads):
      problems.append(f'heads={self.heads} must be at least 1 and divide the width '
                      f'{self.num_width}')
    if self.long_term not in LONG_TERM:
      problems.append(f'long_term={self.long_term!r} (choose one of {LONG_TERM})')
    if self.fusion not in FUSIONS:
      problems.append(f'fusion={self.fusion!r} (choose one of {FUSIONS})')
    if problems:
      raise ValueError('Invalid MotionPromptsConfig: ' + '; '.join(problems) + '.')

  @property
  def num_width(self) -> int:
    """d: `width`, or embed_dim // 4."""
    return self.width or max(self.clip.embed_dim // 4, 1)

  @property
  def num_heads(self) -> int:
    d = self.num_width
    return self.heads or (d // 64 if d % 64 == 0 else 1)

  @property
  def summary(self) -> str:
    """What the model adds to its CLIP, in words (for reports)."""
    return (f'{self.layers} motion layers of width {self.num_width} ({self.long_term} long-term, '
            f'{self.fusion} fusion), {self.num_prompts} motion prompts')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> MotionPromptsConfig:
    check_known_fields(cls, d)
    return cls(**{**d, 'clip': CLIPConfig.from_dict(d['clip'])})


def _back_to_embed(width: int, embed_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
  """A map d -> E initialised to zero: what it adds to CLIP's embeddings starts at nothing."""
  return nnx.Linear(width, embed_dim, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)


def _shift_difference(frames: jax.Array, stride: int) -> jax.Array:
  """[B, T, d] -> x[t + stride] - x[t], zero where t + stride is past the last frame."""
  t = frames.shape[1]
  if stride >= t:
    return jnp.zeros_like(frames)
  ahead = frames[:, stride:] - frames[:, :t - stride]
  return jnp.concatenate([ahead, jnp.zeros_like(frames[:, :stride])], axis=1)


# ---------------------------------------------------------------------------------------------
# Two-stream motion modelling
# ---------------------------------------------------------------------------------------------
class MotionModelling(nnx.Module):
  """Frame embeddings brought to the width, x [B, T, d] -> motion tokens [B, T, d] (streams,
  fusion, blocks)."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, d = cfg.clip, cfg.num_width
    self.num_frames = cfg.num_frames
    self.long_term = cfg.long_term
    self.positional_embedding = nnx.Param(
        jax.nn.initializers.truncated_normal(0.02)(rngs.params(), (cfg.num_frames, d)))
    self.short_conv = nnx.Conv(d, d, (3,), padding='SAME', feature_group_count=d, rngs=rngs)
    mlp = dict(activation=c.activation, fc_std=d ** -0.5, proj_std=0.02, dtype=jnp.float32,
               rngs=rngs)
    self.short_mlp = MLP(d, d, **mlp)
    self.long_mlp = MLP(d, d, **mlp)
    self.fuse = nnx.Linear(3 * d, d, rngs=rngs) if cfg.fusion == 'concat' else None
    self.blocks = nnx.List([
        ResidualBlock(d, cfg.num_heads, 2 * d, activation=c.activation,
                      layer_norm_eps=c.layer_norm_eps, depth=cfg.layers, rngs=rngs)
        for _ in range(cfg.layers)
    ])

  def streams(self, x: jax.Array) -> dict[str, jax.Array]:
    """x [B, T, d] -> {'spatial', 'short', 'long'}, each [B, T, d]."""
    t = x.shape[1]
    if t != self.num_frames:
      raise ValueError(f'The clip has {t} frames but the temporal position embedding has '
                       f'{self.num_frames}; load the checkpoint with num_frames={t} to resample '
                       'it.')
    short = self.short_mlp(self.short_conv(_shift_difference(x, 1)))
    if self.long_term == 'mean':
      long = x - x.mean(axis=1, keepdims=True)
    else:
      long = _shift_difference(x, max(t // 2, 1))
    return {'spatial': x + self.positional_embedding[...], 'short': short,
            'long': self.long_mlp(long)}

  def fuse_streams(self, streams: dict[str, jax.Array]) -> jax.Array:
    """The three streams -> [B, T, d]: their sum, or a linear map of their concatenation."""
    if self.fuse is None:
      return streams['spatial'] + streams['short'] + streams['long']
    return self.fuse(jnp.concatenate([streams[s] for s in STREAMS], axis=-1))

  def tokens(self, fused: jax.Array) -> jax.Array:
    """Fused streams [B, T, d] -> motion tokens [B, T, d] (the transformer over T)."""
    for block in self.blocks:
      fused = block(fused)
    return fused

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.tokens(self.fuse_streams(self.streams(x)))


# ---------------------------------------------------------------------------------------------
# Motion-aware prompts
# ---------------------------------------------------------------------------------------------
class MotionAwarePrompts(nnx.Module):
  """Motion tokens -> n motion prompts (learnt queries cross-attend to them); class texts ->
  per-video texts (each text attends to its video's prompts; the result, through a gate
  initialised small, is brought to E and added to it)."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, d = cfg.clip, cfg.num_width
    self.queries = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_prompts, d)))
    self.query_norm = nnx.LayerNorm(d, epsilon=c.layer_norm_eps, rngs=rngs)
    self.motion_norm = nnx.LayerNorm(d, epsilon=c.layer_norm_eps, rngs=rngs)
    self.cross_attn = CrossAttention(d, cfg.num_heads, rngs=rngs)
    init_like_official(self.cross_attn, rngs)
    self.generator = PromptGenerator(d, 1, cfg.num_heads, cfg.prompt_gate, mlp_dim=d,
                                     activation=c.activation, layer_norm_eps=c.layer_norm_eps,
                                     rngs=rngs)
    self.up = _back_to_embed(d, c.embed_dim, rngs)

  def learn(self, motion: jax.Array) -> jax.Array:
    """Motion tokens [B, T, d] -> motion prompts [B, n, d]."""
    queries = jnp.broadcast_to(self.queries[...], (motion.shape[0], *self.queries.shape))
    return queries + self.cross_attn(self.query_norm(queries), self.motion_norm(motion))

  def __call__(self, texts: jax.Array, texts_down: jax.Array, prompts: jax.Array) -> jax.Array:
    """Texts [B, N, E], the same at the width [B, N, d], motion prompts [B, n, d] -> per-video
    texts [B, N, E]."""
    return texts + self.up(self.generator(texts_down, prompts))


# ---------------------------------------------------------------------------------------------
# Multimodal communication
# ---------------------------------------------------------------------------------------------
class MultimodalCommunication(nnx.Module):
  """The video embedding [G, E] and its texts [G, C, E], brought to the width, attend to each
  other once, at the same time; the results, brought back to E, are added to them."""

  def __init__(self, cfg: MotionPromptsConfig, *, rngs: nnx.Rngs):
    c, d, e = cfg.clip, cfg.num_width, cfg.clip.embed_dim
    self.video_norm = nnx.LayerNorm(d, epsilon=c.layer_norm_eps, rngs=rngs)
    self.text_norm = nnx.LayerNorm(d, epsilon=c.layer_norm_eps, rngs=rngs)
    self.video_cross_attn = CrossAttention(d, cfg.num_heads, rngs=rngs)   # video asks the texts
    self.text_cross_attn = CrossAttention(d, cfg.num_heads, rngs=rngs)    # texts ask the video
    init_like_official(self, rngs)
    self.video_up = _back_to_embed(d, e, rngs)
    self.text_up = _back_to_embed(d, e, rngs)

  def __call__(self, video: jax.Array, texts: jax.Array, down) -> tuple[jax.Array, jax.Array]:
    """`down`: the model's map from E to the width."""
    v, t = self.video_norm(down(video))[:, None], self.text_norm(down(texts))
    return (video + self.video_up(self.video_cross_attn(v, t)[:, 0]),
            texts + self.text_up(self.text_cross_attn(t, v)))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class MotionPrompts(nnx.Module):
  """The video-text model family interface (see models/families.py) for motion prompts."""

  def __init__(self, cfg: MotionPromptsConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    d, e = cfg.num_width, cfg.clip.embed_dim
    self.clip = CLIP(cfg.clip, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(e, d, kernel_init=nnx.initializers.normal(e ** -0.5), rngs=rngs)
    self.motion = MotionModelling(cfg, rngs=rngs)
    self.up = _back_to_embed(d, e, rngs)
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
    """[B, T, H, W, 3] -> [B, E]: the video embedding, before the communication with any text;
    not normalised."""
    return self.frame_features(self.frame_embeddings(video))['video']

  def video_features(self, video: jax.Array) -> dict[str, jax.Array]:
    """-> {'video': [B, E], 'prompts': [B, n, d]}: what `class_logits` needs of a video."""
    return self.frame_features(self.frame_embeddings(video))

  def frame_features(self, frames: jax.Array) -> dict[str, jax.Array]:
    """`video_features` from the frame embeddings f [B, T, E]: the video embedding is the mean
    of f plus the mean motion token brought to E."""
    motion = self.motion(self.down(frames))
    return {'video': frames.mean(axis=1) + self.up(motion.mean(axis=1)),
            'prompts': self.prompts.learn(motion)}

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[N, context] -> [N, E], projected, not normalised."""
    return self.clip.encode_text(tokens)

  def class_logits(self, features: dict[str, jax.Array], text: jax.Array) -> jax.Array:
    """features of B videos, text [A, C, E] (A description sets of C classes, not normalised)
    -> [A, B, C]: the per-video texts and the video embedding communicate within each set, then
    exp(logit_scale) * cosine."""
    video, prompts = features['video'], features['prompts']
    (a, c, e), b = text.shape, video.shape[0]
    text = l2_normalize(text).reshape(a * c, e)
    texts = self.prompts(jnp.broadcast_to(text, (b, a * c, e)),
                         jnp.broadcast_to(self.down(text), (b, a * c, self.cfg.num_width)),
                         prompts).reshape(b * a, c, e)
    video, texts = self.communication(jnp.repeat(video, a, axis=0), texts, self.down)
    video, texts = l2_normalize(video).reshape(b, a, e), l2_normalize(texts).reshape(b, a, c, e)
    return logit_scale_factor(self.clip.logit_scale[...]) * jnp.einsum(
        'bae,bace->abc', video, texts, precision=FINAL_PRECISION)

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
