"""The train loop: one function, read top to bottom (mesh, workdir, input, text, model +
optimizer, shard, steps, checkpoint, loop), plus the train and eval steps it compiles.

Loss: each step draws `config.text.sets_per_step` (K) of the A description sets, with
replacement, as the official loop's torch.randint does; the loss is the soft cross-entropy over
the C classes for each drawn set, averaged over the K draws. K >= A (the paper presets: as many
draws per update as the official 8-GPU run made) encodes each of the A sets once, weighted by how
often it was drawn: the same loss and gradient as encoding every draw. With a frozen text tower
all A·C texts are encoded once and cached (projected, not normalised); otherwise the drawn sets
are encoded inside the step, once per step whatever `config.train.grad_accum_steps`. Models are
used only through their family's interface (claver_jax.models.families): train, evaluate and
export CLAVER and X-CLIP alike.

Scale: the text attention is causal and pools at the end-of-text token, so a text encoded at
any context that holds it gives the same embedding. Texts are cut to the longest one (rounded up
to 8 tokens); in the step, they are sorted by length and encoded in groups at their own context
(`encode_texts_by_length`). Each group is split over the devices, forward and backward
(`encode_texts_sharded`). Gradient accumulation is a lax.scan over micro-batches that each span
every device (`micro_batches`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from claver_jax import aot, distributed, evaluate, fileio, optim, report, sharding
from claver_jax.checkpoint import Checkpointer
from claver_jax.data import build_pipelines, make_global_batch
from claver_jax.data.labels import DataError
from claver_jax.data.mixup import mixup_cutmix, smooth_one_hot
from claver_jax.data.transforms import normalize
from claver_jax.metrics import MetricWriter, progress_bar, read_metrics
from claver_jax.models import CLIPConfig, families, kronecker, load
from claver_jax.models.clip import (clamp_logit_scale, needed_context, pool_index, set_remat,
                                    sincos_position_embedding)
from claver_jax.models.io import (input_normalization, load_towers, model_dir,
                                  read_model_config, write_model_dir)
from claver_jax.models.temporal import set_token_shuffle
from claver_jax.run_config import ConfigError, check_config
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, prompt_tokens,
                                     resolve_aspects, resolve_templates)
from claver_jax.text.tokenizer import Tokenizer, train_tokenizer
from claver_jax.workdir import claim_workdir


# The metrics TensorBoard's hparams view compares runs on.
METRIC_TAGS = ('train/loss', 'val/top1', 'val/top5', 'val/mean_class_acc', 'test/top1',
               'test/top5')


class NonFiniteLossError(RuntimeError):
  """The loss, the gradient or the parameters became NaN or inf; the last good checkpoint is
  kept."""


# ---------------------------------------------------------------------------------------------
# Pieces the loop is made of
# ---------------------------------------------------------------------------------------------
def make_tokenizer(config: ml_collections.ConfigDict, workdir: Path,
                   class_names: list[str]) -> Tokenizer:
  """config.text.tokenizer: a BPE file / vocab dir / model dir; '' = the init CLIP's; 'train' =
  learn a small BPE on the class texts, saved in WORKDIR/tokenizer (for models from scratch)."""
  source = config.text.tokenizer
  if source == 'train':
    out = workdir / 'tokenizer'
    # Resuming: the vocabulary must not move. Process 0 writes it (both files in one rename;
    # an older run's half-written pair is written again); the others read it.
    complete = (out / 'vocab.json').is_file() and (out / 'merges.txt').is_file()
    if jax.process_index() == 0 and not complete:
      prompt_set = load_prompt_set(config.text.prompts) if config.text.prompts else None
      texts, _ = build_prompt_texts(class_names, prompt_set,
                                    templates=resolve_templates(config.text.templates),
                                    aspects=resolve_aspects(config.text.aspects),
                                    allow_missing=config.text.allow_missing,
                                    name=config.text.bare_name)
      train_tokenizer([t for row in texts for t in row], out, num_merges=config.text.num_merges)
    distributed.barrier('tokenizer')
    return load_tokenizer(out)
  source = source or config.init.clip or (config.init.checkpoint and
                                          model_dir(config.init.checkpoint))
  if not source:
    raise ValueError('config.text.tokenizer is empty and there is no config.init.clip or '
                     'config.init.checkpoint to take one from: set it to a BPE file or directory, '
                     "or to 'train' for a model trained from scratch.")
  return load_tokenizer(source)


TEMPORAL_INIT_STD = 0.02   # The temporal embedding's initialisation in the official code.
TEXTS_PER_DEVICE = 512     # Texts each device encodes per call in evaluation.


def model_family(config: ml_collections.ConfigDict) -> families.Family:
  """config.model.name's family, checked against config.init: a checkpoint of another kind
  gives only its CLIP towers, and only with config.init.towers_only; a family on frozen towers
  (motion prompts) needs towers to start from and both towers frozen."""
  family = families.get(config.model.name)
  init = config.init
  if init.checkpoint:
    kind, model_cfg, _ = read_model_config(model_dir(init.checkpoint))
    if init.towers_only:
      families.check_has_towers(kind, init.checkpoint)
    elif kind != family.name:
      has_towers = kind == 'clip' or families.get(kind).towers is not None
      raise ConfigError(f'config.init.checkpoint={init.checkpoint} holds a {kind!r} model '
                        f'but config.model.name={family.name!r}; set --config.model.name={kind}'
                        + (' (or pass a CLIP as config.init.clip)' if kind == 'clip' else '')
                        + ' to continue it, or '
                        + (f'--config.init.towers_only=True to start a fresh {family.name} from '
                           'its CLIP towers.' if has_towers else
                           f'start a fresh {family.name} from a CLIP (--config.init.clip=DIR): a '
                           f'{kind} model has no plain CLIP towers to give.'))
    elif kind == 'claver' and model_cfg.temporal != config.model.temporal:
      # The weights come with their head; a run must not train or test another than it names.
      raise ConfigError(f'config.model.temporal={config.model.temporal!r} but config.init.'
                        f'checkpoint={init.checkpoint} holds a {model_cfg.temporal!r} model; '
                        f'set --config.model.temporal={model_cfg.temporal}, or start from a '
                        f'{config.model.temporal} checkpoint (e.g. the workdir of a '
                        f'configs/k400.py:B16,32,{config.model.temporal},pretrain run).')
  elif init.towers_only:
    raise ConfigError('config.init.towers_only=True takes the towers of config.init.checkpoint, '
                      'which is empty; pass --config.init.checkpoint=DIR.')
  if family.frozen_towers:
    if not (init.clip or init.checkpoint):
      raise ConfigError(f'config.model.name={family.name!r} trains on frozen CLIP towers: pass '
                        'them as --config.init.clip=DIR (a CLIP) or --config.init.checkpoint=DIR '
                        "(with --config.init.towers_only=True for another family's model).")
    if not (config.optim.freeze_image and config.optim.freeze_text):
      raise ConfigError(f'config.model.name={family.name!r} trains on frozen CLIP towers: set '
                        '--config.optim.freeze_image=True --config.optim.freeze_text=True.')
  return family


def check_init(config: ml_collections.ConfigDict) -> None:
  """config.init's directories exist, hold what they should (a CLIP in init.clip) and take frames
  of config.data.image_size: one ConfigError each, before anything is written or loaded."""
  for key in ('clip', 'checkpoint'):
    path = config.init[key]
    if not path:
      continue
    if not Path(path).is_dir():
      raise ConfigError(f'config.init.{key}={path}: no such directory.')
    try:
      kind, model_cfg, _ = read_model_config(model_dir(path))
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f'config.init.{key}: {e}') from e
    if key == 'clip' and kind != 'clip':
      raise ConfigError(f'config.init.clip={path} holds a {kind!r} model, not a CLIP; pass it as '
                        '--config.init.checkpoint (with --config.init.towers_only=True for its '
                        'towers alone).')
    image_size = (model_cfg if kind == 'clip' else model_cfg.clip).image_size
    if image_size != config.data.image_size:
      raise ConfigError(f'config.data.image_size={config.data.image_size}, but the model in '
                        f'config.init.{key}={path} takes {image_size} px frames; set '
                        f'--config.data.image_size={image_size}, or convert the CLIP at '
                        f'{config.data.image_size} px (convert.clip_to_flax --image_size).')


def make_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               rngs: nnx.Rngs) -> nnx.Module:
  """A model of the family config.model.name: from config.init.checkpoint (a model dir of that
  family, or a run's workdir: its weights only, never its optimizer state, schedule or step;
  with config.init.towers_only, a model dir of any kind with plain CLIP towers: those towers,
  fresh new parts), config.init.clip (a CLIP model dir: its towers, fresh new parts) or from
  scratch (config.model.arch, or 'custom' with config.model.clip)."""
  family = model_family(config)
  dtype = jnp.dtype(config.model.dtype)
  if config.init.checkpoint and config.init.towers_only:
    clip = load_towers(config.init.checkpoint, dtype=dtype)
    logging.info('Taking the CLIP towers of %s; the %s parts start fresh.', config.init.checkpoint,
                 family.name)
    return family.from_clip(clip, families.model_config(config, clip.cfg), dtype=dtype, rngs=rngs)
  if config.init.checkpoint:
    return load(model_dir(config.init.checkpoint), dtype=dtype,
                num_frames=config.data.num_frames, resample_frames=config.model.resample_frames,
                **{key: config.model[key] for key in family.run_options})
  if config.init.clip:
    clip = load(config.init.clip, dtype=dtype)
    return family.from_clip(clip, families.model_config(config, clip.cfg), dtype=dtype, rngs=rngs)
  if config.model.arch == 'custom':
    cfg = families.model_config(config, CLIPConfig(
        **{**config.model.clip.to_dict(), 'vocab_size': tokenizer.vocab_size,
           'eos_token_id': tokenizer.eot_token_id, 'image_size': config.data.image_size}))
  else:
    cfg = families.model_config(config)
  if cfg.clip.vocab_size != tokenizer.vocab_size:
    raise ValueError(f'The tokenizer has {tokenizer.vocab_size} ids but the text tower '
                     f'{cfg.clip.vocab_size}; they must belong together.')
  model = family.module_class(cfg, dtype=dtype, rngs=rngs)
  std, embedding = config.model.temporal_init_std, families.temporal_embedding(model)
  if embedding is not None and std != TEMPORAL_INIT_STD:
    # From scratch, ViT tokens are O(1) per channel: a 0.02 temporal embedding (CLAVER's, or
    # X-CLIP's MIT positions) is invisible, and a frame-order-blind start is slow to leave.
    # Only fresh models get this.
    embedding[...] = std * jax.random.normal(rngs.params(), embedding.shape)
  if config.model.pos_init == 'sincos':
    # From scratch, a smooth 2-D layout of the patches from step 0: where an object is, and so
    # how it moves, is readable before the ViT has learnt its own positions.
    visual = families.vision_tower(model)
    visual.positional_embedding[...] = sincos_position_embedding(
        cfg.clip.image_size // cfg.clip.patch_size, cfg.clip.vision_width)
  return model


def report_trainable(model: nnx.Module, config: ml_collections.ConfigDict,
                     family: families.Family) -> None:
  """Logs the trainable parameter count against the CLIP towers'; a warning above the family's
  budget (config: config.optim)."""
  trainable, towers = optim.count_parameters(model, config, family.group_of)
  share = trainable / max(towers, 1)
  logging.info('Trainable parameters: %s, %.2f%% of the CLIP towers\' %s.', f'{trainable:,}',
               100 * share, f'{towers:,}')
  if family.trainable_budget is not None and share > family.trainable_budget:
    logging.warning('%s trains %.2f%% of its CLIP towers\' parameter count, above its budget of '
                    '%.0f%%: this is no longer the parameter-efficient model it stands for.',
                    family.name, 100 * share, 100 * family.trainable_budget)


@jax.jit
def _all_finite(state: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def all_finite(state: Any) -> bool:
  """True when every floating-point array of `state` is finite (checked before each save)."""
  return bool(jax.device_get(_all_finite(state)))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
  """logits [..., B, C], targets [B, C] (rows sum to 1) -> mean over everything but C; with
  `weights` [K] (summing to 1) for logits [K, B, C], the K sets' means weighted by them."""
  per_set = -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean(-1)
  return per_set.mean() if weights is None else (weights * per_set).sum()


