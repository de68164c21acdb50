"""Kronecker attention over the T·L tokens of a clip, in frame-major order (token t·L + l).

Who may attend to whom, for query token i and key token j (frames i // L and j // L):
  kmt       I_TL OR kron(1_T - I_T, 1_LxL)      self, and every token of every other frame
  kmct      I_TL OR kron(tril(1_T, -1), 1_LxL)  self, and every token of earlier frames
  spatial   kron(I_T, 1_LxL)                    every token of the same frame
  joint     all true                            every token of the clip
  pipeline  kron(1_T, I_L)                      the same spatial position in every frame

`allowed` is that rule on index arrays. The model builds its masks from it inside the program
(iota; the chunked implementation a block at a time), never as a [T·L, T·L] host constant.
`kronecker_mask` is the same rule as a host matrix, for tests and inspection only.

`kronecker_attention(q, k, v, kind=..., num_frames=T, implementation=...)`, q/k/v [B, T·L, H, Dh]:
  dense     the whole mask: [B, H, T·L, T·L] scores, computed heads-major by `clip.attention` (as
            the CLIP towers' attention; on XLA:CPU faster than `jax.nn.dot_product_attention`).
  chunked   exact, without the [T·L, T·L] matrix in the forward or the backward pass. Queries
            go a chunk of c frames at a time (c = 1 by default). kmt, kmct and joint: the
            chunk's scores against its own frames first ([B, H, c·L, c·L], masked from iota),
            then against the other key chunks whole, one at a time, with an online softmax
            (running max and sum); kmct never computes a key chunk after the query chunk, so it
            does (T/c + 1) / (2T/c) of dense's score work. spatial and pipeline: a chunk's scores
            against every key at once ([B, H, c·L, T·L], masked from iota). The backward pass is
            a custom VJP that recomputes each block of scores from the saved log-sum-exp (flash
            attention), so a layer keeps only q, k, v, its output and [B, H, T·L] log-sum-exps.
  auto      chunked from AUTO_CHUNKED_MIN_TOKENS tokens per clip on, dense below.

The chunked implementation's kernel follows the backend (`chunked_kernel`):
  portable  the XLA loops above: CPU, and GPU/TPU where no fused kernel applies. What CI tests.
  cudnn     GPU, bf16/fp16: `jax.nn.dot_product_attention(implementation='cudnn')`, a fused flash
            kernel; the mask (from iota) becomes a [T·L, T·L] bf16 bias shared by the batch and
            heads; kmct blocks after the query are computed and masked, not skipped.
  splash    TPU: Pallas splash attention with the Kronecker rule as a computed mask (in the
            kernel, from the token ids; fully masked blocks are skipped, so kmct skips the key
            frames after the query). T·L is padded to a multiple of 128.
The cudnn and splash kernels were written without the hardware: they are untested on GPU/TPU
(the splash mask is tested here in Pallas' interpret mode). A kernel that rejects its inputs when
the program is traced falls back to the portable one, with a warning.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from claver_jax.models.clip import attention

MASK_KINDS = ('kmt', 'kmct', 'spatial', 'joint', 'pipeline')
ATTENTION_IMPLEMENTATIONS = ('dense', 'chunked', 'auto')
CHUNKED_KERNELS = ('portable', 'cudnn', 'splash')
# Kinds whose key chunks other than the query's own are either wholly allowed or never computed.
BLOCKWISE_KINDS = ('kmt', 'kmct', 'joint')

# 'auto' is chunked from this many tokens per clip (T·L) on. Below, dense's scores are small (at
# 400 tokens, 7.7 MB per clip and layer at 12 heads) and the loops cost more than they save:
# chunked/dense time of KMT's forward + backward on the CPU (benchmarks/kronecker_attention.py,
# batches of ~3200 tokens; dense heads-major, two runs on a shared machine) was 2.5-3.6 at 80
# tokens, 1.7-2.1 at 208, 1.09-1.12 at 400, 0.69-1.11 at 600 and 800, where chunked keeps far
# less memory.
AUTO_CHUNKED_MIN_TOKENS = 512
SPLASH_BLOCK = 128


def allowed(kind: str, query_ids, key_ids, tokens_per_frame: int):
  """True where query token `query_ids` may attend to key token `key_ids` (broadcast int arrays,
  numpy or jax, frame-major token ids)."""
  l = tokens_per_frame
  if kind == 'kmt':
    return (query_ids // l != key_ids // l) | (query_ids == key_ids)
  if kind == 'kmct':
    return (key_ids // l < query_ids // l) | (query_ids == key_ids)
  if kind == 'spatial':
    return query_ids // l == key_ids // l
  if kind == 'joint':
    return (query_ids == query_ids) & (key_ids == key_ids)
  if kind == 'pipeline':
    return query_ids % l == key_ids % l
  raise ValueError(f'Unknown mask {kind!r}; choose one of {MASK_KINDS}.')


@functools.lru_cache(maxsize=None)
def kronecker_mask(kind: str, num_frames: int, tokens_per_frame: int) -> np.ndarray:
  """-> bool [T·L, T·L] on the host; True where query token i may attend to key token j.
  For tests and inspection: the model builds its masks in the program."""
  ids = np.arange(num_frames * tokens_per_frame)
  mask = np.asarray(allowed(kind, ids[:, None], ids[None, :], tokens_per_frame))
  mask.setflags(write=False)  # Shared by every caller through the cache.
  return mask


def resolve_implementation(implementation: str, num_frames: int, tokens_per_frame: int) -> str:
  """'dense' | 'chunked' | 'auto' -> 'dense' | 'chunked' for clips of T frames of L tokens."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention={implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.')
  if implementation == 'auto':
    return 'chunked' if num_frames * tokens_per_frame >= AUTO_CHUNKED_MIN_TOKENS else 'dense'
  return implementation


