r"""Converts PyTorch CLIP weights into a claver_jax model directory.

    python -m convert.clip_to_flax --src=PATH --out=DIR [--bpe=bpe_simple_vocab_16e6.txt.gz] \
        [--image_size=336] [--overwrite]

PATH is one of
  * an HF CLIP directory: config.json with model.safetensors or pytorch_model.bin (or their
    shards, *.index.json: every shard a file of the directory);
  * an OpenAI CLIP checkpoint: the TorchScript archive OpenAI distributes (ViT-B-32.pt, ...), a
    plain state dict in OpenAI key layout saved by torch.save, or the same state dict as
    .safetensors.
Nothing in a checkpoint runs: safetensors and the zip archives of torch.save and torch.jit.save
are read without torch (convert.torch_pickle: tensors only, never torch.jit.load); only the
legacy pre-1.6 torch.save format needs torch, >= 2.6, through torch.load(weights_only=True).

The architecture is inferred from the tensors' shapes. Head counts cannot be seen in shapes: HF
sources give them in config.json; for OpenAI sources they follow OpenAI's width // 64 unless
--vision_heads / --text_heads say otherwise. Nothing is written to DIR unless the conversion
succeeds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
from claver_jax.models.clip import CLIPConfig
from convert import common
from convert.common import ConversionError, Source


def resize_positional_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
  """[1 + g*g, D] -> [1 + grid*grid, D]: the class row kept, the patch grid resampled bicubically."""
  import jax
  old = math.isqrt(pos.shape[0] - 1)
  if old == grid:
    return pos
  patches = pos[1:].reshape(old, old, -1)
  resized = jax.image.resize(patches, (grid, grid, pos.shape[1]), method='bicubic')
  return np.concatenate([pos[:1], np.asarray(resized).reshape(grid * grid, -1)], axis=0)


def source_to_params(source: Source, *, vision_heads: int | None = None,
                     text_heads: int | None = None,
                     image_size: int | None = None) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
  """-> (config, flat params) of the CLIP in `source`, optionally at another image size."""
  cfg, flat = common.map_source(source, hf=(common.infer_hf_config, common.hf_entries),
                                openai=(common.infer_openai_config, common.openai_entries),
                                vision_heads=vision_heads, text_heads=text_heads)
  if image_size and image_size != cfg.image_size:
    if image_size % cfg.patch_size:
      raise ConversionError(f'--image_size={image_size} is not a multiple of the patch size '
                            f'{cfg.patch_size}.')
    flat['visual.positional_embedding'] = resize_positional_embedding(
        flat['visual.positional_embedding'], image_size // cfg.patch_size)
    cfg = dataclasses.replace(cfg, image_size=image_size)
  return cfg, flat


def convert(src: str | Path, out: str | Path, *, bpe: str | Path | None = None,
            image_size: int | None = None, vision_heads: int | None = None,
            text_heads: int | None = None, overwrite: bool = False) -> Path:
  """Converts `src` into the model directory `out`; see the module docstring."""
  out = Path(out)
  source = common.open_source(src, out, overwrite, 'clip')
  cfg, flat = source_to_params(source, vision_heads=vision_heads, text_heads=text_heads,
                               image_size=image_size)
  tokenizer = common.tokenizer_for(source, bpe, cfg)
  if tokenizer is None:
    logging.warning('No tokenizer written: %s has none; pass --bpe=bpe_simple_vocab_16e6.txt.gz '
                    'to include OpenAI\'s.', src)
  common.write(out, 'clip', cfg, flat, src=src, source=source, layout=source.layout,
               tokenizer=tokenizer, normalization=source.normalization or (CLIP_MEAN, CLIP_STD),
               overwrite=overwrite)
  num_params = sum(v.size for v in flat.values())
  print(f'Wrote {out}: {source.layout}-layout CLIP ({source.container}), {num_params / 1e6:.1f}M '
        f'parameters, image {cfg.image_size}, patch {cfg.patch_size}, tokenizer '
        f'{"included" if tokenizer else "absent"}.')
  return out


def define_flags() -> None:
  from absl import flags
  common.define_flags('HF CLIP directory or OpenAI CLIP checkpoint.')
  flags.adopt_module_key_flags(common)   # --helpshort lists the shared flags too.
  flags.DEFINE_integer('image_size', None, 'Resample the positional embedding to this image size '
                       '(e.g. 336), bicubically over the patch grid.')


if __name__ == '__main__':
  define_flags()
  common.run_cli(convert, ['image_size'])
