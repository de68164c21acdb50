r"""What the three converters (clip_to_flax, claver_to_flax, xclip_to_flax) share.

  * Reading a checkpoint into float32 numpy tensors, never running it (`read_source`, `Source`):
    HF directories (safetensors or pytorch_model.bin, or their shards), safetensors files, and
    torch.save / TorchScript archives through convert.torch_pickle; and sending a checkpoint of
    another family to its converter (`open_source`).
  * The CLIP towers' architecture from the tensors' shapes (`infer_openai_config`,
    `infer_hf_config`) and their key maps (`openai_entries`, `hf_entries` and their blocks):
    every family holds these towers.
  * Applying a key map (`map_params`, `map_source`), checking the result against the model that
    `load()` builds, and writing the model directory (`tokenizer_for`, `write`).
  * The command line: the flags every converter takes (`define_flags`) and its main (`run_cli`),
    which prints bad input as one line `error: ...` and exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from claver_jax.compat import require_torch
from claver_jax.models.clip import CLIPConfig
from claver_jax.text.tokenizer import read_openai_bpe, read_vocab_merges
from convert import torch_pickle

ACCEPTED_FORMATS = (
    'an HF CLIP directory (config.json + model.safetensors or pytorch_model.bin, or their '
    'shards); an OpenAI CLIP TorchScript archive (e.g. ViT-B-32.pt); an OpenAI-layout '
    'state dict saved with torch.save (.pt/.pth/.bin) or as .safetensors')

# Keys that some checkpoints carry besides the weights.
IGNORED_OPENAI_KEYS = {'input_resolution', 'context_length', 'vocab_size'}
_IGNORED_HF = re.compile(r'.*position_ids$')

HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
                  'gelu_pytorch_tanh': 'gelu_tanh'}


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message says why and what to do."""


@dataclasses.dataclass
class Source:
  tensors: dict[str, np.ndarray]
  layout: str                      # 'hf' or 'openai'
  container: str                   # 'safetensors', 'torchscript', 'torch'
  hf_config: dict[str, Any] | None = None
  tokenizer: tuple[dict[str, int], list[str]] | None = None
  # (mean, std) on 0-1 pixels, from an HF directory's preprocessor_config.json.
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # framework='flax' reads bf16, which numpy cannot.
  try:
    with safe_open(str(path), framework='flax') as f:
      return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers.
    raise ConversionError(f'{path} is not a readable safetensors file: {e}') from e


def _to_numpy(x: Any) -> np.ndarray:
  a = np.asarray(x)
  return a.astype(np.float32) if a.dtype.kind == 'f' or a.dtype.name == 'bfloat16' else a


def _torch_tensors(state: Any, path: Path) -> dict[str, np.ndarray]:
  """A torch checkpoint's object (a state dict, or one under 'state_dict' / 'model') -> its
  arrays by name, DataParallel's 'module.' prefix removed."""
  if isinstance(state, dict):
    for wrapper in ('state_dict', 'model'):
      if isinstance(state.get(wrapper), dict):
        state = state[wrapper]
        break
  if not isinstance(state, dict) or not state:
    raise ConversionError(f'{path} holds a {type(state).__name__}, not a state dict of tensors. '
                          f'Accepted: {ACCEPTED_FORMATS}.')
  tensors = {}
  for k, v in state.items():
    if hasattr(v, 'detach'):                     # A torch.Tensor, from the legacy reader.
      v = v.detach().cpu()
      v = v.float().numpy() if v.is_floating_point() else v.numpy()
    if isinstance(v, np.ndarray):
      tensors[k] = _to_numpy(v)
  if tensors and all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


