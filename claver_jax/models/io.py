"""Model directories: what converters write and `load()` reads.

A model directory holds
  config.json    {"format": "claver_jax.model", "version": 1, "kind": "clip" | "claver" | "xclip",
                  "config": {...}, "normalization": {"mean": [3], "std": [3]}, "source": {...}}
  params/        an orbax checkpoint of the parameters (nnx.State as a pure dict, fp32)
  tokenizer/     vocab.json + merges.txt in CLIP's format, when the source had them
"normalization" is the per-channel input normalisation the weights expect, on pixel values
scaled to 0-1: frames are fed as (x / 255 - mean) / std (claver_jax.data.transforms.normalize).
Directories written before it was recorded are read with CLIP's (models/clip.py), with a notice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from claver_jax import distributed, fileio
from claver_jax.models import families
from claver_jax.models.claver import CLAVERConfig, claver_from_clip
from claver_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig
from claver_jax.param_paths import path_str

FORMAT = 'claver_jax.model'
VERSION = 1

# kind -> (config from dict, module constructor(config, dtype=, rngs=)): CLIP and every family.
MODEL_KINDS: dict[str, tuple[Callable[[dict], Any], Callable[..., nnx.Module]]] = {
    'clip': (CLIPConfig.from_dict, CLIP),
    **{f.name: (f.config_class.from_dict, f.module_class) for f in families.FAMILIES.values()},
}
CLIP_FRAMES = 8   # A plain CLIP used as a video model (CLIP-Mean) takes 8 frames unless told.


def flatten_params(tree: Any) -> dict[str, Any]:
  """Nested dict -> {'visual.blocks.0.attn.qkv.kernel': leaf}."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_params(kind: str, config: Any, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its parameter shapes, without allocating anything."""
  _, build = MODEL_KINDS[kind]
  abstract = nnx.eval_shape(lambda: build(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def write_model_dir(out: str | os.PathLike, *, kind: str, config: Any, params: Any,
                    normalization: tuple[Sequence[float], Sequence[float]],
                    tokenizer: tuple[dict[str, int], list[str]] | None = None,
                    source: dict[str, Any] | None = None, overwrite: bool = False,
                    versioned: bool = False) -> Path:
  """Writes a model directory atomically. `params` is a pure dict of arrays; `normalization`
  the (mean, std) of the inputs the weights expect, on 0-1 pixel values. `versioned` (for
  WORKDIR/model): `out` becomes a symlink to a new complete version, so that a model directory
  is there at every instant (see claver_jax.fileio).

  In a multi-process run every process calls this with the same global arrays: each writes its
  shards of the parameters, and process 0 the other files.
  """
  with distributed.atomic_directory(out, overwrite=overwrite, versioned=versioned) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / 'params', params)
    if jax.process_index() == 0:
      if tokenizer is not None:
        vocab, merges = tokenizer
        (tmp / 'tokenizer').mkdir()
        (tmp / 'tokenizer' / 'vocab.json').write_bytes(
            json.dumps(vocab, ensure_ascii=False).encode('utf-8'))
        (tmp / 'tokenizer' / 'merges.txt').write_bytes(
            ('#version: 0.2\n' + '\n'.join(merges) + '\n').encode('utf-8'))
      mean, std = normalization
      meta = {'format': FORMAT, 'version': VERSION, 'kind': kind, 'config': config.to_dict(),
              'normalization': {'mean': [float(v) for v in mean], 'std': [float(v) for v in std]},
              'source': source or {}}
      (tmp / 'config.json').write_text(json.dumps(meta, indent=2) + '\n')
  return fileio.run_path(out)


def resolved(path: str | os.PathLike) -> Any:
  """`path` with its links followed once: a local symlink, or an object store's LINK object
  (see claver_jax.fileio); a gs:// path stays one."""
  if fileio.is_remote(path):
    return fileio.resolve_link(fileio.run_path(path))
  return Path(path).resolve()


def read_model_config(path: str | os.PathLike) -> tuple[str, Any, dict[str, Any]]:
  """-> (kind, config, the whole config.json) of a model directory, with clear errors."""
  path = resolved(path)
  meta_file = path / 'config.json'
  if not meta_file.is_file():
    raise FileNotFoundError(
        f'{path} is not a claver_jax model directory (no config.json). Convert PyTorch weights '
        'with `python -m convert.clip_to_flax --src=... --out=DIR` and load DIR.')
  meta = json.loads(meta_file.read_text())
  if meta.get('format') != FORMAT:
    raise ValueError(f'{meta_file} is not a claver_jax model config (format={meta.get("format")!r}'
                     f'; expected {FORMAT!r}). An HF or OpenAI checkpoint must be converted first '
                     'with `python -m convert.clip_to_flax`.')
  if meta.get('version', 0) > VERSION:
    raise ValueError(f'{path} was written by a newer claver_jax (model format version '
                     f'{meta["version"]} > {VERSION}); upgrade claver_jax to read it.')
  kind = meta.get('kind')
  if kind not in MODEL_KINDS:
    raise ValueError(f'{meta_file}: unknown model kind {kind!r}; known kinds: {list(MODEL_KINDS)}.')
  from_dict, _ = MODEL_KINDS[kind]
  return kind, from_dict(meta['config']), meta


def _is_model_dir(path: Path) -> bool:
  """path/config.json is a model directory's (a run's workdir has its run config there)."""
  try:
    return json.loads((path / 'config.json').read_text()).get('format') == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def model_dir(path: str | os.PathLike) -> Path:
  """A model directory, or a run's workdir holding one in model/; a link (WORKDIR/model) resolved
  once, so that everything is read from one version while the run exports newer ones."""
  path = resolved(path)
  if not _is_model_dir(path) and (resolved(path / 'model') / 'config.json').is_file():
    path = path / 'model'
  return resolved(path)


def input_normalization(meta: dict[str, Any], where: Any) -> tuple[tuple[float, ...],
                                                                     tuple[float, ...]]:
  """(mean, std) a model directory's config.json (`meta`) records; CLIP's, with a notice, for
  directories written before it was recorded."""
  recorded = meta.get('normalization')
  if recorded is None:
    logging.warning('%s records no input normalisation; using CLIP\'s mean/std.', where)
    return CLIP_MEAN, CLIP_STD
  return tuple(recorded['mean']), tuple(recorded['std'])


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, num_frames: int | None = None,
         resample_frames: bool = True, **options: Any) -> nnx.Module:
  """Loads a converted or trained model directory (CLIP or a video family: CLAVER, X-CLIP), or
  the model of a run's workdir (its WORKDIR/model).

  dtype: the compute dtype; parameters stay fp32.
  num_frames: video families only; run with this many frames. A temporal embedding (CLAVER's,
    X-CLIP's MIT positional embedding) trained with another count is resampled linearly, with a
    warning, unless `resample_frames=False` makes it an error.
  options: the family's run options (Family.run_options: how it computes, never its
    parameters) instead of the directory's; None keeps the directory's. CLAVER's attention:
    'dense' | 'chunked' | 'auto' (kronecker.py).
  """
  path = model_dir(path)            # Resolved once: a WORKDIR/model swapped later is not followed.
  kind, config, _ = read_model_config(path)
  if num_frames is not None and kind not in families.FAMILIES:
    raise ValueError(f'num_frames applies to video models ({", ".join(families.FAMILIES)}); '
                     f'{path} holds a {kind} model.')
  options = {key: value for key, value in options.items() if value is not None}
  for key in options:
    if kind not in families.FAMILIES or key not in families.get(kind).run_options:
      owners = [f.name for f in families.FAMILIES.values() if key in f.run_options]
      raise ValueError(f'{key} is a run option of {", ".join(owners) or "no"} models; {path} '
                       f'holds a {kind} model.')
  if options:
    config = dataclasses.replace(config, **options)
  model = _restore(path, kind, config, dtype)
  if num_frames is not None:
    model = families.with_num_frames(model, num_frames, resample=resample_frames)
  return model


