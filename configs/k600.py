r"""Kinetics-600, fully supervised: configs/k400.py with Kinetics-600's classes and prompts.

    python -m claver_jax.main --config=configs/k600.py:B16,8,kmt --workdir=runs/k600_b16_8 \
        --config.init.clip=ckpt/clip_b16 --config.data.root=k600/videos \
        --config.data.train_list=k600/train.txt --config.data.val_list=k600/val.txt \
        --config.data.labels=k600/labels.csv

The official CLAVER model zoo lists no fully supervised Kinetics-600 result; its Kinetics-600
figure is the zero-shot one on the 220 new classes (see configs/zeroshot.py).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location('k400', Path(__file__).with_name('k400.py'))
_k400 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_k400)


def get_config(arg=None):
  c = _k400.get_config(arg)
  c.text.prompts = 'kinetics600'
  return c
