"""The device mesh, how parameters are laid out on it, and host batches -> global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
parameters and optimizer state are sharded too). The batch is split over both. Parameters
follow their family's sharding rules (Family.sharding_rules, for its own parts), then RULES (the
CLIP towers' and the shared layers'): the first regex that matches a parameter's path gives its
PartitionSpec; a dimension that does not divide by the fsdp size stays replicated. Each parameter
that stays replicated over fsdp > 1 is logged once, with why.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from claver_jax.param_paths import path_str

AXES = ('data', 'fsdp')
BATCH = P(AXES)

Rules = tuple[tuple[str, P], ...]

# (regex on the parameter path, spec of its dimensions), after a family's own. Kernels are
# [in, out]. CLIP's attention and MLP (models/clip.py) are also every family's temporal blocks
# (CLAVER's temporal transformer, X-CLIP's message_attn and MIT, motion prompts' motion blocks).
RULES: Rules = (
    (r'(qkv|c_fc)\.kernel$', P('fsdp', None)),
    (r'(attn\.out|c_proj)\.kernel$', P(None, 'fsdp')),
    (r'token_embedding\.embedding$', P('fsdp', None)),
    (r'conv1\.kernel$', P(None, None, None, 'fsdp')),
    (r'(visual\.proj|text_projection)$', P('fsdp', None)),
    (r'.*', P()),                                  # biases, LayerNorms, embeddings: replicated
)


def default_config() -> ml_collections.ConfigDict:
  """config.mesh: sizes of the data and fsdp axes; -1 takes the devices left over."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = [config.data, config.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1; got data={config.data}, '
                     f'fsdp={config.fsdp}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh: {len(devices)} devices do not divide by {known}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh: data={sizes[0]} x fsdp={sizes[1]} = {int(np.prod(sizes))} '
                     f'devices, but {len(devices)} are available. Use -1 for one axis to fill.')
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def rule_spec(path: str, rules: Rules = ()) -> P:
  """The spec of the first of `rules` (a family's), then of RULES, that matches `path`."""
  return next(spec for pattern, spec in (*rules, *RULES) if re.search(pattern, path))


def unsharded_reason(spec: P, shape: tuple[int, ...], fsdp_size: int) -> str | None:
  """Why a parameter of `shape` cannot take `spec` over fsdp_size devices, or None if it can."""
  if len(spec) != len(shape):
    return f'its rule gives {len(spec)} dims, it has {len(shape)}'
  for i, (axis, dim) in enumerate(zip(spec, shape)):
    if axis == 'fsdp' and dim % fsdp_size:
      return f'dim {i} ({dim}) does not divide by fsdp={fsdp_size}'
  return None


def spec_for(path: str, shape: tuple[int, ...], fsdp_size: int, rules: Rules = ()) -> P:
  """The PartitionSpec of one parameter (or of optimizer state shaped like it); `rules` are
  its family's (Family.sharding_rules), tried before RULES."""
  spec = rule_spec(path, rules)
  return P() if unsharded_reason(spec, shape, fsdp_size) else spec


def log_unsharded(state: Any, fsdp_size: int, rules: Rules = ()) -> list[str]:
  """Logs (INFO) and returns 'path shape: why' for each parameter (nnx.Param) of `state` that
  stays replicated over fsdp_size > 1 devices: no rule shards it, or its shape does not fit
  its rule. Vectors (biases, LayerNorms) are counted, not listed: no rule shards them."""
  if fsdp_size == 1:
    return []
  leaves = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  lines, vectors = [], 0
  for key, leaf in leaves:
    if not isinstance(leaf, nnx.Param):
      continue
    path, shape = path_str(key), tuple(np.shape(leaf))
    spec = rule_spec(path, rules)
    if spec == P() and len(shape) < 2:
      vectors += 1
      continue
    why = 'no rule shards it' if spec == P() else unsharded_reason(spec, shape, fsdp_size)
    if why:
      lines.append(f'{path} {list(shape)}: {why}')
  logging.info('Replicated over fsdp=%d: %d vectors (biases, LayerNorms, scales) and %d '
               'parameters%s', fsdp_size, vectors, len(lines),
               ''.join(f'\n  {line}' for line in lines))
  return lines


def state_shardings(mesh: jax.sharding.Mesh, state: Any, rules: Rules, *,
                    log: bool = True) -> Any:
  """NamedShardings for every leaf of `state` (params, optimizer moments, counters) under the
  model family's sharding `rules` (Family.sharding_rules) and RULES. `log`: log the parameters
  left replicated (log_unsharded); False for a second state of the same model in one run."""
  fsdp = mesh.shape['fsdp']
  specs = jax.tree_util.tree_map_with_path(
      lambda p, x: spec_for(path_str(p), tuple(np.shape(x)), fsdp, rules), state)
  sharded = sum(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))
  logging.info('Sharding %d state arrays over fsdp=%d.', sharded, fsdp)
  if log:
    log_unsharded(state, fsdp, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: jax.sharding.Mesh, global_batch: int,
                 process_index: int | None = None) -> tuple[int, ...]:
  """The rows of a global batch of `global_batch` examples (split over every mesh axis) that
  the devices of process `process_index` (default: this one) hold, ascending: what its input
  pipeline must read. On TPU slices `jax.make_mesh` orders devices by the physical topology,
  so these interleave with other processes' rows (v5e 4x4: hosts 0,0,1,1,1,1,0,2,... own the
  16 blocks of rows). Raises ValueError unless every process holds the same number of rows."""
  process_index = jax.process_index() if process_index is None else process_index
  index_map = batch_sharding(mesh).devices_indices_map((global_batch,))
  owners = np.full(global_batch, -1)
  for device, index in index_map.items():
    owners[index[0]] = device.process_index
  counts = np.bincount(owners, minlength=process_index + 1)
  if len(set(counts[counts > 0])) != 1:
    raise ValueError(f'The mesh gives the processes unequal shares of a batch of {global_batch} '
                     f'rows ({counts.tolist()}); use a batch size that divides by the '
                     f'{mesh.size} devices.')
  return tuple(int(row) for row in np.flatnonzero(owners == process_index))
