"""X-CLIP ("Expanding Language-Image Pretrained Models for General Video Recognition", Ni et al.,
ECCV 2022) as the official code (microsoft/VideoX, X-CLIP/models) computes it.

    >>> model = XCLIP(XCLIPConfig(clip=get_preset('ViT-B/16'), num_frames=8), rngs=nnx.Rngs(0))
    >>> model.encode_video(video)       # float32 [B, T, H, W, 3], normalised -> [B, E] (MIT's)
    >>> model.encode_text(tokens)       # int32 [N, context] -> [N, E], projected, not normalised
    >>> model.logits(video, tokens)     # [B, N], against the video-conditioned texts

W is the vision width, E the embed dim, T the frames, L = 1 + patches; frame-major, channels last.
  CCT      CLIP's ViT whose every block first makes one message per frame from its class token
           (message_fc), lets the T messages of a clip attend to each other (message_ln,
           message_attn, no positions), appends each frame's message as token L + 1 for the
           block's attention (ln_1, attn), drops it, then ln_2 + MLP.
  MIT      per-frame ln_post(cls) @ proj [B, T, E] + positional embedding [T, E] -> pre-LN blocks
           -> + the input -> mean over T: the video embedding [B, E].
  prompts  the patch tokens of the last block -> prompts_visual_ln -> mean over T ->
           prompts_visual_proj: visual tokens [B, L - 1, E]. Each class text [E] becomes, per
           video, text + alpha * generator(text, visual tokens): cross-attention layers (text
           queries; visual keys and values) with MLPs.
  logits   exp(logit_scale) <normalised video embedding, normalised per-video text>.
Frame order reaches the video embedding only through the MIT's positional embedding: the
messages, having no positions, are blind to it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from claver_jax.models.clip import (ACTIVATIONS, MLP, CLIPConfig, MultiHeadAttention,
                                    ResidualBlock, TextTransformer, VisionTransformer, attention,
                                    check_known_fields, l2_normalize, torch_linear_default)
from claver_jax.models.clip import FINAL_PRECISION, logit_scale_factor


def official_heads(width: int) -> int:
  """The official head count of X-CLIP's new parts: width // 64 (1 where 64 does not divide)."""
  return width // 64 if width % 64 == 0 else 1


@dataclasses.dataclass(frozen=True)
class XCLIPConfig:
  """clip: the towers. num_frames: T, the rows of the MIT's positional embedding.
  mit_layers, mit_heads, mit_mlp_dim: the MIT (heads None = embed_dim // 64, the official rule;
  MLP None = 4 x embed_dim, the official width). Its LayerNorms and activation are the vision
  tower's (transformers builds the MIT from the vision config).
  prompt_layers, prompt_heads: the prompt generator (heads None as the MIT's).
  prompt_alpha: the initial value of the generator's learnt output scale alpha [E].
  prompt_activation: the generator's MLP activation (None = the vision tower's); its input
  LayerNorm takes the vision tower's epsilon and its layers' norms the text tower's, as in
  transformers. These are every XCLIPConfig field transformers' XCLIPModel computes with."""
  clip: CLIPConfig = CLIPConfig()
  num_frames: int = 8
  mit_layers: int = 1
  mit_heads: int | None = None
  mit_mlp_dim: int | None = None
  prompt_layers: int = 2
  prompt_heads: int | None = None
  prompt_alpha: float = 0.1
  prompt_activation: str | None = None

  def __post_init__(self):
    if isinstance(self.clip, dict):
      object.__setattr__(self, 'clip', CLIPConfig.from_dict(self.clip))
    problems = []
    if self.num_frames < 1:
      problems.append(f'num_frames={self.num_frames} must be at least 1')
    for part in ('mit', 'prompt'):
      layers, heads = getattr(self, f'{part}_layers'), getattr(self, f'{part}_heads')
      if layers < 1:
        problems.append(f'{part}_layers={layers} must be at least 1')
      if heads is not None and (heads < 1 or self.clip.embed_dim % heads):
        problems.append(f'{part}_heads={heads} must be at least 1 and divide the embed dim '
                        f'{self.clip.embed_dim}')
    if self.mit_mlp_dim is not None and self.mit_mlp_dim < 1:
      problems.append(f'mit_mlp_dim={self.mit_mlp_dim} must be at least 1')
    if self.prompt_activation is not None and self.prompt_activation not in ACTIVATIONS:
      problems.append(f'prompt_activation={self.prompt_activation!r} (choose one of '
                      f'{ACTIVATIONS})')
    if problems:
      raise ValueError('Invalid XCLIPConfig: ' + '; '.join(problems) + '.')

  @property
  def summary(self) -> str:
    """What the model adds to its CLIP, in words (for reports)."""
    return f'{self.mit_layers} MIT and {self.prompt_layers} prompt layers'

  @property
  def mit_num_heads(self) -> int:
    return self.mit_heads or official_heads(self.clip.embed_dim)

  @property
  def prompt_num_heads(self) -> int:
    return self.prompt_heads or official_heads(self.clip.embed_dim)

  @property
  def mit_hidden_dim(self) -> int:
    """The MIT's MLP width."""
    return self.mit_mlp_dim or 4 * self.clip.embed_dim

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> XCLIPConfig:
    check_known_fields(cls, d)
    return cls(**{**d, 'clip': CLIPConfig.from_dict(d['clip'])})


