r"""Per-view FLOPs of a video model, from XLA's cost analysis of the lowered program.

    python -m claver_jax.flops --config=configs/k400.py:B16,16
    python -m claver_jax.flops --config=configs/k400.py:B16,8,xclip
    python -m claver_jax.flops --table        # docs/performance.md's table of the papers' variants
    python -m claver_jax.flops --config=configs/k400.py:B16,8 --texts [--devices=8]
    python -m claver_jax.flops --texts_table  # docs/performance.md's table of the text work/update

Shapes only: the model is built with `nnx.eval_shape` and its functions are lowered, never run.
XLA counts a multiply-add as 2 FLOPs; GMACs below are half the GFLOPs. One view is one clip of T
frames at the config's image size through `video_features` (the ViT and the family's temporal
parts; no text tower); scoring it against C class texts (`class_logits`, X-CLIP's prompt
generator) is counted apart, as it grows with C.

--texts: the text tower's work in one train step (update) of a config whose text tower trains:
the description sets it draws (text.sets_per_step, K), the texts it encodes (every set once when
K >= A, else the K drawn; claver_jax.step) split over --devices, and the text tower's forward +
backward FLOPs at --text_length tokens per text (32: the shipped prompt sets' longest with
OpenAI's vocabulary; the step encodes shorter ones at 16 or 24, so this is an upper bound),
against the official loop's per GPU: 5 sets of C texts per micro-batch, at 77 tokens (counted
with our text tower, whose last block runs for the pooled row only: a few percent under the
official tower's count).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models import families, kronecker
from claver_jax.models.clip import CLIP, get_preset
from claver_jax.models.claver import CLAVERConfig
from claver_jax.models.xclip import XCLIPConfig

# The papers' reported per-view GFLOPs: CLAVER's Kinetics-400 table, X-CLIP's model zoo.
PAPER_VARIANTS = [('KMT', CLAVERConfig, 'B32', 8, 33), ('KMT', CLAVERConfig, 'B32', 16, 64),
                  ('KMT', CLAVERConfig, 'B16', 8, 122), ('KMT', CLAVERConfig, 'B16', 16, 241),
                  ('KMT', CLAVERConfig, 'L14', 8, 558), ('X-CLIP', XCLIPConfig, 'B32', 8, 39),
                  ('X-CLIP', XCLIPConfig, 'B16', 8, 145), ('X-CLIP', XCLIPConfig, 'L14', 8, 658)]
K400_CLASSES = 400


def _flops(fn, *args) -> float:
  """FLOPs of fn(*args) (abstract arguments), from the lowered, not compiled, program."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def report(cfg: Any, num_classes: int = K400_CLASSES) -> dict[str, float]:
  """GFLOPs of one view (`total`), of CLIP's ViT over its T frames (`vit`), of the rest of the
  video path (`temporal`: CLAVER's temporal head; X-CLIP's messages, MIT and visual prompt
  tokens) and of scoring it against `num_classes` texts (`classes`).

  Attention is counted dense, whatever a config's `attention` says: XLA's cost analysis counts
  the body of a loop once, not once per trip, so it cannot count CLAVER's chunked kernel."""
  if 'attention' in {f.name for f in dataclasses.fields(cfg)}:
    cfg = dataclasses.replace(cfg, attention='dense')
  family = families.of_config(cfg)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: family.module_class(cfg, rngs=nnx.Rngs(0))))
  size, frames = cfg.clip.image_size, cfg.num_frames
  video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
  features = lambda s, v: nnx.merge(graphdef, s).video_features(v)
  total = _flops(features, state, video)
  text = jax.ShapeDtypeStruct((1, num_classes, cfg.clip.embed_dim), jnp.float32)
  classes = _flops(lambda s, v, t: nnx.merge(graphdef, s).class_logits(features(s, v), t),
                   state, video, text) - total
  clip_graphdef, clip_state = nnx.split(nnx.eval_shape(lambda: CLIP(cfg.clip, rngs=nnx.Rngs(0))))
  images = jax.ShapeDtypeStruct((frames, size, size, 3), jnp.float32)
  vit = _flops(lambda s, x: nnx.merge(clip_graphdef, s).encode_image(x), clip_state, images)
  return {'total': total / 1e9, 'vit': vit / 1e9, 'temporal': (total - vit) / 1e9,
          'classes': classes / 1e9}


