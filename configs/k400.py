r"""Kinetics-400: the model and input shape of each of the paper's variants.

Presets, in any order and combination: an architecture (B32, B16, L14, L14_336), a frame count
(8, 16, 32) and a temporal head (kmt, kmct, joint, pipeline, cls_only, mean). Defaults: B16,8,kmt.

    python -m claver_jax.flops --config=configs/k400.py:B16,16

reports per-view GFLOPs for ViT-B/16 with 16 frames. Training on Kinetics-400 (optimizer, data
paths, schedule) and its expected accuracy arrive with the training work.
"""

import ml_collections

from claver_jax.presets import parse_preset


def get_config(arg=None):
  preset = parse_preset(arg)
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  config.model.arch = preset['arch']
  config.model.temporal = preset['temporal']
  # None: a third of the ViT's depth, as in the paper; its ablation also uses 1 and 1/6.
  config.model.temporal_layers = ml_collections.config_dict.placeholder(int)
  config.data = ml_collections.ConfigDict()
  config.data.num_frames = preset['num_frames']
  config.data.image_size = 336 if preset['arch'] == 'L14_336' else 224
  return config
