r"""Converts X-CLIP weights (official or transformers') into a claver_jax model directory.

    python -m convert.xclip_to_flax --src=PATH --out=DIR [--bpe=bpe_simple_vocab_16e6.txt.gz] \
        [--vision_heads=N --text_heads=N] [--overwrite]

PATH is one of
  * an official X-CLIP checkpoint (microsoft/VideoX, e.g. k400_16_8.pth): {'model': state_dict,
    ...} or a bare state dict, .pth or .safetensors: CLIP in OpenAI's key layout plus
      visual.transformer.resblocks.{i}.message_{fc,ln,attn}.*      the cross-frame messages
      mit.positional_embedding [1, T, E], mit.resblocks.{i}.*         the MIT
      prompts_generator.{norm,alpha,decoder.{i}.*}, prompts_visual_ln.*, prompts_visual_proj
    T comes from mit.positional_embedding, layer counts from the keys; heads follow the official
    rule (width // 64) unless --vision_heads / --text_heads say otherwise;
  * a transformers XCLIPModel directory (config.json + model.safetensors or pytorch_model.bin;
    safetensors are read without torch). Its text tower pools at the argmax of the ids, as
    transformers forces for X-CLIP.

The directory records the input normalisation the weights expect: a transformers directory's
preprocessor_config.json, else ImageNet's mean/std, which the official code normalises with.
Nothing is written to DIR unless the conversion succeeds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from claver_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from claver_jax.models.xclip import XCLIPConfig
from convert import common
from convert.common import (HF_ACTIVATIONS, ConversionError, Entry, count_layers,
                            hf_attention_entries, hf_block_entries, hf_entries, infer_hf_config,
                            infer_openai_config, layer_norm_entries, linear_entries,
                            openai_attention_entries, openai_block_entries, openai_entries,
                            require_keys)


# ---------------------------------------------------------------------------------------------
# Key maps of X-CLIP's new parts (the towers' are CLIP's)
# ---------------------------------------------------------------------------------------------
def message_entries(cfg: XCLIPConfig, src: str, attention) -> list[Entry]:
  """The message parts of every cross-frame block; `src` names block i as src.format(i) and
  `attention` maps its message_attn (openai_ or hf_attention_entries)."""
  w, entries = cfg.clip.vision_width, []
  for i in range(cfg.clip.vision_layers):
    s, d = src.format(i), f'visual.blocks.{i}'
    entries += [*linear_entries(f'{d}.message_fc', f'{s}.message_fc', w, w),
                *layer_norm_entries(f'{d}.message_ln', f'{s}.message_ln', w),
                *attention(f'{d}.message_attn', f'{s}.message_attn', w)]
  return entries


def prompt_entries(cfg: XCLIPConfig, *, norm: str, visual_ln: str,
                   visual_proj: str) -> list[Entry]:
  """The prompt generator (its input LayerNorm is `norm`) and the visual tokens' LayerNorm and
  projection, named as the source names them."""
  e, w, p = cfg.clip.embed_dim, cfg.clip.vision_width, 'prompts_generator'
  entries = [*layer_norm_entries(f'{p}.norm', f'{p}.{norm}', e),
             Entry(f'{p}.alpha', (f'{p}.alpha',), ((e,),)),
             *layer_norm_entries('prompts_visual_ln', visual_ln, w),
             Entry('prompts_visual_proj', (visual_proj,), ((w, e),))]
  for i in range(cfg.prompt_layers):
    s = f'{p}.decoder.{i}'
    entries += [*(entry for x in 'qkv' for entry in linear_entries(
                    f'{s}.cross_attn.{x}_proj', f'{s}.cross_attn.{x}_proj', e, e, bias=False)),
                *linear_entries(f'{s}.cross_attn.proj', f'{s}.cross_attn.proj', e, e),
                *layer_norm_entries(f'{s}.norm1', f'{s}.norm1', e),
                *layer_norm_entries(f'{s}.norm3', f'{s}.norm3', e),
                *linear_entries(f'{s}.mlp.c_fc', f'{s}.mlp.0', e, 4 * e),
                *linear_entries(f'{s}.mlp.c_proj', f'{s}.mlp.3', 4 * e, e)]
  return entries


# The two layouts' names: (CLIP's key map, block i, its attention's map, MIT positions, MIT
# block map, MIT block i, the prompt generator's input norm, visual tokens' LayerNorm, projection).
LAYOUTS = {
    'openai': (openai_entries, 'visual.transformer.resblocks.{}', openai_attention_entries,
               'mit.positional_embedding', openai_block_entries, 'mit.resblocks.{}', 'norm',
               'prompts_visual_ln', 'prompts_visual_proj'),
    'hf': (lambda clip: hf_entries(clip, pre_layernorm='pre_layernorm'),
           'vision_model.encoder.layers.{}', hf_attention_entries, 'mit.position_embedding',
           hf_block_entries, 'mit.encoder.layers.{}', 'layernorm', 'prompts_visual_layernorm',
           'prompts_visual_projection'),
}


def xclip_entries(cfg: XCLIPConfig, layout: str) -> list[Entry]:
  """The whole key map of an official ('openai') or transformers ('hf') X-CLIP."""
  (towers, block, attention, mit_embedding, mit_block_entries, mit_block, norm, visual_ln,
   visual_proj) = LAYOUTS[layout]
  e = cfg.clip.embed_dim
  entries = towers(cfg.clip) + message_entries(cfg, block, attention)
  entries.append(Entry('mit.positional_embedding', (mit_embedding,), ((1, cfg.num_frames, e),),
                       lambda x: x[0]))
  for i in range(cfg.mit_layers):
    entries += mit_block_entries(mit_block.format(i), f'mit.blocks.{i}', e, cfg.mit_hidden_dim)
  return entries + prompt_entries(cfg, norm=norm, visual_ln=visual_ln, visual_proj=visual_proj)


# ---------------------------------------------------------------------------------------------
# Architecture from shapes (and, for transformers directories, config.json)
# ---------------------------------------------------------------------------------------------
def _xclip_config(**fields) -> XCLIPConfig:
  try:
    return XCLIPConfig(**fields)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def _frames(tensors: dict[str, np.ndarray], key: str, embed_dim: int) -> int:
  embedding = tensors[key]
  if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[2] != embed_dim:
    raise ConversionError(f'{key} is {embedding.shape}; expected [1, T, {embed_dim}].')
  return embedding.shape[1]


def infer_official_config(tensors: dict[str, np.ndarray], *, vision_heads: int | None = None,
                          text_heads: int | None = None) -> XCLIPConfig:
  require_keys(tensors, ['mit.positional_embedding', 'prompts_generator.alpha',
                         'visual.transformer.resblocks.0.message_fc.weight'], 'X-CLIP')
  clip = infer_openai_config(tensors, vision_heads=vision_heads, text_heads=text_heads)
  require_keys(tensors, ['mit.resblocks.0.mlp.c_fc.weight'], 'X-CLIP')
  return _xclip_config(
      clip=clip, num_frames=_frames(tensors, 'mit.positional_embedding', clip.embed_dim),
      mit_layers=count_layers(tensors, 'mit.resblocks.'),
      mit_mlp_dim=tensors['mit.resblocks.0.mlp.c_fc.weight'].shape[0],
      prompt_layers=count_layers(tensors, 'prompts_generator.decoder.'))


def infer_hf_xclip_config(tensors: dict[str, np.ndarray], hf: dict) -> XCLIPConfig:
  """The towers as infer_hf_config reads them (text pooled at the argmax of the ids, as
  transformers forces for X-CLIP); the new parts from the tensors and config.json: every field
  transformers' XCLIPModel computes with (the MIT's width, MLP, depth and heads, the frames, the
  prompt generator's depth, heads, activation and alpha; dropouts only act in training)."""
  require_keys(tensors, ['mit.position_embedding', 'prompts_generator.alpha',
                         'vision_model.pre_layernorm.weight',
                         'mit.encoder.layers.0.mlp.fc1.weight'], 'transformers X-CLIP')
  clip = infer_hf_config(tensors, hf)
  clip = dataclasses.replace(clip, text_pooling='argmax', eos_token_id=clip.vocab_size - 1)
  vc, e = hf['vision_config'], clip.embed_dim
  frames = _frames(tensors, 'mit.position_embedding', e)
  mit_layers = count_layers(tensors, 'mit.encoder.layers.')
  mit_mlp_dim = tensors['mit.encoder.layers.0.mlp.fc1.weight'].shape[0]
  mit_width = vc.get('mit_hidden_size', 512)
  if mit_width != e:
    raise ConversionError(f'config.json vision_config.mit_hidden_size={mit_width} but '
                          f'projection_dim={e}: the MIT takes the projected frame embeddings, so '
                          'transformers\' XCLIPModel cannot run this config either.')
  said = {'vision_config.mit_intermediate_size': (vc.get('mit_intermediate_size', 2048),
                                                  mit_mlp_dim),
          'vision_config.mit_num_hidden_layers': (vc.get('mit_num_hidden_layers', 1), mit_layers),
          'vision_config.num_frames': (vc.get('num_frames', 8), frames)}
  disagree = [f'  config.json {key}={value} but the weights need {need}'
              for key, (value, need) in said.items() if value != need]
  if disagree:
    raise ConversionError('config.json disagrees with the weights:\n' + '\n'.join(disagree))
  act = hf.get('prompt_hidden_act', 'quick_gelu')
  if act not in HF_ACTIVATIONS:
    raise ConversionError(f'prompt_hidden_act={act!r} is not supported; use one of '
                          f'{list(HF_ACTIVATIONS)}.')
  return _xclip_config(
      clip=clip, num_frames=frames, mit_layers=mit_layers,
      mit_heads=vc.get('mit_num_attention_heads', 8), mit_mlp_dim=mit_mlp_dim,
      prompt_layers=count_layers(tensors, 'prompts_generator.decoder.'),
      prompt_heads=hf.get('prompt_num_attention_heads', 8),
      prompt_alpha=hf.get('prompt_alpha', 0.1),
      prompt_activation=(HF_ACTIVATIONS[act] if HF_ACTIVATIONS[act] != clip.activation
                         else None))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def convert(src: str | Path, out: str | Path, *, bpe: str | Path | None = None,
            vision_heads: int | None = None, text_heads: int | None = None,
            overwrite: bool = False) -> Path:
  """Converts the X-CLIP `src` into the model directory `out`; see the module docstring."""
  out = Path(out)
  source = common.open_source(src, out, overwrite, 'xclip')
  cfg, flat = common.map_source(
      source, hf=(infer_hf_xclip_config, lambda c: xclip_entries(c, 'hf')),
      openai=(infer_official_config, lambda c: xclip_entries(c, 'openai')),
      vision_heads=vision_heads, text_heads=text_heads)
  tokenizer = common.tokenizer_for(source, bpe, cfg.clip)
  # X-CLIP describes a class by its name alone; predict reads the templates from here.
  common.write(out, 'xclip', cfg, flat, src=src, source=source, layout=f'{source.layout}+xclip',
               tokenizer=tokenizer,
               normalization=source.normalization or (IMAGENET_MEAN, IMAGENET_STD),
               overwrite=overwrite, templates=['{}'])
  c = cfg.clip
  print(f'Wrote {out}: X-CLIP ({source.layout} layout, {cfg.num_frames} frames, '
        f'{cfg.mit_layers} MIT and {cfg.prompt_layers} prompt layers) on a ViT with patch '
        f'{c.patch_size} at {c.image_size} px, {sum(v.size for v in flat.values()) / 1e6:.1f}M '
        f'parameters, tokenizer {"included" if tokenizer else "absent"}.')
  return out


def define_flags() -> None:
  from absl import flags
  common.define_flags('Official X-CLIP checkpoint or transformers XCLIPModel directory.')
  flags.adopt_module_key_flags(common)   # --helpshort lists the shared flags too.


if __name__ == '__main__':
  define_flags()
  common.run_cli(convert)
