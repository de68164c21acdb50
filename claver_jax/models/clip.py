"""CLIP's two towers in Flax NNX, numerically equal to PyTorch CLIP.

Shapes: images are float32 [N, H, W, 3] (channels last, already normalised with CLIP's mean/std);
tokens are int32 [N, context]. Parameter names follow OpenAI's CLIP so that converters read like
the source.

Precision: parameters are fp32. `dtype` is the compute dtype of the activations (bf16 on
accelerators); LayerNorm statistics, the final LayerNorm + projection and the outputs are fp32.
bf16 embeddings are within about 1% (relative L2) of fp32 ones.

    >>> model = CLIP(get_preset('ViT-B/32'), rngs=nnx.Rngs(0))
    >>> model.encode_image(images)          # [N, embed_dim], projected, not normalised
    >>> model.encode_text(tokens)           # [N, embed_dim], projected, not normalised
    >>> model.logits(images, tokens)        # [N_images, N_texts], scaled by exp(logit_scale)

The public methods are plain functions of the module: call them eagerly, or wrap them in
`nnx.jit` for speed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The input normalisation OpenAI's CLIP weights expect: per-channel mean/std of pixel values
# scaled to 0-1 (claver_jax.data.transforms.normalize).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ('quick_gelu', 'gelu', 'gelu_tanh')
TEXT_POOLINGS = ('argmax', 'first_eos')


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a ViT CLIP. Field names mirror OpenAI's `build_model`.

  text_pooling: where the text tower reads its sequence embedding.
    'argmax': at the largest token id, OpenAI CLIP's rule (the end-of-text id is the largest).
    'first_eos': at the first `eos_token_id`, the rule of HF checkpoints.
  activation, layer_norm_eps: both towers' (and the video families' new parts'), unless
  text_activation / text_layer_norm_eps give the text tower its own (HF configs may).
  """
  embed_dim: int = 512
  # Vision tower.
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  # Text tower.
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  text_pooling: str = 'argmax'
  eos_token_id: int = 49407
  # Shared.
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  # The text tower's own, where it differs (None: the shared one).
  text_activation: str | None = None
  text_layer_norm_eps: float | None = None

  def __post_init__(self):
    problems = []
    for field in ('activation', 'text_activation'):
      value = getattr(self, field)
      if value not in ACTIVATIONS and (field == 'activation' or value is not None):
        problems.append(f'{field}={value!r} (choose one of {ACTIVATIONS})')
    if self.text_pooling not in TEXT_POOLINGS:
      problems.append(f'text_pooling={self.text_pooling!r} (choose one of {TEXT_POOLINGS})')
    if self.image_size % self.patch_size:
      problems.append(f'image_size={self.image_size} is not a multiple of patch_size={self.patch_size}')
    for tower in ('vision', 'text'):
      width, heads = getattr(self, f'{tower}_width'), getattr(self, f'{tower}_heads')
      if heads <= 0 or width % heads:
        problems.append(f'{tower}_width={width} is not divisible by {tower}_heads={heads}')
    if problems:
      raise ValueError('Invalid CLIPConfig: ' + '; '.join(problems))

  @property
  def text_act(self) -> str:
    """The text tower's activation."""
    return self.text_activation or self.activation

  @property
  def text_eps(self) -> float:
    """The text tower's LayerNorm epsilon."""
    return self.layer_norm_eps if self.text_layer_norm_eps is None else self.text_layer_norm_eps

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_image_tokens(self) -> int:
    """L: the class token plus one token per patch."""
    return 1 + self.grid_size ** 2

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
    check_known_fields(cls, d)
    return cls(**d)