def _cost(stage) -> float:
  cost = stage.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def step_flops(make_jitted: Callable[[], Any], mesh: jax.sharding.Mesh, *args: Any,
               compiled: Any = None) -> tuple[float, float]:
  """(counted, hidden): per-device FLOPs of a jitted step (make_jitted() -> jax.jit(...)) for
  abstract `args` under `mesh`. `counted` is XLA's cost analysis of the compiled, partitioned
  program, which counts the body of a loop once; `hidden` is what the other trips of the loops
  add: the portable attention kernel's (models/kronecker.py) and the accumulation scan's
  (step.py), from the lowered program traced with those loops unrolled
  (`kronecker.unrolled_loops`) less the same with loops, over the mesh's devices (that work is
  split over the batch). Per-device step FLOPs are their sum. `compiled`: the step already
  compiled for `args`, if there is one (saves compiling it again)."""
  with jax.set_mesh(mesh):
    counted = _cost(compiled if compiled is not None else make_jitted().lower(*args).compile())
    jax.clear_caches()               # jit keeps traces by function: trace each form afresh
    looped = _cost(make_jitted().lower(*args))
    jax.clear_caches()
    with kronecker.unrolled_loops():
      unrolled = _cost(make_jitted().lower(*args))
    jax.clear_caches()
  return counted, (unrolled - looped) / mesh.size


def paper_table() -> str:
  lines = ['| variant | ours: GFLOPs (XLA, 2 per MAC) | ours: GMACs | ViT share | paper |',
           '|---|---|---|---|---|']
  for name, config_class, arch, frames, paper in PAPER_VARIANTS:
    r = report(config_class(clip=get_preset(arch), num_frames=frames))
    lines.append(f'| {arch}-{frames}f {name} | {r["total"]:.0f} | {r["total"] / 2:.0f} | '
                 f'{r["vit"] / r["total"]:.0%} | {paper} |')
  return '\n'.join(lines)


# The --texts_table rows: (config file, argument).
TEXT_SETTINGS = (('configs/k400.py', 'B16,8,kmt'), ('configs/k400.py', 'B16,32,kmt'),
                 ('configs/k400.py', 'L14,8,kmt'), ('configs/k600.py', 'B16,8,kmt'),
                 ('configs/ucf101.py', 'shots=2'), ('configs/hmdb51.py', 'full'))
OFFICIAL_GPUS, OFFICIAL_SETS_PER_MICRO_BATCH, OFFICIAL_CONTEXT = 8, 5, 77


