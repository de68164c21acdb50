"""The device mesh, how parameters are laid out on it, and host batches -> global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
parameters and optimizer state are sharded too). The batch is split over both. Parameters
follow RULES: the first regex that matches a parameter's path gives its PartitionSpec; a
dimension that does not divide by the fsdp size stays replicated.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from claver_jax.models.io import path_str

AXES = ('data', 'fsdp')
BATCH = P(AXES)

# (regex on the parameter path, spec of its dimensions). Kernels are [in, out].
# X-CLIP's message_attn and MIT blocks are covered by the attention and MLP rules.
RULES: tuple[tuple[str, P], ...] = (
    (r'(qkv|c_fc|message_fc|[qkv]_proj)\.kernel$', P('fsdp', None)),
    # Motion prompts' maps to and from its width, and its concatenated streams.
    (r'(^|\.)(down|motion\.fuse)\.kernel$', P('fsdp', None)),
    (r'(^|\.)(up|video_up|text_up)\.kernel$', P(None, 'fsdp')),
    (r'(attn\.out|c_proj|cross_attn\.proj)\.kernel$', P(None, 'fsdp')),
    (r'token_embedding\.embedding$', P('fsdp', None)),
    (r'conv1\.kernel$', P(None, None, None, 'fsdp')),
    (r'(visual\.proj|text_projection|prompts_visual_proj)$', P('fsdp', None)),
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


def spec_for(path: str, shape: tuple[int, ...], fsdp_size: int) -> P:
  """The PartitionSpec of one parameter (or of optimizer state shaped like it)."""
  for pattern, spec in RULES:
    if re.search(pattern, path):
      break
  if len(spec) != len(shape) or any(
      axis == 'fsdp' and dim % fsdp_size for axis, dim in zip(spec, shape)):
    return P()
  return spec


def state_shardings(mesh: jax.sharding.Mesh, state: Any) -> Any:
  """NamedShardings for every leaf of `state` (params, optimizer moments, counters)."""
  fsdp = mesh.shape['fsdp']
  specs = jax.tree_util.tree_map_with_path(
      lambda p, x: spec_for(path_str(p), tuple(np.shape(x)), fsdp), state)
  sharded = sum(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))
  logging.info('Sharding %d state arrays over fsdp=%d.', sharded, fsdp)
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