def _read_torch_file(path: Path) -> tuple[dict[str, np.ndarray], str]:
  """A torch.save or TorchScript file -> (arrays by name, container). Zip archives are read by
  convert.torch_pickle, which runs nothing they contain (never torch.jit.load); only the legacy
  pre-1.6 format needs torch, through torch.load(weights_only=True) on torch >= 2.6."""
  if zipfile.is_zipfile(path):
    try:
      data, torchscript, declared = torch_pickle.read_archive(path)
    except torch_pickle.UnsafeCheckpointError as e:
      raise ConversionError(f'{path} cannot be read as a checkpoint of tensors: {e}. Accepted: '
                            f'{ACCEPTED_FORMATS}.') from e
    if torchscript:
      if not isinstance(data, torch_pickle.Opaque):
        raise ConversionError(f'{path} is a TorchScript archive without a module in data.pkl.')
      return torch_pickle.module_state_dict(data, declared), 'torchscript'
    return _torch_tensors(data, path), 'torch'
  with open(path, 'rb') as f:
    magic = f.read(2)
  if magic == b'PK':
    raise ConversionError(f'{path} starts like a zip (torch.save) archive but is not a complete '
                          'one: the file is truncated or corrupt. Download or copy it again.')
  if magic[:1] != b'\x80':  # Not a pickle: the legacy torch.save format starts with one.
    raise ConversionError(f'Unrecognised checkpoint format: {path}. Accepted: {ACCEPTED_FORMATS}.')
  torch = require_torch(f'{path} is in the legacy (pre-1.6) torch.save format; reading it',
                        ConversionError)
  try:
    state = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:
    raise ConversionError(f'{path} cannot be read by torch.load(weights_only=True) '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). '
                          f'Accepted: {ACCEPTED_FORMATS}.') from e
  return _torch_tensors(state, path), 'torch'


def _read_hf_tokenizer(directory: Path) -> tuple[dict[str, int], list[str]] | None:
  if (directory / 'vocab.json').is_file() and (directory / 'merges.txt').is_file():
    return read_vocab_merges(directory)
  if (directory / 'tokenizer.json').is_file():
    model = json.loads((directory / 'tokenizer.json').read_text(encoding='utf-8')).get('model', {})
    if model.get('type') == 'BPE':
      merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
      return model['vocab'], merges
  return None


