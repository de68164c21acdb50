"""The full run config that every configs/*.py starts from; each key is documented here.

    mode                 'train' (train + periodic eval), 'eval' (evaluate a checkpoint) or
                         'zeroshot' (configs/zeroshot.py: claver_jax.zeroshot.run_zeroshot)
    seed                 the fresh parameters' initialisation and each train step's draws (mixup,
                         description sets); the data order and augmentation follow data.seed
    model.name           the model family: 'claver' (default), 'xclip' (X-CLIP) or
                         'motion_prompts' (after SiF, on frozen CLIP towers; see
                         claver_jax.models.families)
    model.arch           B32 | B16 | L14 | L14_336, or 'custom' with model.clip (CLIPConfig fields)
    model.temporal       CLAVER: kmt | kmct | joint | pipeline | cls_only | mean
    model.temporal_layers  CLAVER: None = a third of the ViT's depth
    model.temporal_heads   CLAVER's temporal transformer, X-CLIP's MIT, the attention of motion
                         prompts: None = width / 64 (CLAVER: vision width; X-CLIP: embed dim;
                         motion prompts: model.motion_width)
    model.attention      CLAVER: how the Kronecker attention is computed: 'dense' ([T·L, T·L]
                         scores), 'chunked' (exact, a chunk of frames at a time, O(T·L²) memory)
                         or 'auto' (chunked from 512 tokens per clip;
                         claver_jax/models/kronecker.py). Recorded in WORKDIR/model; it overrides
                         an init.checkpoint's
    model.xclip_mit_layers, xclip_prompt_layers  X-CLIP: MIT (1) and prompt generator (2) depth
    model.xclip_prompt_alpha  X-CLIP: the prompt generator's initial output scale (0.1)
    model.motion_width   motion prompts: the width of its new parts (None: embed dim / 4)
    model.motion_layers  motion prompts: the motion transformer's depth (1)
    model.motion_long_term  motion prompts: the long-term stream's differences, 'mean' (to the
                         clip mean) or 'stride' (over T/2 frames)
    model.motion_fusion  motion prompts: the streams 'sum'med or 'concat'enated + linear
    model.motion_num_prompts, motion_prompt_gate  motion prompts: n learnt queries (8) and the
                         initial gate on the prompts added to the texts (0.1)
    model.temporal_init_std  std of the temporal embedding (X-CLIP: the MIT's positional
                         embedding) of a model built from scratch (0.02, the official code's;
                         ~1 suits them, their tokens being O(1) per channel); init.clip /
                         init.checkpoint models keep 0.02 / their own
    model.pos_init       the ViT's patch positions in a model built from scratch: 'random'
                         (CLIP's) or 'sincos' (2-D sine-cosine, as MAE); init.clip /
                         init.checkpoint models keep their own
    model.dtype          compute dtype: 'float32' or 'bfloat16' (parameters stay fp32)
    model.remat          recompute each transformer block's activations in the backward pass
                         (less memory, about a third more compute)
    model.resample_frames  loading a checkpoint trained with other T resamples its temporal
                         embedding (True) or is an error (False)
    data                 see claver_jax.data.default_config (source, root, lists, labels, T, S, ...)
                         A run sets some of its keys itself: data.batch_size, eval_batch_size
                         (from train.batch_size, eval.batch_size over the processes),
                         data.num_clips, num_crops (from eval.num_clips, num_crops) and, in
                         zero-shot mode, data.source, root, train_list, val_list, labels, shots
                         (config.zeroshot.DATASET's); a value given to one of them is an error
                         naming the key to set instead (`mode_overrides`). mode=eval reads no
                         train list (data.train_list is left out, said once in the log)
    data.mean, data.std  the input normalisation the run trains and evaluates with (CLIP's by
                         default; the paper configs use ImageNet's, as the official code does);
                         WORKDIR/model records it
    data.shots           few-shot: keep this many clips of every class of the train list (0 = all)
    data.shots_seed      the seed of that draw: the same K-shot list in every process and run
    text.tokenizer       BPE file / vocab dir / model dir; '' = the init checkpoint's; 'train' =
                         learn one on the class texts (models from scratch)
    text.num_merges      text.tokenizer='train': at most this many BPE merges are learnt (fewer
                         when no pair of tokens occurs twice); the vocabulary is the 512 byte
                         tokens, the merges, start and end of text
    text.prompts         a prompt set ('kinetics400', a JSON path) or '' for templates only;
                         class names are matched exactly, else by their readable form
                         ('ride_bike' finds 'ride bike', 'ApplyEyeMakeup' 'apply eye makeup')
    text.allow_missing   False: a class without interpretive prompts in the set is an error
                         naming it; True: its prompt slots take its template texts (a warning)
    text.templates       'official' (the official CLAVER code's 15, the default; with the bare
                         name, its 16 texts per class), 'objects' (short, for the synthetic
                         set), or templates with one "{}" each, joined by '|'. WORKDIR/model
                         records them; predict uses them, and zero-shot when this is ''
                         (configs/zeroshot.py)
    text.aspects         the interpretive-prompt aspects used, any subset of decomposition,
                         synonyms, body_parts, comma-separated ('' for none): the paper's Table 10
                         rows. All three by default; WORKDIR/model records them
    text.bare_name       the bare class name is a text too (the paper's set: name, templates,
                         prompts); WORKDIR/model records it for predict and zero-shot
    text.sets_per_step   K: description sets drawn per train step (update), with replacement,
                         as the official loop draws 5 per GPU per micro-batch; the paper presets
                         draw what the official 8-GPU run drew per update (5 x 8 x its
                         accumulation steps). K >= A encodes each of the A sets once, weighted
                         by its draws (the same loss); else the K drawn sets are encoded
    optim                see claver_jax.optim.default_config (AdamW, groups, freezing, schedule)
    train.batch_size     global batch, independent of the device count
    train.epochs         the schedule: warm-up and cosine over epochs x (train clips // batch)
                         steps
    train.max_steps      a cap: the run stops after this step of the schedule the epochs define
                         (0 = no cap); the schedule is not compressed into it
    train.grad_accum_steps  micro-batches per step, run by a lax.scan; each spans every device;
                         the texts are encoded once per step
    train.label_smoothing, mixup_alpha, cutmix_alpha, mixup_switch_prob
    eval.batch_size, eval.num_clips, eval.num_crops (views per video)
    eval.token_shuffle   'none', or the paper's token shuffling at test time (its Table 9):
                         'pre_te' / 'post_te' permute the T·L tokens of each clip before / after
                         the temporal embedding (one permutation, drawn from config.seed;
                         claver_jax/models/temporal.py). mode=eval only, CLAVER heads kmt, kmct,
                         joint, pipeline
    eval.dump_scores     write each evaluation's per-video scores (video, label, scores per
                         class) as scores.npz beside its reports in WORKDIR/eval/ (see
                         claver_jax.evaluate.dump_scores; no pickles: np.load reads it)
    eval.final_views     the test at the end of a training run, as the official code ends one:
                         'CLIPSxCROPS' ('4x3', the paper's multi-view test) of the final weights,
                         written to metrics.jsonl as test/* with `views` and its reports to
                         WORKDIR/eval/test/; '' = none
    eval_every_steps     0 = at the end of each epoch
    log_every_steps, checkpoint_every_steps (checkpoints are also saved at each epoch end).
                         SIGTERM saves after the step in progress, but a spot VM powers off ~30 s
                         after it: in time only if the whole state gets written (1.45 GB for
                         k400.py:B16,8,kmt, 3.91 GB for L14,8,kmt: fp32 weights and AdamW's two
                         moments of the trained parts, from the models' shapes), i.e. at 50-130
                         MB/s to the workdir. Otherwise the run resumes from the last periodic
                         checkpoint, so the default, 500 steps (about half a Kinetics-400 epoch at
                         batch 256), bounds the work lost; saves are asynchronous
    checkpoint.keep, checkpoint.keep_best (by val/top1)
    resume_anyway        resume a workdir whose newest checkpoint was trained with other values of
                         the keys that change what is trained (`resume_differences`: seed,
                         model, data, text, optim, train, less RUN_ONLY_KEYS; in eval mode model
                         only); without it such a resume stops, naming the keys
    mesh.data, mesh.fsdp  device mesh axes; -1 fills
    init.clip            a converted CLIP directory (towers; the family's new parts fresh)
    init.checkpoint      a model directory of the family model.name (converted, or a run's
                         WORKDIR/model or WORKDIR): its weights only, never its optimizer state,
                         schedule or step; evaluating it alone (mode=eval, no workdir
                         checkpoint) feeds it the normalisation it records. Another family's is
                         an error, unless:
    init.towers_only     True: take only init.checkpoint's CLIP towers (image, text, logit
                         scale), from a directory of any kind that has plain ones (CLIP, CLAVER,
                         motion prompts; not X-CLIP), and build model.name's own parts fresh
    init.require         '' | 'clip' | 'checkpoint': the init this recipe starts from; a run
                         without it is rejected before it starts, naming init.require_from
    init.require_from    what init.require wants, in words (e.g. the preset that makes it)
    zeroshot             configs/zeroshot.py only: datasets and their paths, see
                         claver_jax.zeroshot.default_config
"""