def check_known_fields(cls: type, d: dict[str, Any]) -> None:
  """A clear error for keys of `d` that are not fields of the dataclass `cls`."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f'Unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}.')


PRESETS: dict[str, CLIPConfig] = {
    'ViT-B/32': CLIPConfig(),
    'ViT-B/16': CLIPConfig(patch_size=16),
    'ViT-L/14': CLIPConfig(
        embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        vision_mlp_dim=4096, text_width=768, text_heads=12, text_mlp_dim=3072),
    'ViT-L/14@336': CLIPConfig(
        embed_dim=768, image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, vision_mlp_dim=4096, text_width=768, text_heads=12, text_mlp_dim=3072),
}
# Short names, as used by config presets (`configs/k400.py:B16`).
PRESET_ALIASES = {'B32': 'ViT-B/32', 'B16': 'ViT-B/16', 'L14': 'ViT-L/14', 'L14_336': 'ViT-L/14@336'}


def get_preset(name: str) -> CLIPConfig:
  """Returns the architecture of a released CLIP by name ('ViT-B/16' or its alias 'B16')."""
  key = PRESET_ALIASES.get(name, name)
  if key not in PRESETS:
    raise ValueError(
        f'Unknown CLIP architecture {name!r}; choose one of {list(PRESETS)} '
        f'or their aliases {list(PRESET_ALIASES)}.')
  return PRESETS[key]


def _activation(name: str):
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  return lambda x: jax.nn.gelu(x, approximate=True)


_normal = jax.nn.initializers.normal


def torch_linear_default(fan_in: int):
  """PyTorch's nn.Linear default: U(±1 / sqrt(fan_in)) for the kernel and the bias."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              is_causal: bool = False) -> jax.Array:
  """softmax(q kᵀ / √Dh) v per head, heads-major: q [B, H, Sq, Dh], k, v [B, H, Sk, Dh] ->
  [B, H, Sq, Dh]. mask: bool, True = may attend, broadcastable to [B, H, Sq, Sk]; is_causal: query
  i sees keys 0..i (Sq = Sk). Scores and softmax in float32, as `jax.nn.dot_product_attention`.

  Heads-major operands make both products plain batched matmuls with no transposes between them;
  on XLA:CPU this is 1.2-1.8x faster (forward + backward) than `jax.nn.dot_product_attention` on
  [B, S, H, Dh] operands.
  """
  scores = jnp.einsum('bhqd,bhkd->bhqk', q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                      preferred_element_type=jnp.float32)
  if is_causal:
    causal = jnp.arange(q.shape[2])[:, None] >= jnp.arange(k.shape[2])[None, :]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v)


class MultiHeadAttention(nnx.Module):
  """Self-attention with packed q/k/v, as PyTorch `nn.MultiheadAttention`."""

  def __init__(self, width: int, heads: int, *, in_std: float, out_std: float, dtype, rngs):
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, kernel_init=_normal(in_std), rngs=rngs)
    self.out = nnx.Linear(width, width, dtype=dtype, kernel_init=_normal(out_std), rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               is_causal: bool = False) -> jax.Array:
    """x: [B, S, D]; mask: bool, True = may attend, broadcastable to [B, heads, S, S]."""
    b, s, d = x.shape
    qkv = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads)
    q, k, v = jnp.unstack(qkv.transpose(2, 0, 3, 1, 4))          # [B, H, S, Dh] each
    y = attention(q, k, v, mask=mask, is_causal=is_causal)
    return self.out(y.transpose(0, 2, 1, 3).reshape(b, s, d))

  def attend_from(self, queries: jax.Array, x: jax.Array, *,
                  mask: jax.Array | None = None) -> jax.Array:
    """Queries from the rows `queries` [B, P, D], keys and values from x [B, S, D] -> [B, P, D];
    mask: bool, broadcastable to [B, heads, P, S]. With `queries` rows of x and the matching
    rows of a self-attention mask, these are the rows of `self(x, mask=...)`."""
    (b, p, d), s = queries.shape, x.shape[1]
    kernel = self.qkv.kernel[...].astype(x.dtype)                # [D, 3D]: q | k | v
    bias = self.qkv.bias[...].astype(x.dtype)
    q = (queries @ kernel[:, :d] + bias[:d]).reshape(b, p, self.heads, -1).transpose(0, 2, 1, 3)
    kv = (x @ kernel[:, d:] + bias[d:]).reshape(b, s, 2, self.heads, -1)
    k, v = jnp.unstack(kv.transpose(2, 0, 3, 1, 4))               # [B, H, S, Dh] each
    y = attention(q, k, v, mask=mask)
    return self.out(y.transpose(0, 2, 1, 3).reshape(b, p, d))