def chunked_kernel(dtype) -> str:
  """The chunked implementation's kernel on the default backend for activations of `dtype`."""
  backend = jax.default_backend()
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  if backend == 'tpu':
    return 'splash'
  return 'portable'


def kronecker_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kind: str, num_frames: int,
                        implementation: str = 'auto', kernel: str | None = None,
                        chunk_frames: int = 1) -> jax.Array:
  """q, k, v [B, T·L, H, Dh] in frame-major order -> [B, T·L, H, Dh], attention under `kind`.

  implementation: 'dense' | 'chunked' | 'auto' (see the module docstring).
  kernel: the chunked kernel, 'portable' | 'cudnn' | 'splash'; None = `chunked_kernel(q.dtype)`.
  chunk_frames: frames per query chunk of the portable kernel; it must divide T.
  """
  s = q.shape[1]
  if kind not in MASK_KINDS:
    raise ValueError(f'Unknown mask {kind!r}; choose one of {MASK_KINDS}.')
  if s % num_frames:
    raise ValueError(f'{s} tokens are not {num_frames} frames of equal length.')
  l = s // num_frames
  heads_first = lambda x: x.transpose(0, 2, 1, 3)                 # [B, H, T·L, Dh] and back
  if resolve_implementation(implementation, num_frames, l) == 'dense':
    ids = lax.iota(jnp.int32, s)
    mask = None if kind == 'joint' else allowed(kind, ids[:, None], ids[None, :], l)[None, None]
    return heads_first(attention(heads_first(q), heads_first(k), heads_first(v), mask=mask))
  kernel = kernel or chunked_kernel(q.dtype)
  if kernel not in CHUNKED_KERNELS:
    raise ValueError(f'kernel={kernel!r}; choose one of {CHUNKED_KERNELS}.')
  if kernel != 'portable':
    try:
      fused = _cudnn_attention if kernel == 'cudnn' else _splash_attention
      return fused(q, k, v, kind, num_frames)
    except (ValueError, NotImplementedError, RuntimeError) as e:
      logging.warning('The %s attention kernel rejected these inputs (%s: %s); using the portable '
                      'chunked kernel.', kernel, type(e).__name__, e)
  if num_frames % chunk_frames:
    raise ValueError(f'chunk_frames={chunk_frames} must divide the {num_frames} frames.')
  out = _chunked(heads_first(q), heads_first(k), heads_first(v), kind, num_frames, chunk_frames)
  return heads_first(out)


# ---------------------------------------------------------------------------------------------
# The portable chunked kernel: [B, H, T·L, Dh] layout, fp32 scores and statistics
# ---------------------------------------------------------------------------------------------
def _num_other_chunks(kind: str, i, n: int):
  """How many key chunks besides its own query chunk i attends to, all of their tokens."""
  return i if kind == 'kmct' else n - 1


def _other_chunk(kind: str, i, r, n: int):
  """The r-th of them: the earlier chunks (kmct), or the n - 1 others from i + 1 on, cyclically."""
  return r if kind == 'kmct' else (i + 1 + r) % n