def encode_texts_sharded(model: nnx.Module, tokens: jax.Array,
                         mesh: jax.sharding.Mesh) -> jax.Array:
  """tokens int32 [N, S] -> [N, E] (the family's `encode_text`: projected, not normalised), on
  every device. Inside jit: each device of the batch axes encodes N / devices of the texts (N
  padded with empty texts to a multiple of the device count; their embeddings are dropped) and
  the embeddings are gathered; the backward pass through the text tower is split the same way."""
  n = tokens.shape[0]
  # Padded on every device, then each takes its rows: no tokens move between devices.
  tokens = jax.lax.with_sharding_constraint(jnp.pad(tokens, ((0, -n % mesh.size), (0, 0))),
                                            sharding.replicated(mesh))
  tokens = jax.lax.with_sharding_constraint(tokens, sharding.batch_sharding(mesh))
  embeddings = model.encode_text(tokens)
  return jax.lax.with_sharding_constraint(embeddings, sharding.replicated(mesh))[:n]


def length_buckets(lengths: np.ndarray, sets: int, multiple: int = 8, *,
                   repeats: bool = False) -> tuple[tuple[int, int], ...]:
  """Static groups (count, context) to encode the texts of any `sets` rows of `lengths` int
  [A, C] (the context each text needs) by length (`repeats`: rows drawn with replacement):
  sorted by length, the texts of any such choice fill the groups in order, each at most as long
  as its group's context (a multiple of `multiple`). A group's count is the fewest texts of that
  length or shorter that `sets` rows can hold, less the groups before it."""
  total, longest = sets * lengths.shape[1], int(lengths.max())
  buckets, placed = [], 0
  for context in range(multiple, longest + multiple, multiple):
    short = np.sort((lengths <= context).sum(1))
    fewest = sets * int(short[0]) if repeats else int(short[:sets].sum())
    fits = total if context >= longest else fewest
    if fits > placed:
      buckets.append((fits - placed, context))
      placed = fits
  return tuple(buckets)


