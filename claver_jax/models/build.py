"""Model building for a run: the family config.model.name names, checked against config.init
(`model_family`, `check_init`), its tokenizer (`make_tokenizer`), the model itself from a
checkpoint, a CLIP or from scratch (`make_model`), the normalisation a checkpoint records
(`checkpoint_normalization`) and WORKDIR/model, a run's export (`export_model`). Train, eval
and the tools (memory, benchmarks) build models only through these.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from claver_jax import distributed, optim
from claver_jax.models import CLIPConfig, families, load
from claver_jax.models.clip import sincos_position_embedding
from claver_jax.models.io import (input_normalization, load_towers, model_dir,
                                  read_model_config, write_model_dir)
from claver_jax.run_config import ConfigError
from claver_jax.text import load_tokenizer
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, resolve_aspects,
                                     resolve_templates)
from claver_jax.text.tokenizer import Tokenizer, train_tokenizer


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