# ---------------------------------------------------------------------------------------------
# Initialisation of the new parts, as the official code leaves them
# ---------------------------------------------------------------------------------------------
def init_like_official(module: nnx.Module, rngs: nnx.Rngs) -> None:
  """The official `_init_weights` of the MIT and the prompt generator: every Linear kernel
  truncated normal (std .02), biases 0; the packed q/k/v of nn.MultiheadAttention, which that
  hook does not reach, keep PyTorch's Xavier-uniform default."""
  truncated = jax.nn.initializers.truncated_normal(0.02)
  for _, m in nnx.iter_modules(module):
    if isinstance(m, nnx.Linear):
      m.kernel[...] = truncated(rngs.params(), m.kernel.shape)
      if m.bias is not None:
        m.bias[...] = jnp.zeros(m.bias.shape, m.bias.dtype)
  for _, m in nnx.iter_modules(module):
    if isinstance(m, MultiHeadAttention):
      m.qkv.kernel[...] = jax.nn.initializers.xavier_uniform()(rngs.params(), m.qkv.kernel.shape)


# ---------------------------------------------------------------------------------------------
# Cross-frame communication transformer (CCT)
# ---------------------------------------------------------------------------------------------
class CrossFrameBlock(ResidualBlock):
  """The official `CrossFramelAttentionBlock`: frames [B, T, L, W] -> [B, T, L, W].

  Its message parts start at PyTorch's defaults (the official code initialises them no further);
  the rest is a CLIP block, which a converted CLIP fills in.
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, *, activation: str = 'quick_gelu',
               layer_norm_eps: float = 1e-5, depth: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(width, heads, mlp_dim, activation=activation, layer_norm_eps=layer_norm_eps,
                     depth=depth, dtype=dtype, rngs=rngs)
    default = torch_linear_default(width)
    self.message_fc = nnx.Linear(width, width, dtype=dtype, kernel_init=default, bias_init=default,
                                 rngs=rngs)
    self.message_ln = nnx.LayerNorm(width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.message_attn = MultiHeadAttention(width, heads, in_std=1.0, out_std=1.0, dtype=dtype,
                                           rngs=rngs)
    attn = self.message_attn
    xavier = jax.nn.initializers.xavier_uniform()
    attn.qkv.kernel[...] = xavier(rngs.params(), attn.qkv.kernel.shape)
    attn.out.kernel[...] = default(rngs.params(), attn.out.kernel.shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat:
      return nnx.remat(_cross_frame_forward)(self, x)
    return _cross_frame_forward(self, x)


def _cross_frame_forward(block: CrossFrameBlock, x: jax.Array) -> jax.Array:
  b, t, l, d = x.shape
  message = block.message_fc(x[:, :, 0])                                # [B, T, W]
  message = message + block.message_attn(block.message_ln(message))     # the frames of a clip talk
  x = jnp.concatenate([x, message[:, :, None]], axis=2).reshape(b * t, l + 1, d)
  x = x + block.attn(block.ln_1(x))
  x = x[:, :l]                                                          # the message is dropped
  x = x + block.mlp(block.ln_2(x))
  return x.reshape(b, t, l, d)


# ---------------------------------------------------------------------------------------------
# Multi-frame integration transformer (MIT)
# ---------------------------------------------------------------------------------------------
class MultiframeIntegration(nnx.Module):
  """Per-frame embeddings [B, T, E] -> the video embedding [B, E]."""

  def __init__(self, num_frames: int, width: int, layers: int, heads: int, *,
               mlp_dim: int | None = None, activation: str = 'quick_gelu',
               layer_norm_eps: float = 1e-5, rngs: nnx.Rngs):
    self.num_frames = num_frames
    self.positional_embedding = nnx.Param(
        jax.nn.initializers.truncated_normal(0.02)(rngs.params(), (num_frames, width)))
    self.blocks = nnx.List([
        ResidualBlock(width, heads, mlp_dim or 4 * width, activation=activation,
                      layer_norm_eps=layer_norm_eps, depth=layers, rngs=rngs)
        for _ in range(layers)
    ])
    init_like_official(self.blocks, rngs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    t = frames.shape[1]
    if t != self.num_frames:
      raise ValueError(f'The clip has {t} frames but the MIT positional embedding has '
                       f'{self.num_frames}; load the checkpoint with num_frames={t} to resample '
                       'it.')
    x = frames + self.positional_embedding[...]
    for block in self.blocks:
      x = block(x)
    return (x + frames).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Video-specific prompt generator
# ---------------------------------------------------------------------------------------------
class CrossAttention(nnx.Module):
  """Queries [B, N, E] attend to keys = values [B, M, E]: q/k/v without bias, proj with."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array, visual: jax.Array) -> jax.Array:
    (b, n, e), h = x.shape, self.heads
    heads_first = lambda y: y.reshape(b, y.shape[1], h, e // h).transpose(0, 2, 1, 3)
    q, k, v = heads_first(self.q_proj(x)), heads_first(self.k_proj(visual)), heads_first(
        self.v_proj(visual))                                       # [B, H, N | M, E / H]
    return self.proj(attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, n, e))


