r"""Zero-shot: a Kinetics-400-trained CLAVER or X-CLIP on UCF-101, HMDB-51 and K600's new classes.

The argument, if any, picks datasets (default all three): `configs/zeroshot.py:ucf101,hmdb51`.
The protocol is in claver_jax/zeroshot.py. First the list files, one folder per split:

    for s in 1 2 3; do
      python -m claver_jax.data.annotations --format=ucf101 --src=UCF101/ucfTrainTestlist \
          --split=$s --out=lists/ucf101/split$s
      python -m claver_jax.data.annotations --format=hmdb51 \
          --src=HMDB51/testTrainMulti_7030_splits --split=$s --out=lists/hmdb51/split$s
    done

Kinetics-600 needs no list: its three zero-shot splits ship with claver_jax (160 classes each,
217 distinct, none a Kinetics-400 class; claver_jax/data/k600_zeroshot/), and only the videos'
folder is asked for (the release layout, train/ val/ test/; --config.zeroshot.k600.path_format
maps another, e.g. '{label}/{file}'). Then, with the paper's 20-epoch 32-frame K400 model (a
configs/k400.py:B16,32,pretrain run; `B16,32,kmct,pretrain` for KMCT) or a converted one:

    python -m claver_jax.main --config=configs/zeroshot.py --workdir=runs/zeroshot_b16_32 \
        --config.init.checkpoint=runs/k400_pretrain \
        --config.zeroshot.ucf101.root=UCF101/videos \
        --config.zeroshot.ucf101.test_list='lists/ucf101/split{split}/test.txt' \
        --config.zeroshot.ucf101.labels=lists/ucf101/split1/labels.csv \
        --config.zeroshot.hmdb51.root=HMDB51/videos \
        --config.zeroshot.hmdb51.test_list='lists/hmdb51/split{split}/test.txt' \
        --config.zeroshot.hmdb51.labels=lists/hmdb51/split1/labels.csv \
        --config.zeroshot.k600.root=k600/videos

(`python -m claver_jax.zeroshot`, an alias of claver_jax.main for zero-shot configs, takes the
same flags.) UCF-101's root holds the class folders (ApplyEyeMakeup/...), HMDB-51's the
extracted class folders (brush_hair/...). It writes runs/zeroshot_b16_32/zeroshot.json and
prints mean ± std of top-1 and top-5 over the 3 splits of each dataset, with each split.

Expected (%), B/16 32 frames, mean ± std over the 3 splits, from the paper (Tables 4/5 and 12):
                top-1 KMT     top-1 KMCT    top-5 KMT
  HMDB-51       54.1 ± 2.4    54.0 ± 2.0    -
  UCF-101       78.6 ± 1.7    78.4 ± 2.1    -
  Kinetics-600  73.8 ± 0.6    74.1 ± 0.9    93.1 ± 0.6
(the paper gives top-5 for Kinetics-600 only, and KMCT's top-1 only). docs/reproduce.md has
every table's commands.
Frames are normalised with the mean/std the model directory records (ImageNet's for converted
official checkpoints and for runs of the paper configs), whatever config.data says.

An X-CLIP directory (configs/k400.py:B16,32,xclip, or the converted official zero-shot model)
runs the same command; X-CLIP's own protocol describes each class by its name alone: add
--config.text.templates='{}' and --config.zeroshot.DATASET.prompts='' for each dataset.
X-CLIP's model zoo expects top-1 (%), B/16 32 frames: HMDB-51 44.6, UCF-101 72.0, K600 65.2
(the CLAVER paper's Table 4/5: 44.6 ± 5.2, 72.0 ± 2.3, K600 65.2 ± 0.4 / top-5 86.1 ± 0.8).
Every figure with its table is in claver_jax/paper.py, which the run report reads.

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
