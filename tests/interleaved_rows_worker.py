"""One process of test_launch.py's interleaved-mesh run (not a test module): joins the run
named by the CLAVER_* environment, builds a mesh whose device order interleaves the processes
(as TPU slices do), reads its rows of the synthetic train stream, assembles two global batches
and, in process 0, saves them, gathered, to argv[1] (.npz)."""

from __future__ import annotations

import sys

from claver_jax import distributed

distributed.initialize()

import jax  # noqa: E402  (after jax.distributed starts)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from claver_jax import sharding  # noqa: E402
from claver_jax.data import build_pipelines, make_global_batch  # noqa: E402
from helpers import synthetic_train_config  # noqa: E402

GLOBAL_BATCH = 8


def main(out: str) -> None:
  per_process = jax.local_device_count()
  # Device j of every process before device j + 1 of any: process p holds blocks p, p + N, ...
  devices = sorted(jax.devices(), key=lambda d: (d.id % per_process, d.process_index))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=devices)
  rows = sharding.process_rows(mesh, GLOBAL_BATCH)
  cfg = synthetic_train_config(batch_size=GLOBAL_BATCH // jax.process_count())
  iterator = iter(build_pipelines(cfg, train_rows=rows).train)
  batches = [make_global_batch(next(iterator), sharding.batch_sharding(mesh)) for _ in range(2)]
  gathered = multihost_utils.process_allgather(batches, tiled=True)
  if jax.process_index() == 0:
    np.savez(out, rows=np.asarray(rows), **{f'{k}{i}': np.asarray(b[k])
                                           for i, b in enumerate(gathered) for k in b})
  iterator.close()


if __name__ == '__main__':
  main(sys.argv[1])
