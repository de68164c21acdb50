r"""Zero-shot: a Kinetics-400-trained CLAVER or X-CLIP on UCF-101, HMDB-51 and K600's new classes.

The argument, if any, picks datasets (default all three): `configs/zeroshot.py:ucf101,hmdb51`.
The protocol is in claver_jax/zeroshot.py. First the list files, one folder per split:

    for s in 1 2 3; do
      python -m claver_jax.data.annotations --format=ucf101 --src=UCF101/ucfTrainTestlist \
          --split=$s --out=lists/ucf101/split$s
      python -m claver_jax.data.annotations --format=hmdb51 \
          --src=HMDB51/testTrainMulti_7030_splits --split=$s --out=lists/hmdb51/split$s
    done
    python -m claver_jax.data.annotations --format=kinetics --src=k600/annotations/val.csv \
        --split_name=val --out=lists/k600

Then, with the paper's 20-epoch 32-frame K400 model (a configs/k400.py:B16,32,pretrain run) or
a converted one:

    python -m claver_jax.main --config=configs/zeroshot.py --workdir=runs/zeroshot_b16_32 \
        --config.init.checkpoint=runs/k400_pretrain \
        --config.zeroshot.ucf101.root=UCF101/videos \
        --config.zeroshot.ucf101.test_list='lists/ucf101/split{split}/test.txt' \
        --config.zeroshot.ucf101.labels=lists/ucf101/split1/labels.csv \
        --config.zeroshot.hmdb51.root=HMDB51/videos \
        --config.zeroshot.hmdb51.test_list='lists/hmdb51/split{split}/test.txt' \
        --config.zeroshot.hmdb51.labels=lists/hmdb51/split1/labels.csv \
        --config.zeroshot.k600.root=k600/videos --config.zeroshot.k600.val_list=lists/k600/val.txt \
        --config.zeroshot.k600.labels=lists/k600/labels.csv \
        --config.zeroshot.k600.k400_labels=lists/k400/labels.csv

(`python -m claver_jax.zeroshot` takes the same flags.) UCF-101's root holds the class folders
(ApplyEyeMakeup/...), HMDB-51's the extracted class folders (brush_hair/...). It writes
runs/zeroshot_b16_32/zeroshot.json and prints mean ± std over the 3 splits (3 class draws for
K600) with each run.

Expected top-1 (%), B/16 32 frames, from the official CLAVER model zoo (its README gives
neither top-5 nor the std):
  HMDB-51  KMT 54.1  KMCT 54.0     UCF-101  KMT 78.6  KMCT 78.4     K600  KMT 73.8  KMCT 74.1
The K600 figure is over ER-ZSAR's 220 new classes; by name the labels CSVs give 231 (see
claver_jax/zeroshot.py), so pass ER-ZSAR's list as zeroshot.k600.new_classes to match it.
Frames are normalised with the mean/std the model directory records (ImageNet's for converted
official checkpoints and for runs of the paper configs), whatever config.data says.

An X-CLIP directory (configs/k400.py:B16,32,xclip, or the converted official zero-shot model)
runs the same command; X-CLIP's own protocol describes each class by its name alone: add
--config.text.templates='{}' and --config.zeroshot.DATASET.prompts='' for each dataset.
X-CLIP's model zoo expects top-1 (%), B/16 32 frames: HMDB-51 44.6, UCF-101 72.0, K600 65.2.
The CLAVER paper also gives the std over the splits or draws, and K600's top-5: KMT 73.8 ± 0.6 /
93.1 ± 0.6 (its Table 5), X-CLIP 65.2 ± 0.4 / 86.1 ± 0.8; every figure with its table is in
claver_jax/paper.py, which the run report reads.

Views: 1 clip x 1 crop, the official code's test default (TEST.NUM_CLIP = TEST.NUM_CROP = 1 in
yjyddq/CLAVER utils/config.py); the README does not state the zero-shot views.
"""

from claver_jax import zeroshot
from claver_jax.run_config import base_config


def get_config(arg=None):
  c = base_config()
  c.mode = 'zeroshot'
  c.model.arch = 'B16'
  c.model.dtype = 'bfloat16'
  c.data.source = 'filelist'
  c.data.num_frames = 32
  c.data.image_size = 224
  c.eval.batch_size = 16
  c.eval.num_clips = 1
  c.eval.num_crops = 1
  c.text.templates = ''              # The model directory's own (those it was trained with).
  c.zeroshot = zeroshot.default_config()
  if arg:
    c.zeroshot.datasets = arg
  return c
