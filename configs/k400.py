r"""Kinetics-400, fully supervised, from OpenAI's CLIP: CLAVER, X-CLIP with `xclip`, motion prompts
(after SiF) with `motion_prompts`.

Presets, in any order: an architecture (B32, B16, L14, L14_336), a frame count (8, 16, 32), a
temporal head (kmt, kmct, joint, pipeline, cls_only, mean) or the model family `xclip` or
`motion_prompts`. Defaults: B16,8,kmt (CLAVER). `pretrain` (CLAVER) trains 20 epochs instead of
the full schedule: `B16,32,pretrain` is the paper's starting point for few-shot
(configs/ucf101.py, hmdb51.py: shots=K) and the model zero-shot evaluates (configs/zeroshot.py);
`B16,32,kmct,pretrain` is the same with the KMCT head, for the KMCT columns of the paper's
Tables 12 and 13 (`shots=K,kmct`). Every table's commands: docs/reproduce.md.

    python -m convert.clip_to_flax --src=ViT-B-16.pt --out=ckpt/clip_b16 \
        --bpe=bpe_simple_vocab_16e6.txt.gz
    python -m claver_jax.main --config=configs/k400.py:B16,8,kmt --workdir=runs/k400_b16_8 \
        --config.init.clip=ckpt/clip_b16 --config.data.root=k400/videos \
        --config.data.train_list=k400/train.txt --config.data.val_list=k400/val.txt \
        --config.data.labels=k400/labels.csv
    # The run ends with the paper's multi-view test (4 clips x 3 crops) of its final weights
    # (eval.final_views='4x3': test/top1 in metrics.jsonl). Again, of the latest checkpoint, the
    # workdir is all it needs (the model and tokenizer come from WORKDIR/model):
    python -m claver_jax.main --config=configs/k400.py:B16,8,kmt --workdir=runs/k400_b16_8 \
        --config.mode=eval --config.eval.num_clips=4 --config.eval.num_crops=3 \
        --config.data.root=k400/videos --config.data.val_list=k400/val.txt \
        --config.data.labels=k400/labels.csv
    # X-CLIP, the baseline the paper measures itself against, the same way:
    python -m claver_jax.main --config=configs/k400.py:B16,8,xclip --workdir=runs/xclip_b16_8 \
        --config.init.clip=ckpt/clip_b16 [same data flags]

CLAVER. Expected top-1 / top-5 (%), 4x3 views, from the official CLAVER model zoo:
  B32  8f  KMT 81.5 / 95.5   KMCT 81.4 / 95.5     B32 16f  KMT 82.4 / 95.9   KMCT 82.6 / 95.9
  B16  8f  KMT 84.3 / 96.3   KMCT 84.1 / 96.2     B16 16f  KMT 85.9 / 97.3   KMCT 86.0 / 97.2
  L14  8f  KMT 88.1 / 97.7   KMCT 87.9 / 97.7     L14_336 16f KMT 88.8 / 98.1 KMCT 88.9 / 98.0
(the zoo labels the L/14 rows "B/14"; their FLOPs are L/14's). Hyperparameters are the paper's
(Table 14) and the official code's: AdamW (0.9, 0.98), eps 1e-8, weight decay 0.001 (not on 1-D
parameters, biases and positional embeddings; on the temporal embedding and the logit scale),
lr 12e-6 (x10 for the temporal parts), timm's cosine over all steps to lr/100 with a linear
warm-up of 5 epochs from 0 (the cosine starts at step 0, so the warm-up ends at 0.983 of the
peak); 60 epochs for ViT-B, 40 for ViT-L; label smoothing .1, mixup .8, cutmix 1; class texts:
the official code's (the bare name and its 15 templates) and the interpretive prompts. The run
ends with the 4x3 test.

Where the paper contradicts itself, and the side taken:
  * Temporal depth: §4.1 says the KMT/KMCT transformer has a third of the ViT's layers (4 for
    ViT-B, 8 for ViT-L), Appendix D lists 2 for ViT-B and 4 for ViT-L (a sixth). Table 6 measures
    both (without the prompts: 80.9 at a third, 79.6 at a sixth) and its headline 81.5 is at a
    third: a third is the default (--config.model.temporal_layers=2 for Appendix D's ViT-B).
  * Which towers train: Appendix D says the image tower was frozen; Table 11 reports the
    headline (B/32 8f KMT 81.5 / 95.5) with both towers fine-tuned, and the official config's
    default is FIX_IMAGE=False. The presets train both towers with the temporal transformer, the
    headline setting. Appendix D's variant is --config.optim.freeze_image=True, with the
    official fix_image's meaning: the ViT frozen except ln_post, proj and the class embedding
    (whose gradient still runs back through the ViT). Table 11's other rows: both towers frozen
    (add --config.optim.freeze_text=True) 78.7 / 94.4; one of them fine-tuned 81.0 / 95.1 and
    80.8 / 95.2 (the paper's text does not say which row is which tower).
  * Batch: the paper's Table 14 says 128 (ViT-B) and 32 (ViT-L); the official configs
    (configs/k400/*.yaml) on the official README's 8 GPUs use 256 clips per update for every
    model (per GPU 8 clips x 4 accumulation steps for B/32 and B/16 at 8 frames, 4 x 8 for B/16
    at 16 and 32 frames and L/14, 1 x 32 for L/14 at 336 px). We take the official configs
    everywhere because they fix what Table 14 leaves open (the micro-batches, and so the
    description sets drawn per update), and Table 14's one batch row for every column cannot be
    the few-shot batch (HMDB-51 2-shot has 102 clips).

Description sets: the official loop draws 5 description sets per GPU per micro-batch:
text.sets_per_step = 5 x 8 x the accumulation steps (160, 320 or 1280 per update). That is more
than the A sets there are, so each step encodes every set once, split over the devices, weighted
by its draws (claver_jax/step.py): per device A x 400 / devices texts, where an official GPU
encoded 5 x 400 per micro-batch (`python -m claver_jax.flops --config=... --texts`).

Input: clips are decoded and augmented by data.num_workers = 16 grain worker processes per host
(hosts of accelerators have tens of cores), capped at the host's CPUs. Each host must deliver its
share of train.batch_size clips per step, and decoding Kinetics' 10-second mp4s cannot keep up
with accelerators: a prepared dataset (`python -m claver_jax.data.prepare`) decodes an order of
magnitude faster per core (`python -m benchmarks.input_pipeline --seconds=10`; the rates, and
what 8 H100s consume: docs/performance.md, Input pipeline). Prepare the dataset for accelerator runs; raise or lower num_workers with
--config.data.num_workers=N.

Memory and accumulation: on the official 8 devices the presets run the official micro-batches
(train.grad_accum_steps = the official accumulation, 4 or 8; per-device clips are batch_size /
(devices x grad_accum_steps)), and at more than 8 frames recompute activations in the backward
pass (model.remat=True). Compiled as shipped for TPU v5e 2x4 (`python -m claver_jax.memory
--config=configs/k400.py:B16,8 --topology=v5e:2x4 --text_length=32`; the per-clip costs:
docs/performance.md, Memory), a chip's peak is 14.99 GiB at B16 8 frames (8 clips per chip),
which fits 32 GiB chips; on 16 GiB v5e chips add --config.train.grad_accum_steps=8. At B16
32 frames with remat it is 5.78 GiB (4 clips per chip). Other presets (16 frames, L14, X-CLIP)
are not compiled yet: the command above prints theirs.

X-CLIP (`xclip`). Expected top-1 / top-5 (%), 4x3 views, from the official X-CLIP model zoo
(microsoft/VideoX, X-CLIP/README.md):
  B32  8f  80.4 / 95.0     B32 16f  81.1 / 95.5
  B16  8f  83.8 / 95.7     B16 16f  84.7 / 96.8
  L14  8f  87.1 / 97.6     L14_336 16f  87.7 / 97.4
(the zoo labels the L/14 rows "B/14"). Its recipe (X-CLIP/utils/config.py, utils/optimizer.py,
configs/k400/*.yaml): AdamW (0.9, 0.98), eps 1e-8, weight decay 0.001, lr 8e-6 (x10 for the
messages, MIT and prompt generator), 5 warmup epochs then cosine to lr/100, 30 epochs, batch 256
(8 GPUs x 8 x 4 accumulation steps for ViT-B, 8 x 4 x 8 for ViT-L); label smoothing .1, mixup
.8, cutmix 1; the text tower (and logit scale) frozen, its embeddings cached; the image tower
trained; class texts: the class name alone; 1 MIT layer, 2 prompt layers, alpha 0.1.

Both official pipelines normalise frames with ImageNet's mean/std (data.mean/std here).

Motion prompts (`motion_prompts`; docs/models.md), on frozen CLIP towers:

    python -m claver_jax.main --config=configs/k400.py:B16,8,motion_prompts \
        --workdir=runs/motion_b16_8 --config.init.clip=ckpt/clip_b16 [same data flags]

SiF's hyperparameters are not public (nor its code or full text): this recipe is ours, and
untested at this scale (no Kinetics run was made). Both towers and the logit scale frozen (the
class texts encoded once and cached); AdamW (0.9, 0.98), eps 1e-8, weight decay 0.001, lr 3e-4
for the new parts (a guess: on the demo's 14k new parameters 1e-2 won, see docs/models.md), 5 warmup
epochs then cosine to lr/100, 30 epochs, batch 256 (X-CLIP's); label smoothing .1, mixup .8,
cutmix 1; class texts: the class name alone (X-CLIP's); frames normalised with CLIP's own
mean/std, which the frozen towers were trained with. Width 128 (E/4), 1 motion layer, 8 motion
prompts; the run prints its trainable parameter count (docs/models.md tables B16's and L14's:
about half a percent of the towers'; B32's is B16's). No expected accuracy: SiF's figures
are not available to us.
"""

