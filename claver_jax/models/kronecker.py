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

The chunked implementation's kernel follows the platform the program is for (`chunked_kernel`:
the mesh set with `jax.set_mesh`, so a TPU slice's when compiling for one from a CPU host, else
JAX's default backend):
  portable  the XLA loops above: CPU, and GPU/TPU where no fused kernel applies. What CI tests.
  cudnn     GPU, bf16/fp16: `jax.nn.dot_product_attention(implementation='cudnn')`, a fused flash
            kernel. With a mask (every kind but joint) it is used only where the attention is not
            differentiated (evaluation): JAX 0.10.2 turns the mask into a bias and computes that
            bias's whole [B, H, T·L, T·L] gradient, so under differentiation (training) the same
            op runs the portable kernel's forward and backward (a custom VJP).
  splash    TPU: Pallas splash attention with the Kronecker rule as a computed mask (in the
            kernel, from the token ids; fully masked blocks are skipped, so kmct skips the key
            frames after the query). T·L is padded to a multiple of 128. Under a mesh each device
            runs it on its part of the batch (`jax.shard_map`).
A fused kernel that rejects its inputs when the program is traced falls back to the portable one
with a warning that names why (once per reason), and the choice is recorded for the run's
start-up summary (`kernel_report`); claver_jax.aot catches failures when the whole program
is compiled and compiles it again with `portable_kernels_only()`. The cudnn and splash kernels
were written without the hardware: the splash kernel is compiled for TPU slice descriptions
(libtpu) and run in Pallas' interpret mode on the CPU; cuDNN's is not exercised here.
"""

from __future__ import annotations

import contextlib
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


GPU_PLATFORMS = ('gpu', 'cuda')
_portable_only = [False]             # Set by `portable_kernels_only`.
_kernel_report: dict[tuple, tuple[str, str]] = {}   # -> (kernel, summary line)
_warned: set[tuple[str, str]] = set()
_unrolled = [False]                  # Set by `unrolled_loops`.


def target_platform() -> str:
  """The platform of the program being traced: the mesh's set with `jax.set_mesh` (a TPU slice's
  when compiling for one from a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def chunked_kernel(dtype, platform: str | None = None) -> str:
  """The chunked implementation's kernel for activations of `dtype` on `platform` (default:
  `target_platform()`); 'portable' inside `portable_kernels_only()`."""
  platform = platform or target_platform()
  if _portable_only[0]:
    return 'portable'
  if platform in GPU_PLATFORMS and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  if platform == 'tpu':
    return 'splash'
  return 'portable'


@contextlib.contextmanager
def portable_kernels_only():
  """Programs traced inside use the portable chunked kernel only (after a fused kernel failed to
  compile)."""
  _portable_only[0] = True
  try:
    yield
  finally:
    _portable_only[0] = False


def loops_unrolled() -> bool:
  """True inside `unrolled_loops()` (step.py's accumulation scan unrolls there too)."""
  return _unrolled[0]


@contextlib.contextmanager
def unrolled_loops():
  """The portable kernel's loops are traced as straight-line code inside, so that XLA's cost
  analysis, which counts a loop's body once, counts every block (`claver_jax.flops`)."""
  _unrolled[0] = True
  try:
    yield
  finally:
    _unrolled[0] = False


def kernel_report() -> list[str]:
  """One line per temporal attention traced since `clear_kernel_report()`: its mask, tokens and
  the kernel that computes it (with the reason for any fallback)."""
  return [line for _, line in _kernel_report.values()]


def fused_kernels_traced() -> set[str]:
  """The fused kernels ('cudnn', 'splash') in programs traced since `clear_kernel_report()`."""
  return {kernel for kernel, _ in _kernel_report.values()} & {'cudnn', 'splash'}


def clear_kernel_report() -> None:
  _kernel_report.clear()


def _record(kind: str, q, num_frames: int, kernel: str, line: str) -> None:
  b, s, h, d = q.shape
  key = (kind, s, num_frames, h, d, str(q.dtype))
  _kernel_report[key] = (kernel, f'{kind} attention over {num_frames} frames x {s // num_frames} '
                                 f'tokens ({h} heads of {d}, {q.dtype}): {line}')


