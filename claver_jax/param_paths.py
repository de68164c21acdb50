"""Dotted parameter paths ('visual.blocks.0.attn.qkv.kernel'): the names that parameter groups,
sharding rules and model directories use for a model's arrays."""

from __future__ import annotations

import jax


def path_str(path: tuple) -> str:
  """An nnx path (str/int keys) or a jax key path (DictKey, ..., GetAttrKey('value') of an nnx
  Variable) -> 'visual.blocks.0.attn.qkv.kernel'."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      continue
    parts.append(str(getattr(k, 'key', getattr(k, 'idx', k))))
  return '.'.join(parts)