def encode_texts_by_length(model: nnx.Module, tokens: jax.Array, lengths: jax.Array,
                           buckets: tuple[tuple[int, int], ...],
                           mesh: jax.sharding.Mesh) -> jax.Array:
  """tokens int32 [N, S], lengths int [N] (the context each needs) -> [N, E] (projected, not
  normalised), on every device. Inside jit: the texts sorted by length, each group of
  `length_buckets` encoded at its own context by `encode_texts_sharded`. The text attention is
  causal, so this is exact."""
  order = jnp.argsort(lengths, stable=True)
  ranked = jax.lax.with_sharding_constraint(tokens[order], sharding.replicated(mesh))
  parts, start = [], 0
  for count, context in buckets:
    parts.append(encode_texts_sharded(model, ranked[start:start + count, :context], mesh))
    start += count
  return jnp.concatenate(parts)[jnp.argsort(order)]


def micro_batches(tree: Any, count: int, mesh: jax.sharding.Mesh) -> Any:
  """Leaves [B, ...] split over the devices -> [count, B / count, ...]: micro-batch m takes the
  m-th 1/count of every device's rows (a strided split of the global batch), so each micro-batch
  is spread over every device and no data moves."""
  devices = mesh.size
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.AXES))

  def split(x):
    per_device = x.reshape(devices, count, x.shape[0] // (devices * count), *x.shape[1:])
    stacked = per_device.swapaxes(0, 1).reshape(count, x.shape[0] // count, *x.shape[1:])
    return jax.lax.with_sharding_constraint(stacked, spec)

  return jax.tree.map(split, tree)


def step_keys(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The train step's random keys: (mixup/cutmix, description sets)."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), step)))


def draw_sets(key: jax.Array, draws: int, num_sets: int) -> jax.Array:
  """int [draws]: description sets drawn with replacement, as the official loop's
  torch.randint(0, A, (K,))."""
  return jax.random.randint(key, (draws,), 0, num_sets)


def make_train_step(graphdef, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    text_lengths: np.ndarray, text_frozen: bool, group_of: optim.GroupOf):
  """(state, batch, text, step) -> (state, {'loss', 'finite'}). `text` is [A, C, E] cached
  embeddings (projected, not normalised) when the text tower is frozen, else [A, C, S] tokens;
  `text_lengths` int [A, C] is the context each text needs (its pooling position + 1).
  `group_of` is the model family's parameter groups. 'finite' is False when the loss or the
  gradient's global norm is not finite; 'substituted' (when the batch has it) counts the batch's
  substituted clips.

  One step: normalise and mix the global batch; draw K of the A description sets (with
  replacement); encode the drawn sets' texts once (all A·C, each set weighted by its draws, when
  K >= A; else the K·C drawn), by length and split over the devices (`encode_texts_by_length`); run
  `grad_accum_steps` micro-batches (lax.scan, each spread over every device), accumulating the
  gradients of the parameters and of the text embeddings; take the latter back through the text
  tower once; update. The model is used through its family's `encode_text`, `video_features`
  and `class_logits`.
  """
  tc, dc = config.train, config.data
  num_sets, num_classes = text_lengths.shape
  draws = config.text.sets_per_step
  every_set = draws >= num_sets          # Encode each set once, weighted by its draws.
  sets = num_sets if every_set else draws
  buckets = length_buckets(text_lengths, sets, repeats=not every_set)
  accum = tc.grad_accum_steps
  wrt = optim.trainable_filter(config.optim, group_of)

  def train_step(state, batch, text, step):
    chex.assert_shape(batch['video'], (tc.batch_size, dc.num_frames, dc.image_size,
                                       dc.image_size, 3))
    chex.assert_shape(batch['label'], (tc.batch_size,))
    chex.assert_shape(text, (num_sets, num_classes, None))
    chex.assert_type([batch['video'], batch['label']], [jnp.uint8, jnp.int32])
    model, optimizer = nnx.merge(graphdef, state)
    mix_rng, set_rng = step_keys(config.seed, step)
    video = normalize(batch['video'], tuple(dc.mean), tuple(dc.std))
    if tc.mixup_alpha > 0 or tc.cutmix_alpha > 0:
      video, targets = mixup_cutmix(mix_rng, video, batch['label'], num_classes,
                                    mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha,
                                    switch_prob=tc.mixup_switch_prob,
                                    label_smoothing=tc.label_smoothing)
    else:
      targets = smooth_one_hot(batch['label'], num_classes, tc.label_smoothing)
    drawn = draw_sets(set_rng, draws, num_sets)
    if every_set:
      set_ids, weights = jnp.arange(num_sets), jnp.bincount(drawn, length=num_sets) / draws
    else:
      set_ids, weights = drawn, jnp.full((draws,), 1 / draws)
    chosen = jax.lax.with_sharding_constraint(text[set_ids], sharding.replicated(mesh))
    graph, params, rest = nnx.split(model, wrt, ...)

    def text_embeddings(params):                                           # -> [K, C, E]
      tokens = chosen.reshape(sets * num_classes, -1)
      lengths = jnp.asarray(text_lengths)[set_ids].reshape(-1)
      embeddings = encode_texts_by_length(nnx.merge(graph, params, rest), tokens, lengths,
                                          buckets, mesh)
      return embeddings.reshape(sets, num_classes, -1)

    if text_frozen:
      text_emb, text_backward = chosen, None
    else:
      text_emb, text_backward = jax.vjp(text_embeddings, params)

    def micro_loss(params, text_emb, video, targets):
      model = nnx.merge(graph, params, rest)
      logits = model.class_logits(model.video_features(video), text_emb)   # [K, B, C]
      return soft_cross_entropy(logits, targets, weights)

    grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1))
    if accum == 1:     # No loop: XLA's CPU backend runs a loop's body about 3x slower.
      loss, (grads, text_grad) = grad_fn(params, text_emb, video, targets)
    else:
      def micro_step(carry, micro):
        loss, grads, text_grad = carry
        l, (g, t) = grad_fn(params, text_emb, *micro)
        return (loss + l, jax.tree.map(jnp.add, grads, g), text_grad + t), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(text_emb))
      (loss, grads, text_grad), _ = jax.lax.scan(micro_step, zeros,
                                                 micro_batches((video, targets), accum, mesh),
                                                 unroll=kronecker.loops_unrolled())
    if text_backward is not None:
      grads = jax.tree.map(jnp.add, grads, text_backward(text_grad)[0])
    loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    # Checked on device; the loop reads it where it reads the loss (no extra host sync).
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    optimizer.update(model, grads)
    clamp_logit_scale(model)                 # As CLIP: the logits stay within 100 x cosine.
    out = {'loss': loss, 'finite': finite}
    if 'substituted' in batch:
      out['substituted'] = batch['substituted'].sum()
    return nnx.state((model, optimizer)), out

  return train_step