def text_tower_flops(cfg: Any, num_texts: int, text_length: int) -> float:
  """FLOPs of the text tower's forward + backward (to its parameters) over `num_texts` texts of
  `text_length` tokens, from XLA's cost analysis of the lowered program."""
  family = families.of_config(cfg)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: family.module_class(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((num_texts, text_length), jnp.int32)
  loss = lambda s, t: nnx.merge(graphdef, s).encode_text(t).sum()
  return _flops(jax.grad(loss), state, tokens)


def text_report(config, num_devices: int = OFFICIAL_GPUS,
                text_length: int = 32) -> dict[str, float]:
  """The text work of one train step of `config` (see the module docstring): `draws` (K),
  `sets` (A), `classes` (C), `texts` encoded per update and `per_device`, their forward +
  backward `tflops_per_device`; the official loop's `official_texts_per_gpu` and
  `official_tflops_per_gpu` for the same K per update (K / 8 GPUs micro-batches' worth)."""
  from claver_jax.memory import text_shape
  sets, classes = text_shape(config)
  draws = config.text.sets_per_step
  texts = (sets if draws >= sets else draws) * classes
  per_device = -(-texts // num_devices)
  cfg = families.model_config(config)
  per_text = text_tower_flops(cfg, 1, text_length)
  per_text_official = text_tower_flops(cfg, 1, OFFICIAL_CONTEXT)
  official = draws * classes // OFFICIAL_GPUS
  return {'draws': draws, 'sets': sets, 'classes': classes, 'texts': texts,
          'per_device': per_device, 'tflops_per_device': per_device * per_text / 1e12,
          'official_texts_per_gpu': official,
          'official_tflops_per_gpu': official * per_text_official / 1e12}


def load_config(path: str, arg: str | None):
  import importlib.util
  spec = importlib.util.spec_from_file_location('preset', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def texts_table(text_length: int = 32) -> str:
  lines = ['| config | K drawn per update | A x C | texts encoded per device (8) | text tower '
           'fwd + bwd per device, TFLOPs | official per GPU: texts at 77 tokens, TFLOPs |',
           '|---|---|---|---|---|---|']
  for path, arg in TEXT_SETTINGS:
    r = text_report(load_config(path, arg), OFFICIAL_GPUS, text_length)
    lines.append(f'| `{path[len("configs/"):]}:{arg}` | {r["draws"]} | {r["sets"]} x '
                 f'{r["classes"]} | {r["per_device"]} | {r["tflops_per_device"]:.1f} | '
                 f'{r["official_texts_per_gpu"]}: {r["official_tflops_per_gpu"]:.1f} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  if f.table:
    print(paper_table())
    return
  if f.texts_table:
    print(texts_table(f.text_length))
    return
  if f.config is None:
    raise SystemExit('error: pass --config=configs/k400.py[:PRESET], --table or --texts_table.')
  if f.texts and f.config.optim.freeze_text:
    print(f'{f.config.model.name}: the text tower is frozen; its texts are encoded once and '
          'cached, with no text work in the train step.')
    return
  if f.texts:
    try:
      r = text_report(f.config, f.devices, f.text_length)
    except ValueError as e:
      raise SystemExit(f'error: {e}') from e
    print(f'{r["draws"]} description sets drawn per update of {r["sets"]} sets x '
          f'{r["classes"]} classes: {r["texts"]} texts encoded (each drawn set once), '
          f'{r["per_device"]} per device on {f.devices} devices')
    print(f'text tower forward + backward per device and update, at {f.text_length} tokens per '
          f'text: {r["tflops_per_device"]:.3g} TFLOPs')
    print(f'the official loop per GPU and update: {r["official_texts_per_gpu"]} texts at '
          f'{OFFICIAL_CONTEXT} tokens, {r["official_tflops_per_gpu"]:.3g} TFLOPs')
    return
  try:
    cfg = families.model_config(f.config)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from e
  r = report(cfg, f.num_classes)
  print(f'{f.config.model.name} {f.config.model.arch}, {cfg.num_frames} frames at '
        f'{cfg.clip.image_size} px, {cfg.summary}')
  print(f'per view: {r["total"]:.4g} GFLOPs = {r["total"] / 2:.4g} GMACs '
        f'(ViT over {cfg.num_frames} frames {r["vit"]:.4g}, the rest {r["temporal"]:.4g})')
  print(f'scoring one view against {f.num_classes} class texts: {r["classes"]:.4g} GFLOPs')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'A run config, e.g. configs/k400.py:B16,16.')
  flags.DEFINE_bool('table', False, "Print docs/performance.md's table of the papers' variants.")
  flags.DEFINE_integer('num_classes', K400_CLASSES, 'Class texts a view is scored against.')
  flags.DEFINE_bool('texts', False, "The text tower's work per train step of --config.")
  flags.DEFINE_bool('texts_table', False, "Print docs/performance.md's text work per step.")
  flags.DEFINE_integer('devices', OFFICIAL_GPUS, '--texts: devices the texts are split over.')
  flags.DEFINE_integer('text_length', 32, '--texts: tokens per text (an upper bound).')
  app.run(main)