def _fall_back(kernel: str, error: Exception) -> str:
  """Warns once per (kernel, reason) that `kernel` rejected its inputs; -> the reason."""
  reason = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
  if (kernel, reason) not in _warned:
    _warned.add((kernel, reason))
    logging.warning('The %s attention kernel rejected these inputs (%s); using the portable '
                    'chunked kernel, which is exact but slower.', kernel, reason)
  return reason


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
    _record(kind, q, num_frames, 'dense', 'dense (the whole score matrix)')
    ids = lax.iota(jnp.int32, s)
    mask = None if kind == 'joint' else allowed(kind, ids[:, None], ids[None, :], l)[None, None]
    return heads_first(attention(heads_first(q), heads_first(k), heads_first(v), mask=mask))
  kernel = kernel or chunked_kernel(q.dtype)
  if kernel not in CHUNKED_KERNELS:
    raise ValueError(f'kernel={kernel!r}; choose one of {CHUNKED_KERNELS}.')
  portable = 'portable chunked kernel'
  if kernel != 'portable':
    try:
      if kernel == 'cudnn':
        out = _cudnn_attention(q, k, v, kind, num_frames)
        _record(kind, q, num_frames, 'cudnn', 'cudnn' if kind == 'joint' else
                f'cudnn where not differentiated (evaluation), the {portable} under '
                'differentiation (no gradient of the mask as a bias)')
      else:
        out = _splash_attention(q, k, v, kind, num_frames)
        _record(kind, q, num_frames, 'splash', 'splash')
      return out
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
      portable = f'{portable} ({kernel} rejected it: {_fall_back(kernel, e)})'
  if num_frames % chunk_frames:
    raise ValueError(f'chunk_frames={chunk_frames} must divide the {num_frames} frames.')
  _record(kind, q, num_frames, 'portable', portable)
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


def _loop(count, body, carry):
  """lax.fori_loop(0, count, body, carry); straight-line code inside `unrolled_loops()`."""
  if not _unrolled[0]:
    return lax.fori_loop(0, count, body, carry)
  for i in range(count):
    carry = body(i, carry)
  return carry


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

      m, total, acc = _loop(_num_other_chunks(kind, i, n), key_chunk, (m, total, acc))
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
  return _loop(n, query_chunk, init)


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

      dq_i, dk, dv = _loop(_num_other_chunks(kind, i, n), key_chunk, (dq_i, dk, dv))
    else:
      mask = _block_mask(kind, start, rows, 0, s, l)
      dq_i, dk_all, dv_all = block_grads(q_i, d_out_i, lse_i, delta_i, k, v, mask)
      dk, dv = dk + dk_all, dv + dv_all
    return lax.dynamic_update_slice_in_dim(dq, dq_i, start, axis=2), dk, dv

  zeros = jnp.zeros(q.shape, jnp.float32)
  dq, dk, dv = _loop(n, query_chunk, (zeros, zeros, zeros))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------------
# Fused kernels (untested on their hardware; see the module docstring)
# ---------------------------------------------------------------------------------------------
def _cudnn_attention(q, k, v, kind, num_frames):
  """GPU: cuDNN's fused flash attention in bf16/fp16, q, k, v [B, S, H, Dh]. Without a mask
  (joint), forward and backward; with one, see `_cudnn_evaluation`."""
  if kind == 'joint':
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  return _cudnn_evaluation(q, k, v, kind, num_frames)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _cudnn_evaluation(q, k, v, kind, num_frames):
  """cuDNN with the mask (from iota) as its bias where this is not differentiated; under
  differentiation the portable kernel's forward and backward (`_portable_fwd`, `_portable_bwd`):
  JAX 0.10.2's cuDNN backward computes the bias's whole [B, H, S, S] gradient."""
  s = q.shape[1]
  ids = lax.iota(jnp.int32, s)
  mask = allowed(kind, ids[:, None], ids[None, :], s // num_frames)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation='cudnn')


def _portable_fwd(q, k, v, kind, num_frames):
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  q, k, v = heads_first(q), heads_first(k), heads_first(v)
  out, lse = _forward(q, k, v, kind, num_frames, 1)
  return heads_first(out), (q, k, v, out, lse)


def _portable_bwd(kind, num_frames, residuals, d_out):
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  grads = _chunked_bwd(kind, num_frames, 1, residuals, heads_first(d_out))
  return tuple(heads_first(g) for g in grads)


_cudnn_evaluation.defvjp(_portable_fwd, _portable_bwd)


def _splash_attention(q, k, v, kind, num_frames):
  """TPU: Pallas splash attention, the Kronecker rule computed in the kernel. Under a mesh
  (`jax.set_mesh`), each device runs it on its part of the batch (shard_map over every mesh
  axis, the batch's sharding in this project); on several devices without one, it declines.
  Off a TPU (tests) it runs in Pallas' interpreter."""
  b, s, h, d = q.shape
  padded = -(-s // SPLASH_BLOCK) * SPLASH_BLOCK
  kernel = _splash_kernel(kind, s // num_frames, s, padded, h, target_platform() != 'tpu')

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
  if b % mesh.size:
    raise ValueError(f'a batch of {b} clips does not split over the {mesh.size} devices')
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  # The Pallas call has no varying-manual-axes rule: check_vma=True rejects it.
  return jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


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