import json
import logging
from typing import Any

import jax
import ml_collections

from claver_jax import optim, sharding
from claver_jax.data import default_config as data_config

MODES = ('train', 'eval', 'zeroshot')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'train'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='claver', arch='B16', clip=ml_collections.ConfigDict(), temporal='kmt',
      temporal_layers=ml_collections.config_dict.placeholder(int),
      temporal_heads=ml_collections.config_dict.placeholder(int), attention='auto',
      temporal_init_std=0.02, pos_init='random', dtype='float32', remat=False,
      resample_frames=True, xclip_mit_layers=1, xclip_prompt_layers=2, xclip_prompt_alpha=0.1,
      motion_width=ml_collections.config_dict.placeholder(int), motion_layers=1,
      motion_long_term='mean', motion_fusion='sum', motion_num_prompts=8,
      motion_prompt_gate=0.1))
  c.data = data_config()
  c.text = ml_collections.ConfigDict(dict(
      tokenizer='', num_merges=1000, prompts='', templates='official', bare_name=True,
      aspects='decomposition,synonyms,body_parts', allow_missing=False, sets_per_step=5))
  c.optim = optim.default_config()
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, epochs=30, max_steps=0, grad_accum_steps=1, label_smoothing=0.1,
      mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5))
  c.eval = ml_collections.ConfigDict(dict(batch_size=64, num_clips=1, num_crops=1,
                                          token_shuffle='none', dump_scores=False,
                                          final_views='4x3'))
  c.eval_every_steps = 0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, keep_best=1))
  c.resume_anyway = False
  c.mesh = sharding.default_config()
  c.init = ml_collections.ConfigDict(dict(clip='', checkpoint='', towers_only=False, require='',
                                          require_from=''))
  return c


