"""Kronecker attention masks over the T·L tokens of a clip, in frame-major order (t·L + l).

Each mask is a boolean "may attend" matrix [T·L, T·L] for `jax.nn.dot_product_attention`:
  kmt       I_TL OR kron(1_T - I_T, 1_LxL)    self, and every token of every other frame
  kmct      I_TL OR kron(tril(1_T, -1), 1_LxL) self, and every token of earlier frames
  spatial   kron(I_T, 1_LxL)                  every token of the same frame
  joint     all true                          every token of the clip
  pipeline  kron(1_T, I_L)                    the same spatial position in every frame

Masks are built once per (kind, T, L) and cached as host constants; under `jit` they are folded
into the program, never rebuilt per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MASK_KINDS = ('kmt', 'kmct', 'spatial', 'joint', 'pipeline')


@functools.lru_cache(maxsize=None)
def kronecker_mask(kind: str, num_frames: int, tokens_per_frame: int) -> np.ndarray:
  """-> bool [T·L, T·L]; True where query token i may attend to key token j."""
  if kind not in MASK_KINDS:
    raise ValueError(f'Unknown mask {kind!r}; choose one of {MASK_KINDS}.')
  t, l = num_frames, tokens_per_frame
  # Evaluated eagerly even when first reached inside a jit trace; jnp.kron rejects bool, so the
  # factors are ints and the result is compared afterwards.
  with jax.ensure_compile_time_eval():
    eye_tl = jnp.eye(t * l, dtype=jnp.int32)
    ones_ll = jnp.ones((l, l), jnp.int32)
    if kind == 'kmt':
      mask = eye_tl + jnp.kron(1 - jnp.eye(t, dtype=jnp.int32), ones_ll)
    elif kind == 'kmct':
      mask = eye_tl + jnp.kron(jnp.tril(jnp.ones((t, t), jnp.int32), -1), ones_ll)
    elif kind == 'spatial':
      mask = jnp.kron(jnp.eye(t, dtype=jnp.int32), ones_ll)
    elif kind == 'joint':
      mask = jnp.ones((t * l, t * l), jnp.int32)
    else:
      mask = jnp.kron(jnp.ones((t, t), jnp.int32), jnp.eye(l, dtype=jnp.int32))
    mask = np.asarray(mask > 0)
  mask.setflags(write=False)  # Shared by every caller through the cache.
  return mask