def load_towers(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> CLIP:
  """The CLIP towers (image tower, text tower, logit scale) of a model directory of any kind
  that has plain ones: a CLIP, CLAVER, motion prompts; not X-CLIP (its image tower computes with
  its cross-frame messages). `path` may be a run's workdir (model_dir)."""
  path = model_dir(path)
  kind, _, _ = read_model_config(path)
  families.check_has_towers(kind, path)
  return families.clip_towers(load(path, dtype=dtype))


class ModelDirError(ValueError):
  """A model directory that cannot be read: the message names it and what is missing or broken."""


def _root_cause(error: BaseException) -> str:
  """The first line of the innermost cause of `error` (TensorStore's says which file failed)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line.split(': ', 1)[1] if line.split(':', 1)[0].isupper() else line


def load_video_model(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                     num_frames: int | None = None, resample_frames: bool = True) -> nnx.Module:
  """`load`, for a video model: a plain CLIP becomes CLIP-Mean (CLAVER with temporal='mean', the
  mean of normalised per-frame embeddings) over `num_frames` (8 when None)."""
  path = model_dir(path)
  kind, _, _ = read_model_config(path)
  if kind in families.FAMILIES:
    return load(path, dtype=dtype, num_frames=num_frames, resample_frames=resample_frames)
  clip = load(path, dtype=dtype)
  cfg = CLAVERConfig(clip=clip.cfg, num_frames=num_frames or CLIP_FRAMES, temporal='mean')
  return claver_from_clip(clip, cfg, dtype=dtype, rngs=nnx.Rngs(0))


def _restore(path: Path, kind: str, config: Any, dtype: Any) -> nnx.Module:
  graphdef, state = abstract_params(kind, config, jnp.dtype(dtype))
  pure = nnx.to_pure_dict(state)
  expected = {k: v.shape for k, v in flatten_params(pure).items()}
  params = path / 'params'
  if not params.is_dir():
    raise ModelDirError(f'{path} has no params/ directory: the model directory is incomplete '
                        '(an unfinished copy or write?). Export or convert it again.')
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      metadata = checkpointer.metadata(params)
    except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise many kinds)
      raise ModelDirError(f'{params} is unreadable: {_root_cause(e)}') from e
    if metadata is None or metadata.item_metadata is None:
      raise ModelDirError(f'{params} holds no orbax checkpoint (no readable _METADATA): the model '
                          'directory is incomplete. Export or convert it again.')
    stored = {k: tuple(v.shape) for k, v in flatten_params(metadata.item_metadata.tree).items()}
    _check_same_params(expected, stored, where=params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          pure)
    try:
      with fileio.drained_event_loops():
        restored = checkpointer.restore(params, target)
    except Exception as e:  # noqa: BLE001
      raise ModelDirError(f'{params}: a parameter shard is unreadable (corrupt or cut short): '
                          f'{_root_cause(e)}') from None
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(state, restored)
  logging.info('Loaded %s model from %s.', kind, path)
  return nnx.merge(graphdef, state)


def _check_same_params(expected: dict[str, tuple], stored: dict[str, tuple], where: Any) -> None:
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  mismatched = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != stored[k])
  if missing or unexpected or mismatched:
    lines = [f'The parameters in {where} do not match the model its config.json describes:']
    lines += [f'  missing: {k} {expected[k]}' for k in missing]
    lines += [f'  unexpected: {k} {stored[k]}' for k in unexpected]
    lines += [f'  shape: {k} stored {stored[k]}, expected {tuple(expected[k])}' for k in mismatched]
    raise ValueError('\n'.join(lines))