def _read_hf_normalization(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  preprocessor = directory / 'preprocessor_config.json'
  if not preprocessor.is_file():
    return None
  config = json.loads(preprocessor.read_text())
  if not {'image_mean', 'image_std'} <= set(config):
    return None
  return tuple(config['image_mean']), tuple(config['image_std'])


def _index_shards(directory: Path, index_name: str) -> list[Path]:
  """The shard files an HF index (*.index.json) names, each a path inside `directory`: a name
  that leads elsewhere (absolute, or out through '..') is an error, not a file read. Links in
  the directory are followed (an HF cache snapshot links its files to blobs/)."""
  index = directory / index_name
  try:
    names = sorted(set(json.loads(index.read_text(encoding='utf-8'))['weight_map'].values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f'{index} is not an HF shard index (a JSON object with a weight_map of '
                          f'tensor name -> shard file): {e}') from e
  shards = []
  for name in names:
    relative = os.path.normpath(str(name))
    if (not isinstance(name, str) or os.path.isabs(relative) or relative == '..'
        or relative.startswith('..' + os.sep)):
      raise ConversionError(f'{index} names the shard {name!r}, which is outside {directory}: '
                            'shard entries must be file names in the model directory.')
    shard = directory / relative
    if not shard.is_file():
      raise ConversionError(f'{index} names the shard {name}, which is missing from {directory}.')
    shards.append(shard)
  return shards


def _read_hf_dir(path: Path) -> Source:
  config = json.loads((path / 'config.json').read_text())
  if config.get('format') == 'claver_jax.model':
    raise ConversionError(f'{path} is already a claver_jax model directory: load it with '
                          '`claver_jax.models.load`, no conversion needed.')
  if 'vision_config' not in config or 'text_config' not in config:
    raise ConversionError(
        f'{path / "config.json"} is not a CLIP config (model_type={config.get("model_type")!r}; '
        'it needs vision_config and text_config). Accepted: ' + ACCEPTED_FORMATS + '.')
  tensors: dict[str, np.ndarray] = {}
  if (path / 'model.safetensors').is_file():
    tensors, container = _read_safetensors(path / 'model.safetensors'), 'safetensors'
  elif (path / 'model.safetensors.index.json').is_file():
    for shard in _index_shards(path, 'model.safetensors.index.json'):
      tensors.update(_read_safetensors(shard))
    container = 'safetensors'
  elif (path / 'pytorch_model.bin').is_file():
    tensors, container = _read_torch_file(path / 'pytorch_model.bin')
  elif (path / 'pytorch_model.bin.index.json').is_file():
    for shard in _index_shards(path, 'pytorch_model.bin.index.json'):
      shard_tensors, container = _read_torch_file(shard)
      tensors.update(shard_tensors)
  else:
    raise ConversionError(
        f'{path} has config.json but no weights: expected model.safetensors, '
        'model.safetensors.index.json with its shards, pytorch_model.bin, or '
        'pytorch_model.bin.index.json with its shards.')
  return Source(tensors, 'hf', container, config, _read_hf_tokenizer(path),
                _read_hf_normalization(path))


def read_source(path: str | Path) -> Source:
  """Reads any accepted checkpoint into float32 numpy tensors."""
  path = Path(path)
  if not path.exists():
    raise ConversionError(f'--src {path} does not exist.')
  if path.is_dir():
    if (path / 'config.json').is_file():
      return _read_hf_dir(path)
    raise ConversionError(f'{path} is a directory without config.json. Accepted: '
                          f'{ACCEPTED_FORMATS}.')
  if path.suffix == '.safetensors':
    tensors, container = _read_safetensors(path), 'safetensors'
  else:
    tensors, container = _read_torch_file(path)
  keys = set(tensors)
  if not keys:
    raise ConversionError(f'{path} holds no tensors. Accepted: {ACCEPTED_FORMATS}.')
  if 'visual.conv1.weight' in keys:
    return Source(tensors, 'openai', container)
  if 'vision_model.embeddings.patch_embedding.weight' in keys:
    raise ConversionError(f'{path} holds HF-layout CLIP weights; pass the HF directory with its '
                          'config.json instead, so that head counts and activations are known.')
  if any(k.startswith('visual.layer1.') or k.startswith('visual.attnpool.') for k in keys):
    raise ConversionError(f'{path} is a ResNet CLIP; claver_jax needs a ViT visual tower '
                          '(ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336).')
  raise ConversionError(
      f'{path} is not a CLIP state dict: its keys start {sorted(keys)[:5]}, but an OpenAI-layout '
      f'CLIP has visual.conv1.weight, token_embedding.weight, .... Accepted: {ACCEPTED_FORMATS}.')


# What each converter reads, for the error that sends a checkpoint to the right one.
FAMILY_NAMES = {'clip': 'a plain CLIP', 'claver': 'a CLAVER checkpoint',
                'xclip': 'an X-CLIP checkpoint'}


def checkpoint_family(source: Source) -> str:
  """'xclip', 'claver' or 'clip': which of the converters reads `source`. A temporal embedding
  makes a CLAVER checkpoint whatever else it holds (X-CLIP modules may ride along)."""
  keys = source.tensors
  if 'visual.temporal_embedding' in keys:
    return 'claver'
  if (source.hf_config or {}).get('model_type') == 'xclip' or any(
      k.startswith('mit.') or k.startswith('prompts_generator.') for k in keys):
    return 'xclip'
  return 'clip'


def require_family(source: Source, family: str, src: Any) -> None:
  """A clear error naming the right converter when `source` is not of `family`."""
  found = checkpoint_family(source)
  if found != family:
    raise ConversionError(f'{src} holds {FAMILY_NAMES[found]}, not {FAMILY_NAMES[family]}; '
                          f'convert it with `python -m convert.{found}_to_flax`.')

def open_source(src: str | Path, out: str | Path, overwrite: bool, family: str) -> Source:
  """What every converter does first: refuse an existing --out (unless `overwrite`), read
  `src`, and send a checkpoint of another family to its converter."""
  if Path(out).exists() and not overwrite:
    raise FileExistsError(f'--out {out} already exists; choose another path or pass --overwrite.')
  print(f'Reading {src} ...', file=sys.stderr, flush=True)
  source = read_source(src)
  require_family(source, family, src)
  return source

# ---------------------------------------------------------------------------------------------
# Architecture from shapes
# ---------------------------------------------------------------------------------------------
def require_keys(tensors: dict[str, np.ndarray], keys: list[str], what: str) -> None:
  missing = [k for k in keys if k not in tensors]
  if missing:
    raise ConversionError(f'Cannot infer the architecture of this {what} CLIP; missing keys:\n'
                          + '\n'.join(f'  missing: {k}' for k in missing))


def count_layers(tensors: dict[str, np.ndarray], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def _grid_image_size(num_positions: int, patch: int) -> int:
  grid = math.isqrt(num_positions - 1)
  if grid * grid != num_positions - 1:
    raise ConversionError(f'The visual positional embedding has {num_positions} rows, which is not '
                          '1 + a square number of patches.')
  return grid * patch


def infer_openai_config(tensors: dict[str, np.ndarray], *, vision_heads: int | None = None,
                        text_heads: int | None = None) -> CLIPConfig:
  """OpenAI's `build_model` rules; heads default to width // 64 as in every released CLIP."""
  anchors = ['visual.conv1.weight', 'visual.positional_embedding', 'text_projection',
             'positional_embedding', 'token_embedding.weight', 'ln_final.weight',
             'visual.transformer.resblocks.0.mlp.c_fc.weight',
             'transformer.resblocks.0.mlp.c_fc.weight']
  require_keys(tensors, anchors, 'OpenAI-layout')
  conv = tensors['visual.conv1.weight']
  vision_width, patch = conv.shape[0], conv.shape[-1]
  text_width = tensors['ln_final.weight'].shape[0]
  vocab_size = tensors['token_embedding.weight'].shape[0]
  return _make_config(
      embed_dim=tensors['text_projection'].shape[1],
      image_size=_grid_image_size(tensors['visual.positional_embedding'].shape[0], patch),
      patch_size=patch,
      vision_width=vision_width,
      vision_layers=count_layers(tensors, 'visual.transformer.resblocks.'),
      vision_heads=vision_heads or vision_width // 64,
      vision_mlp_dim=tensors['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0],
      context_length=tensors['positional_embedding'].shape[0],
      vocab_size=vocab_size,
      text_width=text_width,
      text_layers=count_layers(tensors, 'transformer.resblocks.'),
      text_heads=text_heads or text_width // 64,
      text_mlp_dim=tensors['transformer.resblocks.0.mlp.c_fc.weight'].shape[0],
      text_pooling='argmax',
      eos_token_id=vocab_size - 1)


def _make_config(**fields) -> CLIPConfig:
  try:
    return CLIPConfig(**fields)
  except ValueError as e:
    raise ConversionError(f'{e}. For OpenAI-layout sources, set the head counts with '
                          '--vision_heads / --text_heads.') from e


def infer_hf_config(tensors: dict[str, np.ndarray], hf: dict[str, Any]) -> CLIPConfig:
  """Shapes from the tensors; heads, activation, epsilon and pooling from HF's config.json."""
  v, t = 'vision_model.', 'text_model.'
  anchors = [v + 'embeddings.patch_embedding.weight', v + 'embeddings.position_embedding.weight',
             v + 'encoder.layers.0.mlp.fc1.weight', t + 'encoder.layers.0.mlp.fc1.weight',
             t + 'embeddings.token_embedding.weight', t + 'embeddings.position_embedding.weight',
             'visual_projection.weight']
  require_keys(tensors, anchors, 'HF')
  vc, tc = hf['vision_config'], hf['text_config']
  conv = tensors[v + 'embeddings.patch_embedding.weight']
  vocab_size, text_width = tensors[t + 'embeddings.token_embedding.weight'].shape
  shapes = dict(
      embed_dim=tensors['visual_projection.weight'].shape[0],
      image_size=_grid_image_size(tensors[v + 'embeddings.position_embedding.weight'].shape[0],
                                  conv.shape[-1]),
      patch_size=conv.shape[-1],
      vision_width=conv.shape[0],
      vision_layers=count_layers(tensors, v + 'encoder.layers.'),
      vision_mlp_dim=tensors[v + 'encoder.layers.0.mlp.fc1.weight'].shape[0],
      context_length=tensors[t + 'embeddings.position_embedding.weight'].shape[0],
      vocab_size=vocab_size,
      text_width=text_width,
      text_layers=count_layers(tensors, t + 'encoder.layers.'),
      text_mlp_dim=tensors[t + 'encoder.layers.0.mlp.fc1.weight'].shape[0])
  # config.json and the weights must agree where both say something.
  said = {('vision_config', 'hidden_size'): 'vision_width',
          ('vision_config', 'num_hidden_layers'): 'vision_layers',
          ('vision_config', 'intermediate_size'): 'vision_mlp_dim',
          ('vision_config', 'patch_size'): 'patch_size',
          ('vision_config', 'image_size'): 'image_size',
          ('text_config', 'hidden_size'): 'text_width',
          ('text_config', 'num_hidden_layers'): 'text_layers',
          ('text_config', 'intermediate_size'): 'text_mlp_dim',
          ('text_config', 'vocab_size'): 'vocab_size',
          ('text_config', 'max_position_embeddings'): 'context_length'}
  disagree = [f'  config.json {sec}.{key}={hf[sec][key]} but the weights give {shapes[field]}'
              for (sec, key), field in said.items()
              if key in hf[sec] and hf[sec][key] != shapes[field]]
  if disagree:
    raise ConversionError('config.json disagrees with the weights:\n' + '\n'.join(disagree))
  acts = [vc.get('hidden_act', 'quick_gelu'), tc.get('hidden_act', 'quick_gelu')]
  unsupported = sorted({a for a in acts if a not in HF_ACTIVATIONS})
  if unsupported:
    raise ConversionError(f'Unsupported hidden_act {unsupported}: the towers must use one of '
                          f'{list(HF_ACTIVATIONS)}.')
  eps = [float(vc.get('layer_norm_eps', 1e-5)), float(tc.get('layer_norm_eps', 1e-5))]
  eos = tc.get('eos_token_id', 49407)
  if not isinstance(eos, int):
    raise ConversionError(f'text_config.eos_token_id={eos!r}: a single token id is needed.')
  return CLIPConfig(
      **shapes,
      vision_heads=vc.get('num_attention_heads', 12),
      text_heads=tc.get('num_attention_heads', 8),
      # HF's rule (CLIPTextTransformer): eos_token_id == 2 marks pre-#24773 configs, pooled at
      # the argmax id; otherwise at the first eos_token_id.
      text_pooling='argmax' if eos == 2 else 'first_eos',
      eos_token_id=eos,
      activation=HF_ACTIVATIONS[acts[0]], layer_norm_eps=eps[0],
      text_activation=HF_ACTIVATIONS[acts[1]] if acts[1] != acts[0] else None,
      text_layer_norm_eps=eps[1] if eps[1] != eps[0] else None)


# ---------------------------------------------------------------------------------------------
# Key maps: (our parameter path, source keys, source shapes, transform)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  dst: str
  srcs: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  fn: Callable[..., np.ndarray] = lambda x: x


def _t(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch conv weight [out, in, kh, kw] -> flax [kh, kw, in, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _qkv_kernel(q, k, v):
  return _t(np.concatenate([q, k, v], axis=0))


def _qkv_bias(q, k, v):
  return np.concatenate([q, k, v], axis=0)


def layer_norm_entries(dst: str, src: str, width: int) -> list[Entry]:
  return [Entry(f'{dst}.scale', (f'{src}.weight',), ((width,),)),
          Entry(f'{dst}.bias', (f'{src}.bias',), ((width,),))]


def linear_entries(dst: str, src: str, in_dim: int, out_dim: int,
                   bias: bool = True) -> list[Entry]:
  """A PyTorch nn.Linear (weight [out, in], bias [out]) -> nnx.Linear (kernel [in, out], bias)."""
  entries = [Entry(f'{dst}.kernel', (f'{src}.weight',), ((out_dim, in_dim),), _t)]
  return entries + [Entry(f'{dst}.bias', (f'{src}.bias',), ((out_dim,),))] if bias else entries


def openai_attention_entries(dst: str, src: str, width: int) -> list[Entry]:
  """A PyTorch nn.MultiheadAttention (packed in_proj) -> clip.MultiHeadAttention."""
  w = width
  return [Entry(f'{dst}.qkv.kernel', (f'{src}.in_proj_weight',), ((3 * w, w),), _t),
          Entry(f'{dst}.qkv.bias', (f'{src}.in_proj_bias',), ((3 * w,),)),
          *linear_entries(f'{dst}.out', f'{src}.out_proj', w, w)]


def openai_block_entries(src: str, dst: str, width: int, mlp_dim: int,
                         prefix: str = '') -> list[Entry]:
  """One `ResidualAttentionBlock` of OpenAI's CLIP (PyTorch nn.MultiheadAttention). `prefix`
  names its parts: '' gives ln_1, attn, mlp, ln_2; 'temporal_' gives CLAVER's temporal_ln_1, ...
  """
  w, m, p = width, mlp_dim, f'{src}.{prefix}'
  return [
      *layer_norm_entries(f'{dst}.ln_1', f'{p}ln_1', w),
      *openai_attention_entries(f'{dst}.attn', f'{p}attn', w),
      *layer_norm_entries(f'{dst}.ln_2', f'{p}ln_2', w),
      *linear_entries(f'{dst}.mlp.c_fc', f'{p}mlp.c_fc', w, m),
      *linear_entries(f'{dst}.mlp.c_proj', f'{p}mlp.c_proj', m, w),
  ]


def openai_entries(cfg: CLIPConfig) -> list[Entry]:
  vw, tw, e, p = cfg.vision_width, cfg.text_width, cfg.embed_dim, cfg.patch_size
  entries = [
      Entry('visual.conv1.kernel', ('visual.conv1.weight',), ((vw, 3, p, p),), _conv),
      Entry('visual.class_embedding', ('visual.class_embedding',), ((vw,),)),
      Entry('visual.positional_embedding', ('visual.positional_embedding',),
            ((cfg.num_image_tokens, vw),)),
      *layer_norm_entries('visual.ln_pre', 'visual.ln_pre', vw),
      *layer_norm_entries('visual.ln_post', 'visual.ln_post', vw),
      Entry('visual.proj', ('visual.proj',), ((vw, e),)),
      Entry('text.token_embedding.embedding', ('token_embedding.weight',),
            ((cfg.vocab_size, tw),)),
      Entry('text.positional_embedding', ('positional_embedding',), ((cfg.context_length, tw),)),
      *layer_norm_entries('text.ln_final', 'ln_final', tw),
      Entry('text.text_projection', ('text_projection',), ((tw, e),)),
      Entry('logit_scale', ('logit_scale',), ((),)),
  ]
  for i in range(cfg.vision_layers):
    entries += openai_block_entries(f'visual.transformer.resblocks.{i}', f'visual.blocks.{i}',
                                    vw, cfg.vision_mlp_dim)
  for i in range(cfg.text_layers):
    entries += openai_block_entries(f'transformer.resblocks.{i}', f'text.blocks.{i}', tw,
                                    cfg.text_mlp_dim)
  return entries


def hf_attention_entries(dst: str, src: str, width: int) -> list[Entry]:
  """An HF attention (q_proj, k_proj, v_proj, out_proj with biases) -> clip.MultiHeadAttention."""
  w = width
  return [Entry(f'{dst}.qkv.kernel', tuple(f'{src}.{x}_proj.weight' for x in 'qkv'),
                ((w, w),) * 3, _qkv_kernel),
          Entry(f'{dst}.qkv.bias', tuple(f'{src}.{x}_proj.bias' for x in 'qkv'), ((w,),) * 3,
                _qkv_bias),
          *linear_entries(f'{dst}.out', f'{src}.out_proj', w, w)]


def hf_block_entries(src: str, dst: str, width: int, mlp_dim: int) -> list[Entry]:
  """One HF encoder layer (CLIP's, X-CLIP's) -> clip.ResidualBlock."""
  w, m = width, mlp_dim
  return [
      *layer_norm_entries(f'{dst}.ln_1', f'{src}.layer_norm1', w),
      *hf_attention_entries(f'{dst}.attn', f'{src}.self_attn', w),
      *layer_norm_entries(f'{dst}.ln_2', f'{src}.layer_norm2', w),
      *linear_entries(f'{dst}.mlp.c_fc', f'{src}.mlp.fc1', w, m),
      *linear_entries(f'{dst}.mlp.c_proj', f'{src}.mlp.fc2', m, w),
  ]


def hf_entries(cfg: CLIPConfig, pre_layernorm: str = 'pre_layrnorm') -> list[Entry]:
  """HF's CLIPModel; `pre_layernorm` is the name of the ViT's first LayerNorm (CLIP's is
  misspelt, X-CLIP's not)."""
  vw, tw, e, p = cfg.vision_width, cfg.text_width, cfg.embed_dim, cfg.patch_size
  v, t = 'vision_model', 'text_model'
  entries = [
      Entry('visual.conv1.kernel', (f'{v}.embeddings.patch_embedding.weight',), ((vw, 3, p, p),),
            _conv),
      Entry('visual.class_embedding', (f'{v}.embeddings.class_embedding',), ((vw,),)),
      Entry('visual.positional_embedding', (f'{v}.embeddings.position_embedding.weight',),
            ((cfg.num_image_tokens, vw),)),
      *layer_norm_entries('visual.ln_pre', f'{v}.{pre_layernorm}', vw),
      *layer_norm_entries('visual.ln_post', f'{v}.post_layernorm', vw),
      Entry('visual.proj', ('visual_projection.weight',), ((e, vw),), _t),
      Entry('text.token_embedding.embedding', (f'{t}.embeddings.token_embedding.weight',),
            ((cfg.vocab_size, tw),)),
      Entry('text.positional_embedding', (f'{t}.embeddings.position_embedding.weight',),
            ((cfg.context_length, tw),)),
      *layer_norm_entries('text.ln_final', f'{t}.final_layer_norm', tw),
      Entry('text.text_projection', ('text_projection.weight',), ((e, tw),), _t),
      Entry('logit_scale', ('logit_scale',), ((),)),
  ]
  for i in range(cfg.vision_layers):
    entries += hf_block_entries(f'{v}.encoder.layers.{i}', f'visual.blocks.{i}', vw,
                                cfg.vision_mlp_dim)
  for i in range(cfg.text_layers):
    entries += hf_block_entries(f'{t}.encoder.layers.{i}', f'text.blocks.{i}', tw,
                                cfg.text_mlp_dim)
  return entries


def map_params(tensors: dict[str, np.ndarray], entries: list[Entry],
               ignored: Callable[[str], bool] = lambda k: False) -> dict[str, np.ndarray]:
  """Applies a key map, listing every missing, unexpected or mis-shaped tensor at once."""
  used = {s for entry in entries for s in entry.srcs}
  missing = sorted(used - set(tensors))
  unexpected = sorted(k for k in set(tensors) - used if not ignored(k))
  mismatched = sorted(
      f'  shape: {src} is {tuple(tensors[src].shape)}, expected {shape}'
      for entry in entries for src, shape in zip(entry.srcs, entry.shapes)
      if src in tensors and tuple(tensors[src].shape) != shape)
  if missing or unexpected or mismatched:
    lines = ['The checkpoint does not match the architecture inferred from it:']
    lines += [f'  missing: {k}' for k in missing]
    lines += [f'  unexpected: {k} {tuple(tensors[k].shape)}' for k in unexpected]
    lines += mismatched
    raise ConversionError('\n'.join(lines))
  return {e.dst: np.asarray(e.fn(*(tensors[s] for s in e.srcs)), np.float32) for e in entries}


def unflatten(flat: dict[str, np.ndarray]) -> dict[Any, Any]:
  """{'visual.blocks.0.ln_1.scale': x} -> nested dict; list indices become int keys (nnx.List)."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split('.')]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# ---------------------------------------------------------------------------------------------
# Mapping, checking, writing
# ---------------------------------------------------------------------------------------------
def map_source(source: Source, *, hf: tuple[Callable, Callable], openai: tuple[Callable, Callable],
               vision_heads: int | None = None, text_heads: int | None = None
               ) -> tuple[Any, dict[str, np.ndarray]]:
  """-> (config, flat params) of `source`. `hf` is (infer config from tensors and config.json,
  key map of a config); `openai` is (infer config from tensors and head counts, key map)."""
  if source.layout == 'hf':
    if vision_heads or text_heads:
      raise ConversionError('--vision_heads/--text_heads are for OpenAI-layout sources; HF '
                            'sources take head counts from config.json.')
    infer, entries = hf
    cfg = infer(source.tensors, source.hf_config or {})
    return cfg, map_params(source.tensors, entries(cfg), lambda k: bool(_IGNORED_HF.match(k)))
  infer, entries = openai
  cfg = infer(source.tensors, vision_heads=vision_heads, text_heads=text_heads)
  return cfg, map_params(source.tensors, entries(cfg), lambda k: k in IGNORED_OPENAI_KEYS)

def check_against_model(kind: str, config: Any, flat: dict[str, np.ndarray]) -> None:
  """The converted tree must be exactly the parameter tree of the model `load()` builds."""
  from flax import nnx
  from claver_jax.models.io import abstract_params, flatten_params
  _, state = abstract_params(kind, config)
  expected = {k: tuple(v.shape) for k, v in flatten_params(nnx.to_pure_dict(state)).items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if expected != got:
    diff = sorted(set(expected.items()) ^ set(got.items()))
    raise AssertionError(f'Internal error: converted parameters differ from the model: {diff[:10]}')


def check_tokenizer(tokenizer: tuple[dict[str, int], list[str]] | None, cfg: CLIPConfig) -> None:
  if tokenizer is not None and len(tokenizer[0]) != cfg.vocab_size:
    raise ConversionError(f'The tokenizer has {len(tokenizer[0])} ids but the text tower\'s '
                          f'embedding has {cfg.vocab_size} rows: they do not belong together.')



def tokenizer_for(source: Source, bpe: str | Path | None,
                  cfg: CLIPConfig) -> tuple[dict[str, int], list[str]] | None:
  """The vocabulary to save: --bpe's (OpenAI's BPE file) if given, else the source's own (an HF
  directory's); checked against the text tower's embedding."""
  tokenizer = read_openai_bpe(bpe) if bpe else source.tokenizer
  check_tokenizer(tokenizer, cfg)
  return tokenizer


def write(out: Path, kind: str, config: Any, flat: dict[str, np.ndarray], *, src: str | Path,
          source: Source, layout: str, tokenizer: tuple[dict[str, int], list[str]] | None,
          normalization: tuple[tuple[float, ...], tuple[float, ...]], overwrite: bool,
          **info: Any) -> None:
  """Checks `flat` against the model `kind` builds from `config` and writes the model directory
  `out` (nothing unless complete); its config.json records where the weights came from (the
  path of `src`, `layout`, the container) and `info`."""
  from claver_jax.models.io import write_model_dir
  check_against_model(kind, config, flat)
  print(f'Writing {out} ...', file=sys.stderr, flush=True)
  info = {'path': str(Path(src).absolute()), 'layout': layout, 'container': source.container,
          **info}
  write_model_dir(out, kind=kind, config=config, params=unflatten(flat), tokenizer=tokenizer,
                  normalization=normalization, source=info, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
# Flags every converter takes, passed to its convert() by name after --src and --out.
SHARED_FLAGS = ('bpe', 'vision_heads', 'text_heads', 'overwrite')


def define_flags(src_help: str) -> None:
  """Defines --src (described by `src_help`), --out and SHARED_FLAGS; a converter adds its own
  flags after these."""
  from absl import flags
  flags.DEFINE_string('src', None, src_help, required=True)
  flags.DEFINE_string('out', None, 'Output model directory (must not exist).', required=True)
  flags.DEFINE_string('bpe', None, "OpenAI's bpe_simple_vocab_16e6.txt.gz, saved as the "
                      'tokenizer (OpenAI-layout checkpoints carry none).')
  flags.DEFINE_integer('vision_heads', None, 'OpenAI-layout checkpoints: vision heads (default '
                       'width // 64).')
  flags.DEFINE_integer('text_heads', None, 'OpenAI-layout checkpoints: text heads (default '
                       'width // 64).')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists (only once conversion '
                    'succeeded).')


def run_cli(convert: Callable[..., Any], own_flags: Sequence[str] = ()) -> None:
  """A converter's main: absl parses the flags, then convert(--src, --out, **SHARED_FLAGS and
  `own_flags` by name) runs with orbax quiet; bad input is one line `error: ...` and exit 1."""
  from absl import app, flags
  from absl import logging as absl_logging

  def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO.
    try:
      convert(f.src, f.out, **{name: f[name].value for name in (*SHARED_FLAGS, *own_flags)})
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
      sys.exit(f'error: {e}')

  app.run(main)