def make_eval_fns(graphdef, state_sharding, mesh, normalization: tuple[Any, Any]):
  """Jitted (state, tokens [N, S]) -> [N, E] (split over the devices, see
  `encode_texts_sharded`) and (state, uint8 video [B, V, T, H, W, 3], text [A, C, E]) -> [B, C];
  frames are normalised with `normalization` (mean, std)."""
  mean, std = (tuple(v) for v in normalization)
  replicated = sharding.replicated(mesh)

  def encode_text(state, tokens):
    model, _ = nnx.merge(graphdef, state)
    return encode_texts_sharded(model, tokens, mesh)

  def scores(state, video, text):
    model, _ = nnx.merge(graphdef, state)
    return evaluate.view_scores(model, normalize(video, mean, std), text)

  return (jax.jit(encode_text, in_shardings=(state_sharding, replicated), out_shardings=replicated),
          aot.on_first_call(lambda: jax.jit(
              scores, in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
              out_shardings=replicated), mesh, 'evaluation step'))


def run_eval(data, state, encode_text, scores, tokens: np.ndarray, mesh,
             stop: distributed.StopRequest | None = None) -> dict[str, Any] | None:
  """One pass over the eval split -> evaluate.summarize(...) over the videos that could be read,
  with 'num_substituted' (the unreadable ones, left out), plus their 'scores' [N, C], 'labels'
  [N] and 'index' [N] (eval-list positions; None for pipelines without them); a DataError when
  the unreadable ones are more than data.max_substituted of the split. Scores stay on the devices
  and are gathered once at the end. None when `stop()` is set between batches (a SIGTERM in a
  one-process run; a multi-process run stops after the evaluation, see StopRequest)."""
  text = evaluate.encode_texts(lambda t: encode_text(state, t), tokens,
                               chunk=TEXTS_PER_DEVICE * mesh.size)
  parts = []
  batch_sharding = sharding.batch_sharding(mesh)
  for host_batch in data.eval_pass():
    if stop is not None and stop():
      return None
    batch = make_global_batch(host_batch, batch_sharding)
    parts.append({'scores': scores(state, batch['video'], text), 'label': batch['label'],
                  'valid': batch['valid'], 'substituted': batch['substituted'],
                  **({'index': batch['index']} if 'index' in batch else {})})
  together = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  gathered = multihost_utils.process_allgather(together, tiled=True)
  valid = np.asarray(gathered['valid'])
  unreadable = valid & np.asarray(gathered['substituted'])
  data.check_substituted('eval', int(unreadable.sum()), int(valid.sum()))
  keep = valid & ~unreadable
  if not keep.any():
    raise DataError('No video of the eval split could be read: nothing to score.')
  summary = evaluate.summarize(np.asarray(gathered['scores'])[keep],
                               np.asarray(gathered['label'])[keep], data.class_names)
  # For the score dump: [N, C] scores, [N] labels and eval-list positions, N scored videos.
  summary.update(scores=np.asarray(gathered['scores'])[keep],
                 labels=np.asarray(gathered['label'])[keep],
                 index=np.asarray(gathered['index'])[keep] if 'index' in gathered else None,
                 num_substituted=int(unreadable.sum()))
  return summary


