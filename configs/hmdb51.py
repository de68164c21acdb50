r"""HMDB-51: few-shot or fully supervised from a Kinetics-400 model. ViT-B/16, 32 frames.

configs/ucf101.py with HMDB-51's classes and prompts; the same arguments (`shots=K` with K in
2, 4, 8, 16, optionally `from_clip`, or `full`; optionally a temporal head, `xclip` or
`motion_prompts`). First the list files of split 1:

    python -m claver_jax.data.annotations --format=hmdb51 \
        --src=HMDB51/testTrainMulti_7030_splits --split=1 --out=lists/hmdb51/split1

Few-shot, the paper's recipe: from the Kinetics-400 model of 20 epochs at 32 frames (made by
`configs/k400.py:B16,32,pretrain`), 80 epochs at lr 2e-6 (min 2e-8), K clips per class of split
1's train list, tested on split 1's test list:

    python -m claver_jax.main --config=configs/hmdb51.py:shots=2 --workdir=runs/hmdb51_2shot \
        --config.init.checkpoint=runs/k400_pretrain --config.data.root=HMDB51/videos \
        --config.data.train_list=lists/hmdb51/split1/train.txt \
        --config.data.val_list=lists/hmdb51/split1/test.txt \
        --config.data.labels=lists/hmdb51/split1/labels.csv

X-CLIP's recipe (50 epochs from CLIP): `shots=2,from_clip` with --config.init.clip=ckpt/clip_b16.
KMCT (`shots=2,kmct`) starts from a `configs/k400.py:B16,32,kmct,pretrain` run.
Fully supervised, from the 32-frame K400 model: the same flags with

    --config=configs/hmdb51.py:full --workdir=runs/hmdb51_full \
        --config.init.checkpoint=runs/k400_b16_32/model

HMDB-51's root is the folder of the extracted class folders (brush_hair/...).

Expected top-1 (%), few-shot, B/16 32 frames, from the official CLAVER and X-CLIP model zoos:
  K        2     4     8     16
  KMT     58.6  63.9  68.0  72.5
  KMCT    58.3  64.5  68.6  72.9
  X-CLIP  53.0  57.3  62.8  64.0
The model zoo lists no fully supervised HMDB-51 result.

Where the numbers come from: few-shot, the CLAVER paper's Table 14 (80 epochs from the 20-epoch
32-frame K400 model, lr 2e-6, min 2e-8) and, for `from_clip`, microsoft/VideoX
X-CLIP/configs/hmdb51/16_32.yaml (B/16, 32 frames, 50 epochs, lr 2e-6, batch 4 per GPU x 2
accumulation steps); full, yjyddq/CLAVER configs/hmdb51/16_32.yaml (B/16, 32 frames, KMT, 80
epochs, lr 2e-6, batch 4 x 2, resumed from the K400 B/16 32-frame model, descriptions = action
decomposition + body + synonyms); the global batch of 64 (8 GPUs) and the rest as in
configs/ucf101.py.

Memory: B/16 at 32 frames with remat, 4 clips per device on 8 devices, as configs/ucf101.py.
Compiled as shipped for TPU v5e 2x4 (`python -m claver_jax.memory --config=configs/hmdb51.py:full
--topology=v5e:2x4 --text_length=32`; how to read it: docs/performance.md, Memory), a chip's
peak is 4.91 GiB: it fits 16 GiB chips.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location('ucf101', Path(__file__).with_name('ucf101.py'))
_ucf101 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ucf101)


def get_config(arg=None):
  return _ucf101.make_config('hmdb51', arg)