class PromptGeneratorLayer(nnx.Module):
  """x [B, N, E] attends to visual [B, M, E], then an MLP (mlp_dim None: 4 E, the official and
  transformers' only width)."""

  def __init__(self, width: int, heads: int, *, activation: str, layer_norm_eps: float,
               mlp_dim: int | None = None, rngs: nnx.Rngs):
    self.cross_attn = CrossAttention(width, heads, rngs=rngs)
    self.norm1 = nnx.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.norm3 = nnx.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)  # sic: the official name
    self.mlp = MLP(width, mlp_dim or 4 * width, activation, fc_std=0.02, proj_std=0.02,
                   dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array, visual: jax.Array) -> jax.Array:
    x = x + self.cross_attn(self.norm1(x), visual)
    return x + self.mlp(self.norm3(x))


class PromptGenerator(nnx.Module):
  """The official `VideoSpecificPrompt`: texts [B, N, E], visual tokens [B, M, E] -> the
  prompt alpha * x [B, N, E] that is added to each text. mlp_dim: as PromptGeneratorLayer's."""

  def __init__(self, width: int, layers: int, heads: int, alpha: float, *,
               activation: str = 'quick_gelu', layer_norm_eps: float = 1e-5,
               layer_eps: float | None = None, mlp_dim: int | None = None, rngs: nnx.Rngs):
    """layer_norm_eps: the input norm's; layer_eps: its layers' (None: the same)."""
    self.norm = nnx.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.decoder = nnx.List([
        PromptGeneratorLayer(width, heads, activation=activation,
                             layer_norm_eps=layer_norm_eps if layer_eps is None else layer_eps,
                             mlp_dim=mlp_dim, rngs=rngs)
        for _ in range(layers)
    ])
    self.alpha = nnx.Param(jnp.full((width,), alpha, jnp.float32))
    init_like_official(self.decoder, rngs)

  def __call__(self, text: jax.Array, visual: jax.Array) -> jax.Array:
    visual = self.norm(visual)
    for layer in self.decoder:
      text = layer(text, visual)
    return self.alpha[...] * text


