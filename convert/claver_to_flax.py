r"""Converts an official CLAVER PyTorch checkpoint into a claver_jax model directory.

    python -m convert.claver_to_flax --src=CKPT.pth --out=DIR [--mask=kmt|kmct] \
        [--bpe=bpe_simple_vocab_16e6.txt.gz] [--overwrite]

The file holds {'model': state_dict, ...} or a bare state dict: CLIP in OpenAI's key layout plus
  visual.temporal_embedding                                        [1, T, W]
  visual.transformer_t.resblocks.{i}.temporal_attn.{in_proj_weight,in_proj_bias,out_proj.*}
  visual.transformer_t.resblocks.{i}.temporal_ln_1 / temporal_mlp.c_fc / c_proj / temporal_ln_2
T comes from the temporal embedding, the depth from the blocks. The checkpoint does not record
which Kronecker mask it was trained with: --mask says it (KMT by default).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from claver_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from claver_jax.models.claver import CLAVERConfig
from convert import common
from convert.common import (IGNORED_OPENAI_KEYS, ConversionError, Entry, count_layers,
                            infer_openai_config, map_params, openai_block_entries,
                            openai_entries, require_keys)

MASKS = ('kmt', 'kmct')


def temporal_entries(width: int, num_frames: int, layers: int) -> list[Entry]:
  entries = [Entry('temporal.temporal_embedding', ('visual.temporal_embedding',),
                   ((1, num_frames, width),), lambda x: x[0])]
  for i in range(layers):
    entries += openai_block_entries(f'visual.transformer_t.resblocks.{i}', f'temporal.blocks.{i}',
                                    width, 4 * width, prefix='temporal_')
  return entries


def convert(src: str | Path, out: str | Path, *, mask: str = 'kmt',
            bpe: str | Path | None = None, ignore_keys: str | None = None,
            vision_heads: int | None = None, text_heads: int | None = None,
            overwrite: bool = False) -> Path:
  """Converts the official checkpoint `src` into the model directory `out`."""
  if mask not in MASKS:
    raise ConversionError(f'--mask={mask!r}; the official model uses one of {MASKS}.')
  out = Path(out)
  source = common.open_source(src, out, overwrite, 'claver')
  tensors = source.tensors
  require_keys(tensors, ['visual.transformer_t.resblocks.0.temporal_attn.in_proj_weight'],
               'CLAVER')
  clip = infer_openai_config(tensors, vision_heads=vision_heads, text_heads=text_heads)
  embedding = tensors['visual.temporal_embedding']
  if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[2] != clip.vision_width:
    raise ConversionError(f'visual.temporal_embedding is {embedding.shape}; expected '
                          f'[1, T, {clip.vision_width}].')
  cfg = CLAVERConfig(clip=clip, num_frames=embedding.shape[1], temporal=mask,
                     temporal_layers=count_layers(tensors, 'visual.transformer_t.resblocks.'))
  entries = [dataclasses.replace(e, dst=f'clip.{e.dst}') for e in openai_entries(clip)]
  entries += temporal_entries(clip.vision_width, cfg.num_frames, cfg.temporal_depth)
  skip = re.compile(ignore_keys) if ignore_keys else None
  try:
    flat = map_params(tensors, entries,
                      lambda k: k in IGNORED_OPENAI_KEYS or bool(skip and skip.search(k)))
  except ConversionError as e:
    raise ConversionError(f'{e}\nIf the unexpected keys belong to modules claver_jax does not '
                          "use, skip them with --ignore_keys='REGEX'.") from e
  tokenizer = common.tokenizer_for(source, bpe, clip)
  common.write(out, 'claver', cfg, flat, src=src, source=source, layout='openai+claver',
               tokenizer=tokenizer, normalization=(IMAGENET_MEAN, IMAGENET_STD),
               overwrite=overwrite)
  print(f'Wrote {out}: CLAVER ({mask}, {cfg.num_frames} frames, {cfg.temporal_depth} temporal '
        f'layers) on a ViT with patch {clip.patch_size} at {clip.image_size} px, '
        f'{sum(v.size for v in flat.values()) / 1e6:.1f}M parameters.')
  return out


def define_flags() -> None:
  from absl import flags
  common.define_flags('Official CLAVER checkpoint (.pth).')
  flags.adopt_module_key_flags(common)   # --helpshort lists the shared flags too.
  flags.DEFINE_enum('mask', 'kmt', MASKS, 'The Kronecker mask the checkpoint was trained with.')
  flags.DEFINE_string('ignore_keys', None, 'Regex of checkpoint keys to skip (unused modules).')


if __name__ == '__main__':
  define_flags()
  common.run_cli(convert, ['mask', 'ignore_keys'])