from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from claver_jax.presets import parse_preset
from claver_jax.run_config import base_config


PRETRAIN_EPOCHS = 20     # The paper's Table 14: the K400 model few-shot and zero-shot start from.
# The official runs: 8 GPUs, 5 description sets drawn per GPU per micro-batch, 256 clips per update.
OFFICIAL_GPUS, OFFICIAL_SETS_PER_MICRO_BATCH, OFFICIAL_BATCH = 8, 5, 256


def official_accumulation(arch: str, num_frames: int) -> int:
  """The accumulation steps of yjyddq/CLAVER configs/k400/*.yaml (and configs/k600/*.yaml but
  16_32) for a model; combinations without an official config take the nearest one's."""
  if arch == 'L14_336':
    return 32                          # 1 clip per GPU
  if arch == 'L14' or (arch == 'B16' and num_frames > 8):
    return 8                           # 4 clips per GPU
  return 4                             # 8 clips per GPU


def official_sets_per_step(accumulation: int) -> int:
  """The description sets the official 8-GPU run drew per update."""
  return OFFICIAL_SETS_PER_MICRO_BATCH * OFFICIAL_GPUS * accumulation


def get_config(arg=None):
  parts = [p for p in (arg or '').replace(' ', '').split(',') if p]
  pretrain = 'pretrain' in parts
  preset = parse_preset(','.join(p for p in parts if p != 'pretrain'))
  if pretrain and preset['name'] != 'claver':
    raise ValueError(f'{arg!r}: pretrain is the paper\'s 20-epoch CLAVER model; X-CLIP\'s recipe '
                     'has its own schedule.')
  large = preset['arch'].startswith('L14')
  c = base_config()
  c.model.name = preset['name']
  c.model.arch = preset['arch']
  c.model.temporal = preset['temporal']
  c.model.dtype = 'bfloat16'
  c.data.source = 'filelist'
  c.data.num_workers = 16            # Per host; see the docstring.
  c.data.num_frames = preset['num_frames']
  c.data.image_size = 336 if preset['arch'] == 'L14_336' else 224
  c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD
  c.text.prompts = 'kinetics400'
  accumulation = official_accumulation(preset['arch'], preset['num_frames'])
  c.text.sets_per_step = official_sets_per_step(accumulation)
  c.train.grad_accum_steps = accumulation  # The official micro-batches on 8 devices (docstring).
  c.model.remat = preset['num_frames'] > 8
  c.train.epochs = PRETRAIN_EPOCHS if pretrain else 40 if large else 60
  c.train.batch_size = OFFICIAL_BATCH
  c.eval.batch_size = 32
  if preset['name'] == 'xclip':
    c.text.prompts = ''
    c.text.templates = '{}'            # The class name alone.
    c.optim.lr = 8e-6
    c.optim.freeze_text = True
    c.train.epochs = 30
  if preset['name'] == 'motion_prompts':
    motion_prompts_recipe(c)
    c.train.grad_accum_steps, c.model.remat = 1, False   # Frozen towers: no backward through them.
    c.init.require, c.init.require_from = 'clip', 'a converted CLIP (convert.clip_to_flax)'
    c.train.epochs = 30
  return c


def motion_prompts_recipe(c):
  """Ours (SiF's is not public): frozen towers, the new parts at 3e-4, class names alone, CLIP's
  normalisation. Shared by configs/ucf101.py and hmdb51.py."""
  c.text.prompts, c.text.templates = '', '{}'
  c.optim.freeze_image = c.optim.freeze_text = True
  c.optim.lr, c.optim.new_lr_multiplier = 3e-4, 1.0
  c.data.mean, c.data.std = CLIP_MEAN, CLIP_STD
