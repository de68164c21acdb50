"""Video model families: the registry that train, evaluate, zero-shot and predict go through.

Every family's module has one video-text interface, and the loop uses nothing else:
  encode_video(video float32 [B, T, H, W, 3]) -> [B, E]
  encode_text(tokens int32 [N, S]) -> [N, E]             projected, not normalised
  video_features(video) -> a pytree, every leaf with leading dim B (CLAVER: the embedding)
  class_logits(features, text [A, C, E]) -> [A, B, C]   text not normalised; exp(logit_scale) in
  logits(video, tokens) -> [B, N]
and its config has `clip` (the CLIPConfig of its towers), `num_frames`, to_dict and from_dict.

  name            module         image tower            text tower            new parts
                                                                                (x new_lr_multiplier)
  claver          CLAVER         clip.visual.*          clip.text.*           temporal.*
                                 (ln_post, proj and class_embedding: 'image_head', trained
                                 under freeze_image, as the official fix_image)
  xclip           XCLIP          visual.* but messages  text.*, logit_scale   visual.blocks.*.message_*,
                                                                                mit.*, prompts_*
  motion_prompts  MotionPrompts  clip.visual.*          clip.text.*,          down.*, up.*, motion.*,
                                                        clip.logit_scale      prompts.*,
                                                                                communication.*
(X-CLIP's logit scale goes with its text tower, which the official code freezes with it; so does
that of motion prompts, whose towers are always frozen.)

Model directories of one family can give their CLIP towers to another (`towers`, `load_towers`):
config.init.towers_only (models.build.make_model).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from claver_jax.models.claver import CLAVER, CLAVERConfig, claver_from_clip
from claver_jax.models.clip import CLIP, CLIPConfig, get_preset
from claver_jax.models.motion_prompts import (MotionPrompts, MotionPromptsConfig,
                                              motion_prompts_from_clip)
from claver_jax.models.xclip import XCLIP, XCLIPConfig, xclip_from_clip

GROUPS = ('image', 'image_head', 'text', 'new', 'base')


@dataclasses.dataclass(frozen=True)
class Family:
  """name: `config.model.name` and the `kind` in a model directory's config.json.
  config_for_run(clip config, run config) -> the family's config for a run.
  from_clip(clip, config, *, dtype, rngs) -> a model with a CLIP's towers and fresh new parts.
  param_groups: (regex on a parameter path, group); the first match wins, 'base' if none does.
  vision: the path of the ViT. temporal_embedding: the path of the [T, D] parameter that ties a
  model to its frame count (absent in some variants, e.g. CLAVER's 'mean').
  run_options: config.model keys that a run sets on a model it loads (config.init.checkpoint),
  as `load()` keywords: how it computes, never its parameters.
  towers: the path of the plain CLIP (towers and logit scale) inside the model, or None where the
  towers compute with parts of the family's own (X-CLIP's cross-frame messages).
  frozen_towers: the family trains on frozen CLIP towers only (a run needs an init CLIP, or
  another model's towers, and both towers frozen).
  trainable_budget: trainable parameters at most this fraction of the towers' (a warning above).
  """
  name: str
  config_class: type
  module_class: type
  config_for_run: Callable[[CLIPConfig, ml_collections.ConfigDict], Any]
  from_clip: Callable[..., nnx.Module]
  param_groups: tuple[tuple[str, str], ...]
  vision: str
  temporal_embedding: str
  run_options: tuple[str, ...] = ()
  towers: str | None = None
  frozen_towers: bool = False
  trainable_budget: float | None = None

  def group_of(self, path: str) -> str:
    """One of GROUPS for a dotted parameter path (claver_jax.optim says what each means)."""
    for pattern, group in self.param_groups:
      if re.search(pattern, path):
        return group
    return 'base'


def _claver_config(clip: CLIPConfig, config: ml_collections.ConfigDict) -> CLAVERConfig:
  return CLAVERConfig(clip=clip, num_frames=config.data.num_frames,
                      temporal=config.model.temporal,
                      temporal_layers=config.model.get('temporal_layers'),
                      temporal_heads=config.model.get('temporal_heads'),
                      attention=config.model.get('attention', 'auto'))


def _xclip_config(clip: CLIPConfig, config: ml_collections.ConfigDict) -> XCLIPConfig:
  m = config.model
  return XCLIPConfig(clip=clip, num_frames=config.data.num_frames, mit_layers=m.xclip_mit_layers,
                     mit_heads=m.get('temporal_heads'), prompt_layers=m.xclip_prompt_layers,
                     prompt_alpha=m.xclip_prompt_alpha)


def _motion_prompts_config(clip: CLIPConfig,
                           config: ml_collections.ConfigDict) -> MotionPromptsConfig:
  m = config.model
  return MotionPromptsConfig(clip=clip, num_frames=config.data.num_frames, width=m.motion_width,
                             layers=m.motion_layers, heads=m.get('temporal_heads'),
                             long_term=m.motion_long_term,
                             fusion=m.motion_fusion, num_prompts=m.motion_num_prompts,
                             prompt_gate=m.motion_prompt_gate)


FAMILIES: dict[str, Family] = {
    'claver': Family(
        'claver', CLAVERConfig, CLAVER, _claver_config, claver_from_clip,
        param_groups=((r'^clip\.visual\.(ln_post\.|proj$|class_embedding$)', 'image_head'),
                      (r'^clip\.visual\.', 'image'), (r'^clip\.text\.', 'text'),
                      (r'^temporal\.', 'new')),
        vision='clip.visual', temporal_embedding='temporal.temporal_embedding',
        run_options=('attention',), towers='clip'),
    'xclip': Family(
        'xclip', XCLIPConfig, XCLIP, _xclip_config, xclip_from_clip,
        param_groups=((r'^visual\.blocks\.\d+\.message_', 'new'), (r'^(mit\.|prompts_)', 'new'),
                      (r'^visual\.', 'image'), (r'^(text\.|logit_scale$)', 'text')),
        vision='visual', temporal_embedding='mit.positional_embedding'),
    'motion_prompts': Family(
        'motion_prompts', MotionPromptsConfig, MotionPrompts, _motion_prompts_config,
        motion_prompts_from_clip,
        param_groups=((r'^clip\.visual\.', 'image'), (r'^clip\.(text\.|logit_scale$)', 'text'),
                      (r'^(down|up|motion|prompts|communication)\.', 'new')),
        vision='clip.visual', temporal_embedding='motion.positional_embedding', towers='clip',
        frozen_towers=True, trainable_budget=0.05),
}


def get(name: str) -> Family:
  """The family called `name` (config.model.name), or a clear error."""
  if name not in FAMILIES:
    raise ValueError(f'config.model.name={name!r} is not a model family; choose one of '
                     f'{list(FAMILIES)}.')
  return FAMILIES[name]


def of(model: nnx.Module) -> Family:
  """The family of a model instance."""
  for family in FAMILIES.values():
    if isinstance(model, family.module_class):
      return family
  raise ValueError(f'A {type(model).__name__} is not a video model; families: {list(FAMILIES)}.')


def model_config(config: ml_collections.ConfigDict, clip: CLIPConfig | None = None) -> Any:
  """The config of the model a run config describes: config.model.name's family, on `clip`, or
  else on config.model.arch at config.data.image_size (a preset, or 'custom': the fields in
  config.model.clip, the rest CLIPConfig's defaults)."""
  family = get(config.model.name)
  if clip is None and config.model.arch == 'custom':
    clip = CLIPConfig(**{**config.model.clip.to_dict(), 'image_size': config.data.image_size})
  elif clip is None:
    clip = get_preset(config.model.arch)
    if config.data.image_size != clip.image_size:
      clip = dataclasses.replace(clip, image_size=config.data.image_size)
  return family.config_for_run(clip, config)


def of_config(cfg: Any) -> Family:
  """The family of a model config."""
  for family in FAMILIES.values():
    if isinstance(cfg, family.config_class):
      return family
  raise ValueError(f'A {type(cfg).__name__} is not a video model config.')


def _find(node: Any, path: str) -> Any:
  for name in path.split('.'):
    node = getattr(node, name, None)
  return node


def vision_tower(model: nnx.Module) -> nnx.Module:
  """The model's ViT (a clip.VisionTransformer)."""
  return _find(model, of(model).vision)


def check_has_towers(kind: str, where: Any) -> None:
  """An error unless a model of `kind` ('clip' or a family name) has plain CLIP towers."""
  if kind != 'clip' and get(kind).towers is None:
    raise ValueError(f'{where} holds a {kind} model, which has no plain CLIP towers to give: its '
                     'image tower computes with parts of its own. Models with plain towers: '
                     f'{["clip"] + [f.name for f in FAMILIES.values() if f.towers]}.')


def clip_towers(model: nnx.Module) -> CLIP:
  """The model's CLIP towers and logit scale, as the CLIP inside it (a CLIP is its own); an error
  for a family whose towers compute with its own parts (X-CLIP)."""
  if isinstance(model, CLIP):
    return model
  check_has_towers(of(model).name, 'This')
  return _find(model, of(model).towers)


def temporal_embedding(model: nnx.Module) -> nnx.Param | None:
  """The [T, D] parameter that ties the model to its frame count, or None."""
  return _find(model, of(model).temporal_embedding)


def resample_temporal_embedding(embedding: jax.Array, num_frames: int) -> jax.Array:
  """[T, D] -> [num_frames, D], linear interpolation over time (half-frame centres)."""
  return jax.image.resize(embedding, (num_frames, embedding.shape[1]), method='linear')


def with_num_frames(model: nnx.Module, num_frames: int, *, resample: bool = True) -> nnx.Module:
  """The same model for clips of `num_frames`, its temporal embedding resampled linearly."""
  family, cfg = of(model), model.cfg
  if num_frames == cfg.num_frames:
    return model
  path = family.temporal_embedding if temporal_embedding(model) is not None else None
  if path and not resample:
    raise ValueError(f'The checkpoint was trained with {cfg.num_frames} frames and {num_frames} '
                     f'were asked for, with resampling of the temporal embedding turned off '
                     f'({path}).')
  if path:
    logging.warning('Resampling the temporal embedding from %d to %d frames (linear, %s).',
                    cfg.num_frames, num_frames, path)
  new = dataclasses.replace(cfg, num_frames=num_frames)
  dtype = vision_tower(model).dtype
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: family.module_class(new, dtype=dtype, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(nnx.state(model))
  if path:
    *parents, leaf = path.split('.')
    node = pure
    for name in parents:
      node = node[name]
    node[leaf] = resample_temporal_embedding(node[leaf], num_frames)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
