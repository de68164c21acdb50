r"""UCF-101: few-shot or fully supervised from a Kinetics-400 model. ViT-B/16, 32 frames.

The argument is `shots=K` (or just K), K in 2, 4, 8, 16, for few-shot, or `full` (the default);
`from_clip` (few-shot only) and a temporal head may follow: `configs/ucf101.py:shots=2,kmct`; or
`xclip`, for X-CLIP with its own recipe (from CLIP in few-shot; class names alone, text tower
frozen, image tower trained): `shots=2,xclip`; or `motion_prompts` (after SiF, on frozen towers)
with the recipe of configs/k400.py's `motion_prompts` (ours; SiF's is not public), from CLIP in
few-shot, for the epochs and batch below. First the list files of split 1:

    python -m claver_jax.data.annotations --format=ucf101 --src=UCF101/ucfTrainTestlist \
        --split=1 --out=lists/ucf101/split1

Few-shot, the paper's recipe (Table 14): K clips of each class drawn from split 1's train list
(config.data.shots, by config.data.shots_seed; the draw is written to
WORKDIR/train_<K>shot_seed<seed>.txt), tested on split 1's whole test list, starting from the
Kinetics-400 model trained 20 epochs at 32 frames, 80 epochs at lr 2e-6 (cosine to 2e-8). First
that model (the same one zero-shot evaluates):

    python -m claver_jax.main --config=configs/k400.py:B16,32,pretrain --workdir=runs/k400_pretrain \
        --config.init.clip=ckpt/clip_b16 [K400 data flags, see configs/k400.py]
    python -m claver_jax.main --config=configs/ucf101.py:shots=2 --workdir=runs/ucf101_2shot \
        --config.init.checkpoint=runs/k400_pretrain --config.data.root=UCF101/videos \
        --config.data.train_list=lists/ucf101/split1/train.txt \
        --config.data.val_list=lists/ucf101/split1/test.txt \
        --config.data.labels=lists/ucf101/split1/labels.csv

With a temporal head, the run starts from that head's pretrain model: `shots=2,kmct` from a
`configs/k400.py:B16,32,kmct,pretrain` run (the paper's Table 13 KMCT row); a checkpoint whose
head differs from config.model.temporal is a config error naming both.
init.checkpoint takes the model's weights only (its WORKDIR/model), never its optimizer state,
schedule or step: the run starts at step 1 with a fresh schedule (the official code restores all
of them). X-CLIP's few-shot recipe for CLAVER, 50 epochs from CLIP, is `shots=2,from_clip` with
--config.init.clip=ckpt/clip_b16 in place of --config.init.checkpoint; the X-CLIP model with
its own recipe, `shots=2,xclip`, starts from CLIP too.

Fully supervised: all of split 1's train list, from the 32-frame K400 model (the official config
resumes from k400_exp_16_32_KMT/best.pth); the same flags with

    --config=configs/ucf101.py:full --workdir=runs/ucf101_full \
        --config.init.checkpoint=runs/k400_b16_32/model

UCF-101's root is the folder that holds the class folders (ApplyEyeMakeup/...).

Expected top-1 (%), few-shot, B/16 32 frames, from the official CLAVER and X-CLIP model zoos:
  K        2     4     8     16
  KMT     89.7  92.9  96.1  98.0
  KMCT    90.0  92.9  96.6  98.1
  X-CLIP  76.4  83.4  88.3  91.4
The model zoo lists no fully supervised UCF-101 result.

Where the numbers come from:
  * few-shot: the CLAVER paper's Table 14 (from the K400 model of 20 epochs at 32 frames; 80
    epochs, lr 2e-6, min lr 2e-8); X-CLIP's (`from_clip`, `xclip`): microsoft/VideoX
    X-CLIP/configs/ucf101/16_32.yaml: ViT-B/16, 32 frames, 50 epochs, lr 2e-6, batch 4 per GPU x
    2 accumulation steps.
  * full: yjyddq/CLAVER configs/ucf101/16_32.yaml: ViT-B/16, 32 frames, KMT, 80 epochs, lr 2e-6,
    batch 4 per GPU x 2 accumulation steps, resumed from the K400 B/16 32-frame model, class
    descriptions = action decomposition + body + synonyms (the shipped `ucf101` prompt set).
  * the global batch: 8 GPUs (the CLAVER README's setup) x 4 = 32 clips per micro-batch, 64 per
    update, the official configs' (the paper's Table 14 gives 128 for every column; the presets
    follow the official configs everywhere, see configs/k400.py). Description sets: the official
    loop draws 5 per GPU per micro-batch, so 5 x 8 x 2 = 80 per update (text.sets_per_step).
    Everything else is the official defaults (utils/config.py): both towers trained
    (FIX_IMAGE=False; --config.optim.freeze_image=True is the official fix_image), 5 warmup
    epochs, timm's cosine over all steps to lr / 100, weight decay 0.001, label smoothing .1,
    mixup .8, cutmix 1, validation with 1 clip x 1 crop and, at the end, the 4 x 3 test
    (eval.final_views; the paper's few-shot figures are of split 1's test list, views unstated).

Memory: B/16 at 32 frames with remat (model.remat=True, as configs/k400.py's 32-frame presets),
4 clips per device on 8 devices. Compiled as shipped for TPU v5e 2x4 (`python -m
claver_jax.memory --config=configs/ucf101.py:full --topology=v5e:2x4 --text_length=32`; how to
read it: docs/performance.md, Memory), a chip's peak is 4.98 GiB: it fits 16 GiB chips.
"""