class ConfigError(ValueError):
  """A config that cannot work: the message names the keys and the fix."""


# What a resume compares with the checkpoint's config: the keys of these sections change what is
# trained; RUN_ONLY_KEYS among them only change how it runs (speed, memory, where the data is,
# evaluation, where the run stops on the schedule the epochs define).
TRAINED_SECTIONS = ('seed', 'model', 'data', 'text', 'optim', 'train')
RUN_ONLY_KEYS = frozenset({
    'model.remat', 'model.attention', 'data.root', 'data.allow_outside_root',
    'data.num_workers', 'data.worker_buffer_size', 'data.read_threads', 'data.read_buffer',
    'data.batch_size', 'data.eval_batch_size', 'data.val_list', 'data.num_clips',
    'data.num_crops', 'data.eval_resize_ratio', 'train.grad_accum_steps', 'train.max_steps'})


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, value in tree.items() for k, v in _flatten(value, f'{prefix}{key}.').items()}


def resume_differences(saved: dict[str, Any], c: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> now' for each key that changes what is trained and differs between the
  checkpoint's config `saved` (JSON) and `c` (in eval mode, the model's keys only; none in
  zeroshot mode, whose model is init.checkpoint's, whatever the workdir holds). Keys that one of
  them lacks (another version of the code) are not compared."""
  if c.mode == 'zeroshot':
    return []
  sections = TRAINED_SECTIONS if c.mode == 'train' else ('model',)
  before, now = _flatten(saved), _flatten(json.loads(c.to_json_best_effort()))
  return [f'{key}: {before[key]!r} -> {value!r}' for key, value in now.items()
          if key.split('.')[0] in sections and key not in RUN_ONLY_KEYS and key in before
          and before[key] != value]


# Values that cannot work: key -> (lowest value, why).
_AT_LEAST = {
    'log_every_steps': (1, '1 logs every step'),
    'checkpoint_every_steps': (1, 'checkpoints are also saved at every epoch end; a large '
                               'value saves only those'),
    'eval_every_steps': (0, '0 evaluates at every epoch end'),
    'checkpoint.keep': (1, 'the latest checkpoint is what a resume and a SIGTERM need'),
    'checkpoint.keep_best': (0, '0 keeps no extra best checkpoint'),
    'train.batch_size': (1, ''), 'train.grad_accum_steps': (1, '1 is no accumulation'),
    'train.max_steps': (0, '0 is no cap'), 'eval.batch_size': (1, ''),
    'eval.num_clips': (1, ''), 'eval.num_crops': (1, ''),
    'data.num_frames': (1, ''), 'data.image_size': (1, ''),
    'data.num_workers': (0, '0 decodes in the main process'),
    'data.worker_buffer_size': (1, ''), 'data.read_threads': (1, ''),
    'data.read_buffer': (1, ''), 'data.shots': (0, '0 trains on every clip'),
    'text.sets_per_step': (1, ''), 'text.num_merges': (0, ''),
}
_PROBABILITIES = ('data.flip_prob', 'data.jitter_prob', 'data.grayscale_prob',
                  'train.mixup_switch_prob')


def check_config(c: ml_collections.ConfigDict) -> None:
  """Rejects a config that cannot work, before anything is written to the workdir."""
  from claver_jax.models.families import FAMILIES
  from claver_jax.models.temporal import SHUFFLABLE_KINDS, TEMPORAL_KINDS, TOKEN_SHUFFLES
  from claver_jax.text.prompts import resolve_aspects
  if c.mode not in MODES:
    raise ConfigError(f'config.mode={c.mode!r}; use one of {list(MODES)}.')
  if c.model.name not in FAMILIES:
    raise ConfigError(f'config.model.name={c.model.name!r} is not a model family; use one of '
                      f'{list(FAMILIES)}.')
  init = c.init
  if init.clip and init.checkpoint:
    raise ConfigError(f'config.init.clip={init.clip!r} and config.init.checkpoint='
                      f'{init.checkpoint!r} are both set; a run starts from one of them.')
  if init.require not in ('', 'clip', 'checkpoint'):
    raise ConfigError(f"config.init.require={init.require!r}; use '', 'clip' or 'checkpoint'.")
  if init.require and not init[init.require]:
    raise ConfigError(f'This recipe starts from config.init.{init.require}: '
                      f'{init.require_from or "set it"}. Pass --config.init.{init.require}=DIR.')
  if c.text.tokenizer == 'train' and (init.clip or init.checkpoint):
    key = 'clip' if init.clip else 'checkpoint'
    raise ConfigError(f"config.text.tokenizer='train' learns a new vocabulary, but the text tower "
                      f'of config.init.{key} was trained with its own; set '
                      f"--config.text.tokenizer='' to use that one.")
  if not c.text.templates and c.mode != 'zeroshot':
    raise ConfigError("config.text.templates is empty; '' means the model directory's own in "
                      "zero-shot only. Use 'official', 'objects' or templates joined by '|'.")
  try:
    resolve_aspects(c.text.aspects)
  except ValueError as e:
    raise ConfigError(f'config.text.aspects={c.text.aspects!r}: {e}') from e
  shuffle = c.eval.token_shuffle
  if shuffle not in TOKEN_SHUFFLES:
    raise ConfigError(f'config.eval.token_shuffle={shuffle!r}; use one of {list(TOKEN_SHUFFLES)}.')
  if shuffle != 'none' and (c.mode != 'eval' or c.model.name != 'claver'
                            or c.model.temporal not in SHUFFLABLE_KINDS):
    raise ConfigError(f'config.eval.token_shuffle={shuffle!r} is a test-time probe of CLAVER\'s '
                      f'temporal transformer over all T·L tokens: it needs config.mode=eval, '
                      f"config.model.name='claver' and config.model.temporal in "
                      f'{list(SHUFFLABLE_KINDS)} (got {c.mode!r}, {c.model.name!r}, '
                      f'{c.model.temporal!r}).')
  if c.model.pos_init not in ('random', 'sincos'):
    raise ConfigError(f"config.model.pos_init={c.model.pos_init!r}; use 'random' (CLIP's) or "
                      "'sincos'.")
  if c.model.temporal not in TEMPORAL_KINDS:
    raise ConfigError(f'config.model.temporal={c.model.temporal!r}; use one of '
                      f'{list(TEMPORAL_KINDS)}.')
  if c.model.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"config.model.dtype={c.model.dtype!r}; use 'float32' or 'bfloat16'.")
  if c.eval.final_views:
    from claver_jax.evaluate import parse_views
    try:
      parse_views(c.eval.final_views)
    except ValueError as e:
      raise ConfigError(f'config.eval.final_views: {e}') from None
  if c.text.sets_per_step < 1:
    raise ConfigError(f'config.text.sets_per_step={c.text.sets_per_step} must be at least 1.')
  t = c.train
  if t.mixup_alpha < 0 or t.cutmix_alpha < 0 or not 0 <= t.mixup_switch_prob <= 1:
    raise ConfigError(f'config.train.mixup_alpha={t.mixup_alpha} and cutmix_alpha='
                      f'{t.cutmix_alpha} must be >= 0 (0 turns that one off), mixup_switch_prob='
                      f'{t.mixup_switch_prob} in [0, 1].')
  if not 0 <= t.label_smoothing < 1:
    raise ConfigError(f'config.train.label_smoothing={t.label_smoothing} must be in [0, 1).')
  check_values(c)
  check_mode_overrides(c)
  if c.mode == 'zeroshot':
    if 'zeroshot' not in c:
      raise ConfigError('config.mode=zeroshot, but the config has no zeroshot section; start from '
                        'configs/zeroshot.py.')
    if not init.checkpoint:
      raise ConfigError('config.init.checkpoint is empty: set it to the K400-trained model '
                        'directory (or the workdir of its run) to evaluate.')


def _value(c: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split('.'):
    c = c[part]
  return c


def check_values(c: ml_collections.ConfigDict) -> None:
  """Rejects numbers no run can use: a zero step interval (the loop divides by it), keeping no
  checkpoint, empty batches, probabilities outside [0, 1], a learning rate or epoch count that is
  not positive, ..."""
  for key, (lowest, why) in _AT_LEAST.items():
    value = _value(c, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
      raise ConfigError(f'config.{key}={value!r} must be an integer >= {lowest}'
                        + (f' ({why}).' if why else '.'))
  for key in _PROBABILITIES:
    value = _value(c, key)
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise ConfigError(f'config.{key}={value!r} must be a probability in [0, 1].')
  o = c.optim
  if not (c.train.epochs > 0 and o.lr >= 0 and o.warmup_epochs >= 0 and o.weight_decay >= 0
          and 0 <= o.end_lr_ratio <= 1):
    raise ConfigError(f'config.train.epochs={c.train.epochs} must be > 0, config.optim.lr={o.lr}, '
                      f'optim.warmup_epochs={o.warmup_epochs} and weight_decay={o.weight_decay} '
                      f'>= 0, optim.end_lr_ratio={o.end_lr_ratio} in [0, 1].')
  if o.grad_clip_norm is not None and not o.grad_clip_norm > 0:
    raise ConfigError(f'config.optim.grad_clip_norm={o.grad_clip_norm} must be > 0, or None for '
                      'no clipping.')
  if not c.data.scales or not all(0 < s <= 1 for s in c.data.scales):
    raise ConfigError(f'config.data.scales={tuple(c.data.scales)} must be crop scales in (0, 1].')
  if c.data.eval_resize_ratio < 1:
    raise ConfigError(f'config.data.eval_resize_ratio={c.data.eval_resize_ratio} must be >= 1 '
                      '(the centre crop is taken from a short side of ratio x image_size).')
  for axis in ('data', 'fsdp'):
    if c.mesh[axis] != -1 and c.mesh[axis] < 1:
      raise ConfigError(f'config.mesh.{axis}={c.mesh[axis]}: use a device count >= 1, or -1 for '
                        'the devices left over.')


def mode_overrides(c: ml_collections.ConfigDict) -> list[tuple[str, Any, str]]:
  """(config.data key, the value the run gives it, the key that sets it) for each config.data key
  that a run of c.mode sets itself (train_and_evaluate, evaluate_workdir, run_zeroshot)."""
  processes = jax.process_count()
  rows = [('data.eval_batch_size', c.eval.batch_size // processes, 'eval.batch_size'),
          ('data.num_clips', c.eval.num_clips, 'eval.num_clips'),
          ('data.num_crops', c.eval.num_crops, 'eval.num_crops')]
  if c.mode != 'zeroshot':
    return [('data.batch_size', c.train.batch_size // processes, 'train.batch_size')] + rows
  datasets = 'zeroshot.DATASET'
  return rows + [('data.source', 'filelist', f'{datasets}.root'),
                 ('data.root', '', f'{datasets}.root'),
                 ('data.train_list', '', f'{datasets}.test_list'),
                 ('data.val_list', '', f'{datasets}.test_list'),
                 ('data.labels', '', f'{datasets}.labels'),
                 ('data.shots', 0, f'{datasets}.test_list')]


def check_mode_overrides(c: ml_collections.ConfigDict) -> None:
  """A config.data key that the run sets itself (`mode_overrides`), given another value than its
  default and than the run's, is an error naming the key that sets it; mode=eval's unread train
  list is said once in the log."""
  from claver_jax.data import default_config as data_defaults
  defaults = data_defaults()
  for key, used, source in mode_overrides(c):
    value, default = _value(c, key), defaults[key.split('.', 1)[1]]
    if value != default and value != used:
      how = (f'from config.{source}' if source.startswith('zeroshot.')
             else f'from config.{source} ({used!r}'
             + (f' per process of {jax.process_count()})' if 'batch' in key else ')'))
      raise ConfigError(f'config.{key}={value!r} is not read: a mode={c.mode} run sets it {how}; '
                        f'set --config.{source} instead.')
  if c.mode == 'eval' and c.data.train_list:
    logging.info('config.mode=eval: config.data.train_list=%s is not read.', c.data.train_list)


def check_batches(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The start-up checks of the batches on `mesh` (`claver_jax.memory --topology` runs them too):
  the global batch splits over the devices and accumulation steps, the batches over the
  processes, and every process's devices hold an equal share of each batch."""
  num_devices, tc = mesh.size, c.train
  processes = sorted({d.process_index for d in mesh.devices.flat})
  if tc.batch_size % (num_devices * tc.grad_accum_steps):
    raise ConfigError(f'config.train.batch_size={tc.batch_size} must divide by the {num_devices} '
                      f'devices x grad_accum_steps={tc.grad_accum_steps}.')
  if tc.batch_size % len(processes) or c.eval.batch_size % num_devices:
    raise ConfigError(f'Batch sizes must divide by the process count ({len(processes)}); '
                      f'config.eval.batch_size={c.eval.batch_size} by the {num_devices} '
                      'devices.')
  for process in processes:
    for batch in (tc.batch_size, c.eval.batch_size):
      try:
        sharding.process_rows(mesh, batch, process)
      except ValueError as e:
        raise ConfigError(str(e)) from None