def _block_mask(kind: str, q_start, q_size: int, k_start, k_size: int, l: int):
  """-> bool [q_size, k_size]: the rule for query tokens from q_start, keys from k_start."""
  q_ids = q_start + lax.iota(jnp.int32, q_size)
  k_ids = k_start + lax.iota(jnp.int32, k_size)
  return allowed(kind, q_ids[:, None], k_ids[None, :], l)


def _scores(q, k, mask, scale):
  """q [B, H, Q, Dh], k [B, H, K, Dh] -> fp32 [B, H, Q, K], -inf where the mask forbids."""
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _weighted_values(p, v):
  return jnp.einsum('bhqk,bhkd->bhqd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _slice(x, start, size):
  return lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _add_to_slice(x, update, start):
  return lax.dynamic_update_slice_in_dim(x, _slice(x, start, update.shape[2]) + update, start,
                                         axis=2)


def _forward(q, k, v, kind, num_frames, chunk_frames):
  """-> out [B, H, S, Dh] (q's dtype), log-sum-exp fp32 [B, H, S]."""
  b, h, s, d = q.shape
  l = s // num_frames
  rows = chunk_frames * l
  n = num_frames // chunk_frames
  scale = d ** -0.5

  def query_chunk(i, carry):
    out, lse = carry
    start = i * rows
    q_i = _slice(q, start, rows)
    if kind in BLOCKWISE_KINDS:
      # The chunk's own frames first (masked; they always hold self), then the other key chunks
      # whole, with an online softmax (running max and sum).
      scores = _scores(q_i, _slice(k, start, rows),
                       _block_mask(kind, start, rows, start, rows, l), scale)
      m = scores.max(-1)
      p = jnp.exp(scores - m[..., None])
      total, acc = p.sum(-1), _weighted_values(p, _slice(v, start, rows))

      def key_chunk(r, state):
        m, total, acc = state
        j = _other_chunk(kind, i, r, n) * rows
        scores = _scores(q_i, _slice(k, j, rows), None, scale)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        decay = jnp.exp(m - m_new)
        return (m_new, decay * total + p.sum(-1),
                decay[..., None] * acc + _weighted_values(p, _slice(v, j, rows)))

      m, total, acc = lax.fori_loop(0, _num_other_chunks(kind, i, n), key_chunk, (m, total, acc))
    else:
      mask = _block_mask(kind, start, rows, 0, s, l)
      scores = _scores(q_i, k, mask, scale)
      m = scores.max(-1)
      p = jnp.exp(scores - m[..., None])
      total, acc = p.sum(-1), _weighted_values(p, v)
    out = lax.dynamic_update_slice_in_dim(out, (acc / total[..., None]).astype(out.dtype), start,
                                          axis=2)
    lse = lax.dynamic_update_slice_in_dim(lse, m + jnp.log(total), start, axis=2)
    return out, lse

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, h, s), jnp.float32))
  return lax.fori_loop(0, n, query_chunk, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(q, k, v, kind, num_frames, chunk_frames):
  """q, k, v [B, H, S, Dh] -> [B, H, S, Dh]."""
  return _forward(q, k, v, kind, num_frames, chunk_frames)[0]


def _chunked_fwd(q, k, v, kind, num_frames, chunk_frames):
  out, lse = _forward(q, k, v, kind, num_frames, chunk_frames)
  return out, (q, k, v, out, lse)


def _chunked_bwd(kind, num_frames, chunk_frames, residuals, d_out):
  """The flash-attention backward pass: each chunk's scores are recomputed, never stored."""
  q, k, v, out, lse = residuals
  b, h, s, d = q.shape
  l = s // num_frames
  rows = chunk_frames * l
  n = num_frames // chunk_frames
  scale = d ** -0.5
  # D_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax's backward pass needs no row of P.
  delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)

  def block_grads(q_i, d_out_i, lse_i, delta_i, k_j, v_j, mask):
    """-> dq_i, dk_j, dv_j (fp32) of one block of scores."""
    p = jnp.exp(_scores(q_i, k_j, mask, scale) - lse_i[..., None])   # 0 where masked
    dv = jnp.einsum('bhqk,bhqd->bhkd', p.astype(d_out_i.dtype), d_out_i,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum('bhqd,bhkd->bhqk', d_out_i, v_j, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_i[..., None]) * scale
    dq = jnp.einsum('bhqk,bhkd->bhqd', ds.astype(k_j.dtype), k_j,
                    preferred_element_type=jnp.float32)
    dk = jnp.einsum('bhqk,bhqd->bhkd', ds.astype(q_i.dtype), q_i,
                    preferred_element_type=jnp.float32)
    return dq, dk, dv

  def query_chunk(i, carry):
    dq, dk, dv = carry
    start = i * rows
    q_i, d_out_i = _slice(q, start, rows), _slice(d_out, start, rows)
    lse_i, delta_i = _slice(lse, start, rows), _slice(delta, start, rows)
    if kind in BLOCKWISE_KINDS:
      dq_i, dk_i, dv_i = block_grads(q_i, d_out_i, lse_i, delta_i, _slice(k, start, rows),
                                     _slice(v, start, rows),
                                     _block_mask(kind, start, rows, start, rows, l))
      dk, dv = _add_to_slice(dk, dk_i, start), _add_to_slice(dv, dv_i, start)

      def key_chunk(r, state):
        dq_i, dk, dv = state
        j = _other_chunk(kind, i, r, n) * rows
        dq_ij, dk_j, dv_j = block_grads(q_i, d_out_i, lse_i, delta_i, _slice(k, j, rows),
                                        _slice(v, j, rows), None)
        return dq_i + dq_ij, _add_to_slice(dk, dk_j, j), _add_to_slice(dv, dv_j, j)

      dq_i, dk, dv = lax.fori_loop(0, _num_other_chunks(kind, i, n), key_chunk, (dq_i, dk, dv))
    else:
      mask = _block_mask(kind, start, rows, 0, s, l)
      dq_i, dk_all, dv_all = block_grads(q_i, d_out_i, lse_i, delta_i, k, v, mask)
      dk, dv = dk + dk_all, dv + dv_all
    return lax.dynamic_update_slice_in_dim(dq, dq_i, start, axis=2), dk, dv

  zeros = jnp.zeros(q.shape, jnp.float32)
  dq, dk, dv = lax.fori_loop(0, n, query_chunk, (zeros, zeros, zeros))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------------
# Fused kernels (untested on their hardware; see the module docstring)
# ---------------------------------------------------------------------------------------------
def _cudnn_attention(q, k, v, kind, num_frames):
  """GPU: cuDNN's fused flash attention in bf16/fp16; the mask, from iota, becomes its bias."""
  s = q.shape[1]
  ids = lax.iota(jnp.int32, s)
  mask = None if kind == 'joint' else allowed(kind, ids[:, None], ids[None, :], s // num_frames)
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None, None],
                                      implementation='cudnn')