import importlib.util
from pathlib import Path

from claver_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from claver_jax.models.temporal import TEMPORAL_KINDS
from claver_jax.run_config import base_config

_spec = importlib.util.spec_from_file_location('k400', Path(__file__).with_name('k400.py'))
_k400 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_k400)

SHOTS = (2, 4, 8, 16)


def pretrained_k400(temporal: str) -> str:
  """What a few-shot run with this temporal head starts from, in words."""
  preset = 'B16,32,pretrain' if temporal == 'kmt' else f'B16,32,{temporal},pretrain'
  return ("the paper's Kinetics-400 model of 20 epochs at 32 frames: the WORKDIR of a "
          f'`configs/k400.py:{preset}` run (or its WORKDIR/model). For X-CLIP\'s recipe from '
          'CLIP instead, use shots=K,from_clip with --config.init.clip')


def full_k400(temporal: str) -> str:
  preset = 'B16,32' if temporal == 'kmt' else f'B16,32,{temporal}'
  return ('the fully supervised Kinetics-400 model at 32 frames: the WORKDIR of a '
          f'`configs/k400.py:{preset}` run (or its WORKDIR/model)')


def parse_setting(arg: str | None) -> tuple[int, bool, str]:
  """'shots=2,kmct' -> (2, False, 'kmct'); 'shots=2,from_clip' -> (2, True, 'kmt');
  'full' -> (0, False, 'kmt'); 'shots=2,xclip' -> (2, True, 'xclip'), 'shots=2,motion_prompts'
  -> (2, True, 'motion_prompts'): X-CLIP's few-shot recipe, and ours for motion prompts, start
  from CLIP. 0 shots = fully supervised."""
  shots, from_clip, temporal = 0, False, 'kmt'
  for token in filter(None, (arg or '').replace(' ', '').split(',')):
    value = token[len('shots='):] if token.startswith('shots=') else token
    if token == 'full':
      shots = 0
    elif token == 'from_clip':
      from_clip = True
    elif token in ('xclip', 'motion_prompts'):
      temporal = token
    elif value.isdigit() and int(value) in SHOTS:
      shots = int(value)
    elif token in TEMPORAL_KINDS:
      temporal = token
    else:
      raise ValueError(f'Unknown setting {token!r} in {arg!r}: use shots=K (K in {SHOTS}) or '
                       f'full, optionally with from_clip (few-shot) and a temporal head '
                       f'{list(TEMPORAL_KINDS)}, xclip or motion_prompts; e.g. "shots=2,kmct".')
  if from_clip and not shots:
    raise ValueError(f'{arg!r}: from_clip is X-CLIP\'s few-shot recipe; use it with shots=K.')
  return shots, from_clip or (temporal in ('xclip', 'motion_prompts') and shots > 0), temporal


def make_config(prompts: str, arg: str | None):
  """The UCF-101 / HMDB-51 config; `prompts` is the dataset's prompt set."""
  shots, from_clip, temporal = parse_setting(arg)
  c = base_config()
  c.model.arch = 'B16'
  c.model.temporal = temporal
  c.model.dtype = 'bfloat16'
  c.data.source = 'filelist'
  c.data.num_frames = 32
  c.data.image_size = 224
  c.data.shots = shots
  c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD   # The official pipelines'.
  c.text.prompts = prompts
  c.optim.lr = 2e-6                  # Cosine to 2e-8 (optim.end_lr_ratio = 0.01).
  c.train.epochs = 50 if from_clip else 80
  c.train.batch_size = 64
  c.train.grad_accum_steps = 2
  c.model.remat = True               # 32 frames; see the docstring.
  c.text.sets_per_step = _k400.official_sets_per_step(2)   # 5 x 8 GPUs x 2 micro-batches.
  c.eval.batch_size = 16
  if from_clip:
    c.init.require, c.init.require_from = 'clip', 'a converted CLIP ViT-B/16 (convert.clip_to_flax)'
  else:
    c.init.require = 'checkpoint'
    c.init.require_from = pretrained_k400(temporal) if shots else full_k400(temporal)
  if temporal == 'xclip':          # X-CLIP's own few-shot recipe (its configs/*/16_32.yaml).
    c.model.name, c.model.temporal = 'xclip', 'kmt'
    c.text.prompts, c.text.templates = '', '{}'
    c.optim.freeze_text = True
    if not shots:
      c.init.require_from = ('an X-CLIP Kinetics-400 model at 32 frames: the WORKDIR of a '
                             '`configs/k400.py:B16,32,xclip` run, or a converted one')
  if temporal == 'motion_prompts':   # Ours (configs/k400.py: motion_prompts_recipe).
    c.model.name, c.model.temporal = 'motion_prompts', 'kmt'
    _k400.motion_prompts_recipe(c)
    if not shots:
      c.init.require_from = ('a motion-prompts Kinetics-400 model at 32 frames: the WORKDIR of a '
                             '`configs/k400.py:B16,32,motion_prompts` run')
  return c


def get_config(arg=None):
  return make_config('ucf101', arg)