def export_model(model: nnx.Module, tokenizer: Tokenizer, out: Path, source: dict[str, Any],
                 normalization: tuple[Any, Any]) -> None:
  """WORKDIR/model: a model directory that `load()` and `predict` read, recording the input
  normalisation the run trained with; a link to the newest of WORKDIR/.model.versions/, replaced
  in one rename. Every process calls this: each writes its shards of the parameters, process 0
  the rest."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  write_model_dir(out, kind=families.of(model).name, config=model.cfg, params=params,
                  normalization=normalization, tokenizer=(tokenizer.vocab, tokenizer.merges),
                  source=source, overwrite=True, versioned=True)


def checkpoint_normalization(config: ml_collections.ConfigDict) -> tuple[Any, Any] | None:
  """What config.init.checkpoint records (None without one); a warning when config.data's
  mean/std, which the run feeds the model, differ from it."""
  if not config.init.checkpoint:
    return None
  checkpoint = model_dir(config.init.checkpoint)
  _, _, meta = read_model_config(checkpoint)
  recorded = input_normalization(meta, checkpoint)
  if not np.allclose(recorded, (config.data.mean, config.data.std)):
    logging.warning('config.data.mean/std %s differ from the %s that %s records; training and '
                    'evaluating a workdir checkpoint with config.data\'s, evaluating the directory '
                    'itself with its own.', (tuple(config.data.mean), tuple(config.data.std)),
                    recorded, checkpoint)
  return recorded


def check_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The start-up checks of the batches on `mesh` (`claver_jax.memory --topology` runs them too):
  the global batch splits over the devices and accumulation steps, the batches over the
  processes, and every process's devices hold an equal share of each batch."""
  num_devices, tc = mesh.size, config.train
  processes = sorted({d.process_index for d in mesh.devices.flat})
  if tc.batch_size % (num_devices * tc.grad_accum_steps):
    raise ConfigError(f'config.train.batch_size={tc.batch_size} must divide by the {num_devices} '
                      f'devices x grad_accum_steps={tc.grad_accum_steps}.')
  if tc.batch_size % len(processes) or config.eval.batch_size % num_devices:
    raise ConfigError(f'Batch sizes must divide by the process count ({len(processes)}); '
                      f'config.eval.batch_size={config.eval.batch_size} by the {num_devices} '
                      'devices.')
  for process in processes:
    for batch in (tc.batch_size, config.eval.batch_size):
      try:
        sharding.process_rows(mesh, batch, process)
      except ValueError as e:
        raise ConfigError(str(e)) from None