class MLP(nnx.Module):

  def __init__(self, width: int, mlp_dim: int, activation: str, *, fc_std: float,
               proj_std: float, dtype, rngs):
    self.c_fc = nnx.Linear(width, mlp_dim, dtype=dtype, kernel_init=_normal(fc_std), rngs=rngs)
    self.c_proj = nnx.Linear(mlp_dim, width, dtype=dtype, kernel_init=_normal(proj_std), rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(_activation(self.activation)(self.c_fc(x)))


class ResidualBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, activation: str = 'quick_gelu',
               layer_norm_eps: float = 1e-5, depth: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
    # OpenAI CLIP's initialisation (`initialize_parameters`), scaled by the stack's depth.
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.ln_1 = nnx.LayerNorm(width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadAttention(
        width, heads, in_std=attn_std, out_std=proj_std, dtype=dtype, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(width, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = MLP(width, mlp_dim, activation, fc_std=fc_std, proj_std=proj_std, dtype=dtype,
                   rngs=rngs)

    self.remat = False   # See `set_remat`.

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               is_causal: bool = False) -> jax.Array:
    if self.remat:
      return nnx.remat(_block_forward, static_argnums=(3,))(self, x, mask, is_causal)
    return _block_forward(self, x, mask, is_causal)

  def at_positions(self, x: jax.Array, positions: jax.Array, *,
                   mask: jax.Array | None = None) -> jax.Array:
    """The block's output at `positions` only: x [B, S, D], positions int [B, P] -> [B, P, D].
    mask: the rows of the self-attention mask for those queries, broadcastable to
    [B, heads, P, S]. Keys and values come from every position; the queries, the attention
    output and the MLP from the P rows alone (2/12 of the block's matmul work for P << S)."""
    if self.remat:
      return nnx.remat(_block_at_positions)(self, x, positions, mask)
    return _block_at_positions(self, x, positions, mask)


def _block_at_positions(block: ResidualBlock, x: jax.Array, positions: jax.Array,
                        mask: jax.Array | None) -> jax.Array:
  y = block.ln_1(x)
  rows = positions[..., None]                                     # [B, P, 1]
  x = jnp.take_along_axis(x, rows, axis=1)
  x = x + block.attn.attend_from(jnp.take_along_axis(y, rows, axis=1), y, mask=mask)
  return x + block.mlp(block.ln_2(x))


def _block_forward(block: ResidualBlock, x: jax.Array, mask: jax.Array | None,
                   is_causal: bool) -> jax.Array:
  x = x + block.attn(block.ln_1(x), mask=mask, is_causal=is_causal)
  return x + block.mlp(block.ln_2(x))


def set_remat(model: nnx.Module, remat: bool = True) -> None:
  """Rematerialisation: every transformer block of `model` recomputes its activations in the
  backward pass instead of keeping them, trading compute for activation memory."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, ResidualBlock):
      module.remat = remat


def _blocks(n: int, width: int, heads: int, mlp_dim: int, activation: str, eps: float, dtype,
            rngs, block: type[ResidualBlock] = ResidualBlock):
  return nnx.List([
      block(width, heads, mlp_dim, activation=activation, layer_norm_eps=eps,
            depth=n, dtype=dtype, rngs=rngs)
      for _ in range(n)
  ])


class VisionTransformer(nnx.Module):
  """CLIP's ViT: images [N, H, W, 3] -> tokens [N, L, width] -> embedding [N, embed_dim].

  block: the class of its residual blocks (X-CLIP's cross-frame blocks subclass ResidualBlock).
  """

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
               block: type[ResidualBlock] = ResidualBlock):
    width, scale = cfg.vision_width, cfg.vision_width ** -0.5
    self.cfg = cfg
    self.dtype = dtype
    self.conv1 = nnx.Conv(3, width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                          padding='VALID', use_bias=False, dtype=dtype, rngs=rngs)
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
    self.positional_embedding = nnx.Param(
        scale * jax.random.normal(rngs.params(), (cfg.num_image_tokens, width)))
    eps = cfg.layer_norm_eps
    self.ln_pre = nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)
    self.blocks = _blocks(cfg.vision_layers, width, cfg.vision_heads, cfg.vision_mlp_dim,
                          cfg.activation, eps, dtype, rngs, block)
    self.ln_post = nnx.LayerNorm(width, epsilon=eps, dtype=jnp.float32, rngs=rngs)
    self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (width, cfg.embed_dim)))

  def encode_tokens(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] -> [N, L, width]: every token after the last block, before `ln_post`."""
    x = self.embed(images)
    for block in self.blocks:
      x = block(x)
    return x

  def embed(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] -> [N, L, width]: the tokens the first block takes (patches, class token,
    positions, `ln_pre`)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [N, H, W, 3] (channels last); got shape {images.shape}.')
    size = self.cfg.image_size
    if images.shape[1:3] != (size, size):
      raise ValueError(
          f'images are {images.shape[1]}x{images.shape[2]} but this model takes {size}x{size}. '
          'Resize the inputs, or convert the weights with --image_size to resample the '
          'positional embedding.')
    x = self.embed_patches(images.astype(self.dtype))             # [N, g², width], row-major
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
    return self.ln_pre(x)

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] -> [N, g², width]: `conv1` (stride = kernel = patch) as one matmul of the
    flattened patches [N·g², p·p·3] with the kernel [p·p·3, width]: the same sums as the
    convolution, about 1.8x faster on XLA:CPU; on accelerators XLA lowers both to one matmul."""
    n, h, w, c = images.shape
    p = self.cfg.patch_size
    patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    kernel = self.conv1.kernel[...].astype(images.dtype)          # [p, p, 3, width]
    return patches.reshape(n, (h // p) * (w // p), p * p * c) @ kernel.reshape(p * p * c, -1)

  def pool(self, tokens: jax.Array) -> jax.Array:
    """Class tokens [..., width] -> `ln_post` -> `proj` -> [..., embed_dim], in float32."""
    return jnp.matmul(self.ln_post(tokens.astype(jnp.float32)), self.proj[...],
                      precision=FINAL_PRECISION)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.pool(self.encode_tokens(images)[:, 0])


def pool_index(tokens, cfg: CLIPConfig):
  """int [..., S] (numpy or jax) -> [...]: the position the text tower reads its sequence
  embedding at, by cfg.text_pooling."""
  xp = np if isinstance(tokens, np.ndarray) else jnp
  if cfg.text_pooling == 'argmax':
    return xp.argmax(tokens, axis=-1)
  return xp.argmax(tokens == cfg.eos_token_id, axis=-1)


def needed_context(tokens: np.ndarray, cfg: CLIPConfig, multiple: int = 8) -> int:
  """How many leading positions of `tokens` int [..., S] the text tower needs: one past the
  last position it pools at, rounded up to `multiple` (at most S). The attention is causal, so
  encoding tokens[..., :n] gives the embeddings of the whole context."""
  length = int(pool_index(np.asarray(tokens), cfg).max()) + 1 if tokens.size else 1
  return min(-(-length // multiple) * multiple, tokens.shape[-1])


class TextTransformer(nnx.Module):
  """CLIP's causal text transformer: tokens [N, S] -> states [N, S, width] -> [N, embed_dim]."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    width = cfg.text_width
    self.cfg = cfg
    self.dtype = dtype
    self.token_embedding = nnx.Embed(cfg.vocab_size, width, dtype=dtype,
                                     embedding_init=_normal(0.02), rngs=rngs)
    self.positional_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (cfg.context_length, width)))
    self.blocks = _blocks(cfg.text_layers, width, cfg.text_heads, cfg.text_mlp_dim, cfg.text_act,
                          cfg.text_eps, dtype, rngs)
    self.ln_final = nnx.LayerNorm(width, epsilon=cfg.text_eps, dtype=jnp.float32, rngs=rngs)
    self.text_projection = nnx.Param(
        width ** -0.5 * jax.random.normal(rngs.params(), (width, cfg.embed_dim)))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[N, S] int -> [N, S, width]: token plus positional embeddings, the first block's input."""
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [N, context]; got shape {tokens.shape}.')
    if tokens.shape[1] > self.cfg.context_length:
      raise ValueError(f'tokens have {tokens.shape[1]} positions but the model has '
                       f'{self.cfg.context_length}; tokenize with context_length='
                       f'{self.cfg.context_length}.')
    x = self.token_embedding(tokens)
    return x + self.positional_embedding[:tokens.shape[1]].astype(x.dtype)

  def encode_tokens(self, tokens: jax.Array) -> jax.Array:
    """[N, S] int -> [N, S, width] float32: every position after `ln_final`, before pooling."""
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, is_causal=True)
    return self.ln_final(x)

  def eot_index(self, tokens: jax.Array) -> jax.Array:
    """[N, S] -> [N]: the position the sequence embedding is read at (see CLIPConfig)."""
    return pool_index(tokens, self.cfg)

  def pool(self, states: jax.Array, tokens: jax.Array) -> jax.Array:
    """[N, S, width] states, [N, S] tokens -> [N, embed_dim] in float32."""
    eot = jnp.take_along_axis(states, self.eot_index(tokens)[:, None, None], axis=1)[:, 0]
    return jnp.matmul(eot, self.text_projection[...], precision=FINAL_PRECISION)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[N, S] int -> [N, embed_dim] float32, equal to `pool(encode_tokens(tokens), tokens)`.
    Under the causal mask nothing after the pooled position reaches it, and the last block's
    other rows feed nothing: that block runs for the pooled row only (its keys and values still
    from every position), saving 10/12 of its work."""
    *body, last = self.blocks
    x = self.embed(tokens)
    for block in body:
      x = block(x, is_causal=True)
    eot = self.eot_index(tokens)[:, None]                         # [N, 1]
    causal = jnp.arange(tokens.shape[1]) <= eot                   # [N, S]: keys up to eot
    x = last.at_positions(x, eot, mask=causal[:, None, None])[:, 0]   # [N, width]
    return jnp.matmul(self.ln_final(x), self.text_projection[...], precision=FINAL_PRECISION)


def sincos_position_embedding(grid: int, width: int) -> jax.Array:
  """[1 + grid², width] 2-D sine-cosine positions (MAE, MoCo v3) for a ViT trained from scratch:
  a zero row for the class token, then the row-major patches. A quarter of the channels each
  hold sin(y·w), cos(y·w), sin(x·w), cos(x·w) over frequencies w = 10000^(-k / (width / 4))."""
  if width % 4:
    raise ValueError(f'A sine-cosine position embedding needs a width divisible by 4, got {width}.')
  omega = 1.0 / 10000 ** (jnp.arange(width // 4, dtype=jnp.float32) / (width // 4))
  ys, xs = jnp.divmod(jnp.arange(grid * grid, dtype=jnp.float32), grid)
  angles_y, angles_x = ys[:, None] * omega, xs[:, None] * omega
  patches = jnp.concatenate([jnp.sin(angles_y), jnp.cos(angles_y), jnp.sin(angles_x),
                             jnp.cos(angles_x)], axis=1)
  return jnp.concatenate([jnp.zeros((1, width), jnp.float32), patches])


# The final projections and the logits are fp32 products computed in full fp32 (TPUs otherwise
# take one bf16 pass for an fp32 matmul, GPUs TF32): the cosines that rank classes.
FINAL_PRECISION = jax.lax.Precision.HIGHEST
# CLIP clips its learnt temperature so that the logits are at most 100 x cosine.
MAX_LOGIT_SCALE = math.log(100.0)


def logit_scale_factor(logit_scale: jax.Array) -> jax.Array:
  """exp(min(logit_scale, ln 100)): the factor the cosines are multiplied by."""
  return jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))


def clamp_logit_scale(model: nnx.Module) -> None:
  """Clips every `logit_scale` parameter of `model` to [0, ln 100] in place, as CLIP's training
  does after each update."""
  for path, value in nnx.iter_graph(model):
    if path and path[-1] == 'logit_scale' and isinstance(value, nnx.Param):
      value[...] = jnp.clip(value[...], 0.0, MAX_LOGIT_SCALE)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


class CLIP(nnx.Module):
  """Both towers and the learned temperature."""

  def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.visual = VisionTransformer(cfg, dtype=dtype, rngs=rngs)
    self.text = TextTransformer(cfg, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def encode_image(self, images: jax.Array, *, return_tokens: bool = False):
    """[N, H, W, 3] -> [N, embed_dim]; with return_tokens also [N, L, vision_width]."""
    tokens = self.visual.encode_tokens(images)
    embedding = self.visual.pool(tokens[:, 0])
    return (embedding, tokens) if return_tokens else embedding

  def encode_text(self, tokens: jax.Array, *, return_tokens: bool = False):
    """[N, S] int -> [N, embed_dim]; with return_tokens also [N, S, text_width] states."""
    if not return_tokens:
      return self.text(tokens)
    states = self.text.encode_tokens(tokens)
    return self.text.pool(states, tokens), states

  def logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """-> [N_images, N_texts]: exp(logit_scale) times the cosine similarity."""
    image = l2_normalize(self.encode_image(images))
    text = l2_normalize(self.encode_text(tokens))
    return logit_scale_factor(self.logit_scale[...]) * jnp.matmul(image, text.T,
                                                                 precision=FINAL_PRECISION)
