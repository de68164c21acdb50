"""The demo config shrunk for tests: 16 px clips of 4 frames, a 1-layer ViT, batch 8. The argument
is the demo's ('motion_prompts')."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    'demo_config', Path(__file__).resolve().parent.parent / 'configs' / 'demo.py')
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(arg=None):
  c = _demo.get_config(arg)
  c.model.clip.update(dict(embed_dim=32, patch_size=8, vision_width=64, vision_layers=1,
                           vision_heads=1, vision_mlp_dim=128, context_length=32, text_width=32,
                           text_layers=1, text_heads=1, text_mlp_dim=64))
  c.data.num_frames = 4
  c.data.image_size = 16
  c.data.synthetic_size = 32
  c.data.synthetic_frames = 8
  c.data.synthetic_videos = 96
  c.train.batch_size = 8
  c.train.epochs = 1
  c.eval.batch_size = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  return c