# ---------------------------------------------------------------------------------------------
# X-CLIP
# ---------------------------------------------------------------------------------------------
class XCLIP(nnx.Module):
  """The video-text model family interface (see models/families.py) for X-CLIP."""

  def __init__(self, cfg: XCLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    c, e = cfg.clip, cfg.clip.embed_dim
    self.visual = VisionTransformer(c, dtype=dtype, rngs=rngs, block=CrossFrameBlock)
    self.text = TextTransformer(c, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))
    self.mit = MultiframeIntegration(cfg.num_frames, e, cfg.mit_layers, cfg.mit_num_heads,
                                     mlp_dim=cfg.mit_hidden_dim, activation=c.activation,
                                     layer_norm_eps=c.layer_norm_eps, rngs=rngs)
    self.prompts_visual_ln = nnx.LayerNorm(c.vision_width, epsilon=c.layer_norm_eps, rngs=rngs)
    # torch.randn in the official code: unit scale, which prompts_generator.norm takes out.
    self.prompts_visual_proj = nnx.Param(jax.random.normal(rngs.params(), (c.vision_width, e)))
    self.prompts_generator = PromptGenerator(
        e, cfg.prompt_layers, cfg.prompt_num_heads, cfg.prompt_alpha,
        activation=cfg.prompt_activation or c.activation, layer_norm_eps=c.layer_norm_eps,
        layer_eps=c.text_eps, rngs=rngs)

  def encode_tokens(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> [B, T, L, W]: every token after the last cross-frame block."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f'video must be [B, T, H, W, 3]; got shape {video.shape}.')
    b, t = video.shape[:2]
    x = self.visual.embed(video.reshape(b * t, *video.shape[2:]))
    x = x.reshape(b, t, *x.shape[1:])
    for block in self.visual.blocks:
      x = block(x)
    return x

  def visual_prompt_tokens(self, tokens: jax.Array) -> jax.Array:
    """[B, T, L, W] -> [B, L - 1, E]: what the prompt generator attends to."""
    patches = self.prompts_visual_ln(tokens[:, :, 1:].astype(jnp.float32))
    return patches.mean(axis=1) @ self.prompts_visual_proj[...]   # proj is linear: mean first

  def encode_video(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] -> [B, E]: the MIT's video embedding, not normalised."""
    return self.mit(self.visual.pool(self.encode_tokens(video)[:, :, 0]))

  def video_features(self, video: jax.Array) -> dict[str, jax.Array]:
    """-> {'video': [B, E], 'visual': [B, L - 1, E]}: what `class_logits` needs of a video."""
    tokens = self.encode_tokens(video)
    return {'video': self.mit(self.visual.pool(tokens[:, :, 0])),
            'visual': self.visual_prompt_tokens(tokens)}

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[N, context] -> [N, E], projected, not normalised."""
    return self.text(tokens)

  def class_logits(self, features: dict[str, jax.Array], text: jax.Array) -> jax.Array:
    """features of B videos, text [A, C, E] (A description sets of C classes, not normalised)
    -> [A, B, C]: each text conditioned on each video, then exp(logit_scale) * cosine."""
    video, visual = features['video'], features['visual']
    (a, c, e), b = text.shape, video.shape[0]
    queries = jnp.broadcast_to(text.reshape(1, a * c, e), (b, a * c, e))
    per_video = l2_normalize(queries + self.prompts_generator(queries, visual)).reshape(b, a, c, e)
    return logit_scale_factor(self.logit_scale[...]) * jnp.einsum(
        'be,bace->abc', l2_normalize(video), per_video, precision=FINAL_PRECISION)

  def logits(self, video: jax.Array, tokens: jax.Array) -> jax.Array:
    """-> [B, N]: every video against every text, conditioned on that video."""
    return self.class_logits(self.video_features(video), self.encode_text(tokens)[None])[0]


def xclip_from_clip(clip: Any, cfg: XCLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs) -> XCLIP:
  """An X-CLIP whose towers and logit scale are `clip`'s (a CLIP) and whose messages, MIT and
  prompt generator are fresh, as the official code builds it from CLIP's weights."""
  if clip.cfg != cfg.clip:
    raise ValueError(f'The CLIP weights are for {clip.cfg} but the X-CLIP config has {cfg.clip}.')
  model = XCLIP(cfg, dtype=dtype, rngs=rngs)
  nnx.update(model, nnx.state(clip, nnx.Param))   # visual.*, text.*, logit_scale: same paths
  return model


# ---------------------------------------------------------------------------------------------
# Its keys in a run config (claver_jax.run_config): config.model.xclip
# ---------------------------------------------------------------------------------------------
def default_config() -> ml_collections.ConfigDict:
  """config.model.xclip, X-CLIP's own keys in a run config:
    mit_layers     the MIT's depth (1)
    prompt_layers  the prompt generator's depth (2)
    prompt_alpha   the prompt generator's initial output scale (0.1)
  (the MIT's heads are config.model.temporal_heads)."""
  return ml_collections.ConfigDict(dict(mit_layers=1, prompt_layers=2, prompt_alpha=0.1))


def config_for_run(clip: CLIPConfig, config: ml_collections.ConfigDict) -> XCLIPConfig:
  """The XCLIPConfig a run config describes, on the towers `clip`."""
  x = config.model.xclip
  return XCLIPConfig(clip=clip, num_frames=config.data.num_frames, mit_layers=x.mit_layers,
                     mit_heads=config.model.get('temporal_heads'), prompt_layers=x.prompt_layers,
                     prompt_alpha=x.prompt_alpha)
