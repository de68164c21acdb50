"""TPU slices described by libtpu, for compiling without the hardware.

    devices = topologies.tpu_devices('v5e:4x4')     # 16 compile-only TPU v5e devices, 4 hosts
    mesh = sharding.make_mesh(config.mesh, devices=devices)

`jax.experimental.topologies.get_topology_desc` gives the devices of a named slice as libtpu lays
them out (chip coordinates, the host that drives each): jit can lower and compile for them, and
XLA's TPU compiler reports the program's per-device memory, on a machine without a TPU. It
needs libtpu (`pip install -e '.[tpu]'`). TOPOLOGIES lists the slices the tests and the docs
use, with their hosts' shapes as Cloud TPU builds them: v4 and multi-host v5e/v6e slices have 4
chips per host (2x2), v5e/v6e 2x4 is one host of 8 chips, v4 runs one megacore device per chip.
"""

from __future__ import annotations

import functools
import os

# name -> (chip config, chips per host (x, y, z), memory per chip in bytes, peak bf16 TFLOP/s)
GiB = 2 ** 30
TOPOLOGIES = {
    'v4:2x2x1': ('megacore', (2, 2, 1), 32 * GiB, 275),
    'v4:2x2x4': ('megacore', (2, 2, 1), 32 * GiB, 275),
    'v5e:2x2': ('default', (2, 2, 1), 16 * GiB, 197),
    'v5e:2x4': ('default', (2, 4, 1), 16 * GiB, 197),
    'v5e:4x4': ('default', (2, 2, 1), 16 * GiB, 197),
    'v5e:8x8': ('default', (2, 2, 1), 16 * GiB, 197),
    'v6e:2x4': ('default', (2, 4, 1), 32 * GiB, 918),
    'v6e:4x4': ('default', (2, 2, 1), 32 * GiB, 918),
}


def have_libtpu() -> bool:
  """True when libtpu is installed (the `tpu` extra), so topologies can be described."""
  import importlib.util
  return importlib.util.find_spec('libtpu') is not None


@functools.lru_cache(maxsize=None)
def tpu_devices(name: str) -> tuple:
  """The compile-only devices of the slice `name` (a key of TOPOLOGIES), in libtpu's order; each
  has .process_index (its host), .coords and .device_kind. Raises ValueError for an unknown name
  or without libtpu."""
  if name not in TOPOLOGIES:
    raise ValueError(f'Unknown TPU topology {name!r}; choose one of {sorted(TOPOLOGIES)}.')
  if not have_libtpu():
    raise ValueError(f'Describing the TPU slice {name} needs libtpu: '
                     "pip install -e '.[tpu]' (no TPU needed).")
  from jax._src import cloud_tpu_init
  from jax.experimental import topologies
  if not getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False):
    # Off a TPU VM, libtpu finds no metadata and prints half a screen of warnings as it starts;
    # these values only quiet that (a topology description does not read them).
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v4-8')
    # Compiling needs no chip: let several processes (tests, a run beside a memory check) load
    # libtpu at once instead of failing on its machine-wide /tmp/libtpu_lockfile.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  chip_config, chips_per_host, _, _ = TOPOLOGIES[name]
  return tuple(topologies.get_topology_desc(
      name, 'tpu', chip_config_name=chip_config, chips_per_host_bounds=chips_per_host,
      num_slices=1).devices)


def chip_memory(name: str) -> int:
  """HBM bytes per chip of the slice `name`."""
  return TOPOLOGIES[name][2]


def peak_tflops(name: str) -> float:
  """Peak bf16 TFLOP/s per chip of the slice `name` (Cloud TPU's published figures)."""
  return TOPOLOGIES[name][3]