def init_from_workdir(config: ml_collections.ConfigDict, workdir: Path
                      ) -> ml_collections.ConfigDict:
  """config.mode='eval' of a run's workdir needs nothing but the workdir: with no init.clip,
  init.checkpoint or text.tokenizer given, the model is built from WORKDIR/model (the run's
  export: architecture, tokenizer) and the latest checkpoint's weights are evaluated
  (WORKDIR/model's own when there is none). Any other config is returned as it is."""
  init = config.init
  exported = workdir / 'model'
  if (config.mode != 'eval' or init.clip or init.checkpoint or config.text.tokenizer
      or not (exported / 'config.json').is_file()):
    return config
  config = config.copy_and_resolve_references()
  config.init.checkpoint, config.init.towers_only, config.init.require = str(exported), False, ''
  logging.info('Evaluating %s: the model is built from %s.', workdir, exported)
  return config


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (config.mode='train') or evaluates (config.mode='eval'); returns the last metrics.

  Nothing is written to the workdir before the config, config.init's directories, the
  tokenizer, the data (lists, labels, a sample of the videos) and the class texts are checked."""
  config = init_from_workdir(config, fileio.run_path(workdir))
  check_config(config)
  if config.mode not in ('train', 'eval'):
    raise ConfigError(f"config.mode={config.mode!r}; train_and_evaluate runs 'train' or 'eval'.")
  workdir = fileio.run_path(workdir)       # Local, or gs:// (etils.epath); else one-line error.
  model_family(config)                     # A family error, before anything is written.
  check_init(config)

  # ----------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  num_devices = mesh.size
  tc = config.train
  check_batches(config, mesh)
  # The rows of each global batch this process's devices hold (interleaved with other
  # processes' on TPU slices): its pipeline reads those of the one global train order.
  train_rows = sharding.process_rows(mesh, tc.batch_size)
  # A tokenizer to load is checked now; one to learn is made once the workdir exists.
  tokenizer = make_tokenizer(config, workdir, []) if config.text.tokenizer != 'train' else None

  # ----------------------------------------------------------------------------- input
  data_config = config.data.copy_and_resolve_references()
  data_config.batch_size = tc.batch_size // jax.process_count()
  data_config.eval_batch_size = config.eval.batch_size // jax.process_count()
  data_config.num_clips, data_config.num_crops = config.eval.num_clips, config.eval.num_crops
  if config.mode == 'eval':
    data_config.train_list = ''
  data = build_pipelines(data_config, train_rows=train_rows, workdir=workdir)
  class_names = data.class_names
  templates = resolve_templates(config.text.templates)
  aspects = resolve_aspects(config.text.aspects)
  build_prompt_texts(class_names, load_prompt_set(config.text.prompts) if config.text.prompts
                     else None, templates=templates, aspects=aspects,
                     allow_missing=config.text.allow_missing,
                     name=config.text.bare_name)      # Every class has its texts.

  # ----------------------------------------------------------------------------- workdir
  # Room to write, the lock (one run per workdir, held until the end), stale temporaries swept,
  # a resume under the config it was trained with: all before anything is built.
  workdir_lock = claim_workdir(workdir, config)

  # ----------------------------------------------------------------------------- text
  tokenizer = tokenizer or make_tokenizer(config, workdir, class_names)

  # ----------------------------------------------------------------------------- model + optimizer
  model = make_model(config, tokenizer, nnx.Rngs(config.seed))
  family = families.of(model)
  if config.eval.token_shuffle != 'none':     # The paper's Table 9; mode=eval (check_config).
    set_token_shuffle(model, config.eval.token_shuffle, config.seed)
  normalization = (tuple(config.data.mean), tuple(config.data.std))
  recorded_normalization = checkpoint_normalization(config)
  set_remat(model, config.model.remat)
  prompts = prompt_tokens(class_names, tokenizer, config.text.prompts or None, templates=templates,
                          aspects=aspects, allow_missing=config.text.allow_missing,
                          name=config.text.bare_name, context_length=model.cfg.clip.context_length)
  # The text attention is causal: the context is cut to the longest text, the same embeddings.
  tokens = prompts.tokens[..., :needed_context(prompts.tokens, model.cfg.clip)]
  logging.info('Texts: %d description sets x %d classes (%s), %d tokens each.',
               *prompts.tokens.shape[:2], ', '.join(sorted(set(prompts.kinds))), tokens.shape[-1])
  steps_per_epoch = max(data.num_train // tc.batch_size, 1)
  schedule_steps = int(tc.epochs * steps_per_epoch)      # Truncated, as the official scheduler.
  total_steps = min(schedule_steps, tc.max_steps) if tc.max_steps else schedule_steps
  if total_steps < schedule_steps and config.mode == 'train':
    logging.info('config.train.max_steps=%d: the run stops at step %d of the %d-step schedule '
                 'that %s epochs define.', tc.max_steps, total_steps, schedule_steps, tc.epochs)
  tx, schedule = optim.make_optimizer(config.optim, family.group_of, total_steps=schedule_steps,
                                      steps_per_epoch=steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim, family.group_of))
  report_trainable(model, config.optim, family)

  # ----------------------------------------------------------------------------- shard
  graphdef, state = nnx.split((model, optimizer))
  state_sharding = sharding.state_shardings(mesh, state, family.sharding_rules)
  state = distributed.device_put_identical(state, state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  # ----------------------------------------------------------------------------- steps
  text_frozen = config.optim.freeze_text
  # Compiled at the first step under the mesh (the fused attention kernels need it), with a
  # portable fallback should a fused kernel not compile; the log says which kernel runs.
  train_step = aot.on_first_call(lambda: jax.jit(
      make_train_step(graphdef, config, mesh, pool_index(tokens, model.cfg.clip) + 1,
                      text_frozen, family.group_of),
      in_shardings=(state_sharding, batch_sharding, replicated, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,)), mesh, 'train step')
  encode_text, scores = make_eval_fns(graphdef, state_sharding, mesh, normalization)

  # ----------------------------------------------------------------------------- checkpoint
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep,
                              keep_best=config.checkpoint.keep_best)
  train_iter = iter(data.train) if data.train is not None else None
  start_step = 0
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sharding)
  progress: dict[str, Any] = {}
  # The newest checkpoint that reads; a damaged newer one is named and set aside.
  resumed = checkpointer.restore_latest(nnx.to_pure_dict(abstract), train_iter)
  latest = None if resumed is None else resumed[0]
  if resumed is not None:
    start_step, restored, progress = resumed
    nnx.replace_by_pure_dict(state, restored)
    logging.info('Resuming from step %d in %s.', start_step, workdir)
  writer = MetricWriter(workdir, resume_step=start_step,
                        steps_per_epoch=steps_per_epoch if data.num_train else None)

  # ----------------------------------------------------------------------------- record
  lead = jax.process_index() == 0
  if lead:   # WORKDIR/config.json (an eval run keeps a training's) and TensorBoard's config.
    config_dict = json.loads(config.to_json_best_effort())
    run_info = {'total_steps': total_steps, 'steps_per_epoch': steps_per_epoch,
                'classes': len(class_names), 'train_clips': data.num_train,
                'eval_clips': data.num_eval, 'devices': num_devices,
                'processes': jax.process_count(), 'platform': jax.default_backend()}
    if config.mode == 'train' or not (workdir / report.RUN_CONFIG).is_file():
      report.write_run_config(workdir, config_dict, run_info)
    writer.write_config(config_dict, report.key_settings(config_dict, run_info), METRIC_TAGS)
  views = evaluate.views_name(config.eval.num_clips, config.eval.num_crops)
  prefix = 'eval' if config.mode == 'eval' else 'val'  # an eval run's rows: eval/*

  def evaluate_now(step: int, stop: distributed.StopRequest | None = None
                   ) -> dict[str, Any] | None:
    logging.info('Evaluating step %d (%d batches, %s views).', step, data.eval_batches, views)
    substituted = data.eval_substitutions.count
    summary = run_eval(data, state, encode_text, scores, tokens, mesh, stop)
    if summary is None:
      logging.warning('SIGTERM during the evaluation of step %d: evaluation stopped.', step)
      return None
    metrics = {**evaluate.eval_row(prefix, summary, views), **data.metrics(),
               'data/eval_substituted': data.eval_substitutions.count - substituted}
    writer.write(step, metrics)
    if lead:
      kind = 'eval' if prefix == 'eval' else 'latest'
      write_eval_reports(summary, evaluate.reports_dir(workdir, kind, step=step, views=views),
                         step, data, prefix, views)
    unreadable = (f', {summary["num_substituted"]} unreadable, not scored'
                  if summary['num_substituted'] else '')
    logging.info('step %d: %s top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% over %d videos '
                 '(%s views%s).', step, prefix, summary['top1'], summary['top5'],
                 summary['mean_class_acc'], summary['num_videos'], views, unreadable)
    return metrics

  def write_eval_reports(summary: dict[str, Any], directory: Path, step: int, pipelines,
                         name: str, views: str) -> None:
    """Process 0: the reports of evaluation `name` ('val', 'eval', 'test') over `pipelines`' eval
    split in `directory`, its figures and the training curves so far in TensorBoard, and with
    config.eval.dump_scores its per-video scores (scores.npz)."""
    from claver_jax import plots
    figures = evaluate.write_reports(summary, class_names, directory, step=step, views=views,
                                     title=f'{name}, step {step}')
    figures = {f'{name}/{key}': figure for key, figure in figures.items()}
    figures['train/curves'] = plots.curves_figure(read_metrics(workdir), title=workdir.name)
    writer.write_figures(step, figures)
    if config.eval.dump_scores and summary['index'] is not None:
      evaluate.dump_scores(directory / 'scores.npz',
                           videos=[pipelines.eval_name(int(i)) for i in summary['index']],
                           labels=summary['labels'], scores=summary['scores'],
                           class_names=class_names, step=step, views=views)

  if config.mode == 'eval':
    if latest is None and not config.init.checkpoint:
      raise ValueError(f'config.mode=eval, but {workdir} has no checkpoint and '
                       'config.init.checkpoint is empty: there is nothing to evaluate.')
    if latest is None:     # The model directory itself: fed as it records.
      encode_text, scores = make_eval_fns(graphdef, state_sharding, mesh, recorded_normalization)
    metrics = evaluate_now(start_step)
    writer.close()
    checkpointer.close()
    if lead:
      report.write_and_log(workdir)
    if workdir_lock is not None:
      workdir_lock.release()
    return metrics

  # ----------------------------------------------------------------------------- loop
  text = (evaluate.encode_texts(lambda t: encode_text(state, t), tokens,
                                chunk=TEXTS_PER_DEVICE * num_devices) if text_frozen
          else jax.device_put(tokens, replicated))
  stop = distributed.StopRequest(start_step)
  eval_every = config.eval_every_steps or steps_per_epoch
  stopped = False
  bar = progress_bar(total_steps, start_step)
  losses, substituted, metrics = [], [], {}
  unchecked: list[tuple[int, jax.Array]] = []   # (step, its on-device finiteness flag)
  best = progress.get('best_val_top1')          # Of WORKDIR/model; None before the first export.
  tick, clips, waited = time.time(), 0, 0.0     # Since the last log: time, clips, input wait.
  read, unreadable = 0, 0                       # Clips read and substituted in this run.

  def last_good() -> str:
    saved = checkpointer.latest_step()
    return (f'the last good checkpoint ({checkpointer.directory / str(saved)}) is kept'
            if saved is not None else 'no checkpoint had been saved')

  def check_finite(flags: list[Any] | None = None) -> None:
    """Raises at the first step whose loss or gradient was not finite (a host sync: called only
    where the loop syncs anyway). `flags`: the unchecked steps' flags, if already fetched."""
    flags = jax.device_get([f for _, f in unchecked]) if flags is None else flags
    bad = next((s for (s, _), ok in zip(unchecked, flags) if not ok), None)
    unchecked.clear()
    if bad is not None:
      raise NonFiniteLossError(
          f'The training loss or gradient is not finite at step {bad}. Stopping: nothing from '
          f'step {bad} on is saved or exported, and {last_good()}. Lower config.optim.lr, check '
          'the data, or enable config.optim.grad_clip_norm.')

  def check_parameters(step: int) -> None:
    if not all_finite(state):
      raise NonFiniteLossError(f'The parameters are not finite after step {step}; nothing saved '
                               f'or exported, and {last_good()}. Lower config.optim.lr or enable '
                               'config.optim.grad_clip_norm.')

  def evaluate_and_export(step: int) -> dict[str, Any] | None:
    """Evaluates; WORKDIR/model becomes this model when it is finite and its val top-1 beats the
    best so far. None when a SIGTERM stopped the evaluation."""
    nonlocal best
    evaluated = evaluate_now(step, stop)
    if evaluated is not None and (best is None or evaluated['val/top1'] > best):
      check_parameters(step)
      best = evaluated['val/top1']
      export_model(nnx.merge(graphdef, state)[0], tokenizer, workdir / 'model',
                   {'workdir': str(workdir), 'step': step, 'val/top1': best,
                    'templates': list(templates), 'bare_name': config.text.bare_name,
                    'aspects': list(aspects),
                    'eval_resize_ratio': config.data.eval_resize_ratio}, normalization)
      progress.update(best_val_top1=best, best_step=step)
      if lead:   # WORKDIR/eval/best: the reports of the model WORKDIR/model holds.
        evaluate.copy_reports(evaluate.reports_dir(workdir, 'latest'),
                              evaluate.reports_dir(workdir, 'best'))
    return evaluated

  def final_test(step: int) -> dict[str, Any]:
    """The official end of a run: the final weights tested with config.eval.final_views (the
    paper's 4 clips x 3 crops), a metrics row of test/top1 and test/top5 with `views` beside the
    periodic 1-view val/*. Skipped when metrics.jsonl has it already (a finished run started
    again); {} when a SIGTERM stops it (the next start does it)."""
    clips, crops = evaluate.parse_views(config.eval.final_views)
    test_views = evaluate.views_name(clips, crops)
    if (workdir / 'metrics.jsonl').is_file() and any(
        row.get('step') == step and row.get('views') == test_views and 'test/top1' in row
        for row in read_metrics(workdir)):
      return {}
    test_config = data_config.copy_and_resolve_references()
    test_config.train_list = ''
    test_config.num_clips, test_config.num_crops = clips, crops
    test_data = build_pipelines(test_config, workdir=workdir)
    logging.info('Final test of step %d: %s views (%d clips x %d crops) per video, %d batches.',
                 step, test_views, clips, crops, test_data.eval_batches)
    summary = run_eval(test_data, state, encode_text, scores, tokens, mesh, stop)
    if summary is None:
      logging.warning('SIGTERM during the final test: run again to test step %d.', step)
      return {}
    row = evaluate.eval_row('test', summary, test_views)
    writer.write(step, row)
    if lead:
      write_eval_reports(summary, evaluate.reports_dir(workdir, 'test'), step, test_data, 'test',
                         test_views)
    logging.info('step %d, %s views: test top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% over %d '
                 'videos.', step, test_views, summary['top1'], summary['top5'],
                 summary['mean_class_acc'], summary['num_videos'])
    return row

  def save(step: int, evaluated: dict[str, Any] | None, eval_pending: bool) -> None:
    checkpointer.save(step, nnx.to_pure_dict(state), train_iter, config,
                      {'val/top1': evaluated['val/top1']} if evaluated else None,
                      {**progress, 'eval_pending': eval_pending})

  try:
    if progress.get('eval_pending'):   # A SIGTERM stopped this step's evaluation: do it now.
      evaluated = evaluate_and_export(start_step)
      if evaluated is None:            # Stopped again: step start_step stays as it was saved.
        logging.warning('SIGTERM: step %d is saved; exiting. Run again to resume.', start_step)
        return metrics
      metrics.update(evaluated)
    for step in range(start_step + 1, total_steps + 1):
      waiting = time.perf_counter()
      host_batch = next(train_iter)
      waited += time.perf_counter() - waiting
      batch = make_global_batch(host_batch, batch_sharding)
      state, out = train_step(state, batch, text, jax.device_put(np.int32(step), replicated))
      losses.append(out['loss'])
      substituted.append(out['substituted'])
      unchecked.append((step, out['finite']))
      clips += tc.batch_size
      bar.update(1)
      checkpointer.check_background_save()   # A failed asynchronous save stops the run now.
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        values, flags, counts = jax.device_get((losses, [f for _, f in unchecked], substituted))
        check_finite(flags)
        read, unreadable = read + clips, unreadable + int(np.sum(counts))
        data.check_substituted('train', unreadable, read)
        loss, elapsed = float(np.mean(values)), time.time() - tick
        metrics = {'train/loss': loss, 'train/lr': float(schedule(step - 1)),
                   'train/clips_per_s': clips / elapsed,
                   'train/step_s': elapsed / len(values), 'data/wait_s': waited / len(values)}
        writer.write(step, metrics)
        bar.set_postfix(loss=f'{loss:.4f}', lr=f'{metrics["train/lr"]:.2e}',
                        clips_s=f'{metrics["train/clips_per_s"]:.1f}')
        losses, substituted, tick, clips, waited = [], [], time.time(), 0, 0.0
      evaluating = step % eval_every == 0 or last
      evaluated = None
      if evaluating:
        check_finite()
        evaluated = evaluate_and_export(step)
        metrics.update(evaluated or {})
      stopping = stop(step)                  # The same answer on every process.
      if (step % config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0 or last
          or evaluating or stopping):
        check_finite()
        check_parameters(step)
        save(step, evaluated, eval_pending=evaluating and evaluated is None)
      if stopping:
        logging.warning('SIGTERM: saved step %d; exiting. Run again to resume.', step)
        stopped = True
        break
    if not stopped and config.eval.final_views:   # test/*; `views` stays the 1-view val's
      metrics.update({k: v for k, v in final_test(total_steps).items() if k != 'views'})
  finally:
    stop.close()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if train_iter is not None and hasattr(train_iter, 'close'):
      train_iter.close()
    if workdir_lock is not None:
      workdir_lock.release()

  # ----------------------------------------------------------------------------- report
  # WORKDIR/report.md + .html and the summary in the log; not after a SIGTERM (a preempted
  # host has seconds): `python -m claver_jax.report WORKDIR` reports on a stopped run.
  if lead and stop.signal is None:
    report.write_and_log(workdir)
  return metrics
