r"""Kinetics-400, fully supervised, from OpenAI's CLIP: CLAVER, X-CLIP with `xclip`, motion prompts
(after SiF) with `motion_prompts`.

Presets, in any order: an architecture (B32, B16, L14, L14_336), a frame count (8, 16, 32), a
temporal head (kmt, kmct, joint, pipeline, cls_only, mean) or the model family `xclip` or
`motion_prompts`. Defaults: B16,8,kmt (CLAVER). `pretrain` (CLAVER) trains 20 epochs instead of
the full schedule: `B16,32,pretrain` is the paper's starting point for few-shot
(configs/ucf101.py, hmdb51.py: shots=K) and the model zero-shot evaluates (configs/zeroshot.py).

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
the templates and the interpretive prompts. The run ends with the 4x3 test.

Which towers train. Both, with the temporal transformer: the setting of the paper's Table 11
headline (B/32 8f KMT 81.5 / 95.5 with both towers fine-tuned) and the official default
(FIX_IMAGE=False). Appendix D says the image tower was frozen; that variant is
--config.optim.freeze_image=True, with the official fix_image's meaning: the ViT frozen except
ln_post, proj and the class embedding (whose gradient still runs back through the ViT). Table 11's
other rows: both towers frozen (add --config.optim.freeze_text=True) 78.7 / 94.4; one of them
fine-tuned 81.0 / 95.1 and 80.8 / 95.2 (the paper's text does not say which row is which tower).

Batch and description sets: the official configs (configs/k400/*.yaml) on the official README's
8 GPUs: 256 clips per update for every model (per GPU 8 clips x 4 accumulation steps for B/32 and
B/16 at 8 frames, 4 x 8 for B/16 at 16 and 32 frames and L/14, 1 x 32 for L/14 at 336 px). The
paper's Table 14 says 128 (ViT-B) and 32 (ViT-L); we take the official configs everywhere
because they fix what Table 14 leaves open (the micro-batches, and so the description sets drawn
per update), and Table 14's one batch row for every column cannot be the few-shot batch (HMDB-51
2-shot has 102 clips). The official loop draws 5 description sets per GPU per micro-batch:
text.sets_per_step = 5 x 8 x the accumulation steps (160, 320 or 1280 per update). That is more
than the A sets there are, so each step encodes every set once, split over the devices, weighted
by its draws (claver_jax/train.py): per device A x 400 / devices texts, where an official GPU
encoded 5 x 400 per micro-batch (`python -m claver_jax.flops --config=... --texts`).

Input: clips are decoded and augmented by data.num_workers = 16 grain worker processes per host
(hosts of accelerators have tens of cores). One core delivers about 20 clips/s of 8 frames from
320x240 3-second mp4s (`python -m benchmarks.input_pipeline`, in-process, on an idle 2-core
machine); Kinetics' 10-second clips decode more frames per clip. Each host must deliver its share
of train.batch_size clips per step: if the accelerators wait on input, raise num_workers up to
the host's cores (--config.data.num_workers=N); on a small host, lower it. Measured with
`python -m benchmarks.input_pipeline --workers=0,1,2,4 --batches=8` on an idle 2-core machine:
bare PyAV decoding 23.7 clips/s; the pipeline with 0 workers (in-process) 19.6, 1: 18.7,
2: 23.9, 4: 23.4 (the machine's 2 cores are the limit).

Memory per device (`python -m claver_jax.memory --config=configs/k400.py:B16,32 --text_length=32`:
XLA's memory analysis of the compiled train step on 8 simulated devices, CPU backend, nothing
run; see the README's table): B16 at 32 frames, bf16, chunked attention, 1 clip per device peaks
at 7.7 GiB, 4.7 of it the text tower (the 5 x 400 sampled texts split over the devices, at 32
tokens at most, fwd + bwd), plus 2.0 GiB per further clip. As shipped (batch 128: 16 clips per
device on 8 devices) it needs 38.0 GiB: it fits an 80 GB GPU (up to 27 clips per device); a
32 GiB TPU chip takes 8 clips (`--config.train.grad_accum_steps=2` on 8 chips), a 16 GiB one 2
(`=8`). Per-device clips are batch_size / (devices x train.grad_accum_steps).

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

Motion prompts (`motion_prompts`; README: Motion prompts), on frozen CLIP towers:

    python -m claver_jax.main --config=configs/k400.py:B16,8,motion_prompts \
        --workdir=runs/motion_b16_8 --config.init.clip=ckpt/clip_b16 [same data flags]

SiF's hyperparameters are not public (nor its code or full text): this recipe is ours, and
untested at this scale (no Kinetics run was made). Both towers and the logit scale frozen (the
class texts encoded once and cached); AdamW (0.9, 0.98), eps 1e-8, weight decay 0.001, lr 3e-4
for the new parts (a guess: on the demo's 14k new parameters 1e-2 won, see the README), 5 warmup
epochs then cosine to lr/100, 30 epochs, batch 256 (X-CLIP's); label smoothing .1, mixup .8,
cutmix 1; class texts: the class name alone (X-CLIP's); frames normalised with CLIP's own
mean/std, which the frozen towers were trained with. Width 128 (E/4), 1 motion layer, 8 motion
prompts: 828,544 trainable parameters at B16 and B32 (0.55% of the towers' 149.6M / 151.3M),
1.86M at L14 (0.43% of 427.6M); the run prints its count. No expected accuracy: SiF's figures
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
  c.text.sets_per_step = official_sets_per_step(
      official_accumulation(preset['arch'], preset['num_frames']))
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