def _splash_attention(q, k, v, kind, num_frames):
  """TPU: Pallas splash attention, the Kronecker rule computed in the kernel. Under a mesh
  (`jax.set_mesh`), each device runs it on its part of the batch (shard_map over every mesh
  axis, the batch's sharding in this project); on several devices without one, it declines."""
  b, s, h, d = q.shape
  padded = -(-s // SPLASH_BLOCK) * SPLASH_BLOCK
  kernel = _splash_kernel(kind, s // num_frames, s, padded, h, jax.default_backend() == 'cpu')

  def attend(q, k, v):   # [B', S, H, Dh] -> [B', S, H, Dh]
    pad = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - s), (0, 0)))
    out = jax.vmap(kernel)(pad(q * d ** -0.5), pad(k), pad(v))
    return out[:, :, :s].transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty and jax.device_count() > 1:
    # Without the mesh, XLA would gather the whole batch on every device for the kernel.
    raise ValueError(f'splash attention over {jax.device_count()} devices needs the mesh set '
                     'with jax.set_mesh around the jitted step')
  if mesh.empty or mesh.size == 1:
    return attend(q, k, v)
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)


@functools.lru_cache(maxsize=None)
def _splash_kernel(kind: str, tokens_per_frame: int, length: int, padded: int, heads: int,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class KroneckerMask(sm._ComputableMask):  # pylint: disable=protected-access
    """The rule of `kind` over `length` real tokens; a padded query attends only to itself."""

    def __init__(self):
      def mask_function(query_ids, key_ids):
        real_query = query_ids < length
        rule = allowed(kind, query_ids, key_ids, tokens_per_frame) & (key_ids < length)
        return (real_query & rule) | (~real_query & (query_ids == key_ids))
      super().__init__(shape=(padded, padded), mask_function=mask_function)

    def __eq__(self, other):
      return type(other) is type(self)

    def __hash__(self):
      return hash((kind, tokens_per_frame, length, padded))

  one = KroneckerMask()
  block = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)

