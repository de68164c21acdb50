"""Video input: sources, sampling, augmentation, grain pipelines, mixup, the synthetic motion set.

    from claver_jax.data import build_pipelines, default_config, make_global_batch, normalize

See `pipeline` for the host-batch contract and `default_config()` for config.data. Names are
imported on first use, so `python -m claver_jax.data.synthetic` does not import its own module
twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    'build_pipelines': 'pipeline', 'default_config': 'pipeline', 'make_global_batch': 'pipeline',
    'Pipelines': 'pipeline', 'SubstitutionLog': 'pipeline', 'mixup_cutmix': 'mixup',
    'normalize': 'transforms', 'CLIP_MEAN': 'transforms', 'CLIP_STD': 'transforms',
    'DataError': 'labels', 'read_labels': 'labels', 'read_list': 'sources',
    'VideoError': 'video', 'open_video': 'video', 'train_indices': 'video',
    'eval_indices': 'video', 'CLASS_NAMES': 'synthetic'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
