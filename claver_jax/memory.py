r"""Per-device memory of the compiled train step, from XLA's memory analysis: nothing is run.

    python -m claver_jax.memory --config=configs/k400.py:B16,32 [--devices=8]
    python -m claver_jax.memory --config=configs/k400.py:B16,8,xclip --num_classes=400
    python -m claver_jax.memory --table --text_length=32   # the README's table: what fits

The train step is the one train.py compiles (`make_train_step`, its shardings, the donated
state), lowered on abstract shapes (`nnx.eval_shape`, `jax.ShapeDtypeStruct`) for a mesh of
--devices simulated CPU devices and compiled by XLA's CPU backend; `memory_analysis()` of that
per-device program gives its arguments, outputs and temporaries. A device's peak is taken as
arguments + outputs - donated aliases + temporaries. The class count and description sets come
from the config's prompt set, templates and text.bare_name; a config without a prompt set (X-CLIP's
presets: the class name alone) needs --num_classes. Every text is counted at `context_length`
tokens, or at --text_length (the step cuts texts to the longest one, rounded up to 8: 32 for
the shipped prompt sets with OpenAI's vocabulary; the README's table uses --text_length=32).

What this measures is the CPU backend's buffer assignment: GPU and TPU compilers fuse, lay out
and schedule differently, so their peaks differ. Hence a margin: a micro-batch fits a device
when the CPU peak is at most BUDGET_FRACTION of its memory (the share of a GPU that JAX
preallocates by default). The CPU compiler also removes the optimization barriers that keep
`jax.checkpoint`'s recomputation apart from the forward pass, so `model.remat` gets no credit here.

--table: for each config of SETTINGS, the step compiled at 1 and 2 clips per device (no
accumulation), the text tower's share (the same step with the text tower frozen, its embeddings
cached, subtracted), the largest micro-batch per device (clips per device per accumulation step)
that fits each device kind, extrapolated linearly from the two, and the config as shipped.
"""

from __future__ import annotations

import dataclasses
import os
import sys

if __name__ == '__main__':   # Simulated devices must be asked for before jax starts.
  _count = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_count}')

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from claver_jax import optim, sharding
from claver_jax.models import families
from claver_jax.models.clip import set_remat
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, resolve_aspects,
                                     resolve_templates)

GiB = 2 ** 30
BUDGET_FRACTION = 0.75
# Device kinds: (name, memory in bytes).
DEVICES = (('80 GB GPU', 80 * GiB), ('32 GiB TPU (v4)', 32 * GiB), ('16 GiB TPU (v5e)', 16 * GiB))
# The --table rows: (config file, argument).
SETTINGS = (('configs/k400.py', 'B16,32,kmt'), ('configs/ucf101.py', 'full'),
            ('configs/hmdb51.py', 'full'))


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled train step."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries


def text_shape(config: ml_collections.ConfigDict,
               num_classes: int | None = None) -> tuple[int, int]:
  """(description sets A, classes C) of the config's texts: the classes of its prompt set, or
  else `num_classes` of them, with its templates and bare name."""
  if config.text.prompts:
    prompt_set = load_prompt_set(config.text.prompts)
    classes = list(prompt_set)
  elif num_classes:
    prompt_set, classes = None, [f'class {i}' for i in range(num_classes)]
  else:
    raise ValueError('config.text.prompts is empty, so the class count is unknown: pass '
                     '--num_classes (e.g. 400 for Kinetics-400).')
  texts, _ = build_prompt_texts(classes, prompt_set,
                                templates=resolve_templates(config.text.templates),
                                aspects=resolve_aspects(config.text.aspects),
                                allow_missing=True, name=config.text.bare_name)
  return len(texts), len(texts[0])


def train_step_memory(config: ml_collections.ConfigDict, num_devices: int,
                      text_length: int | None = None,
                      num_classes: int | None = None) -> StepMemory:
  """The compiled train step of `config` (its global batch and accumulation) on `num_devices`;
  `num_classes` for a config without a prompt set (see `text_shape`)."""
  from claver_jax.train import make_train_step
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:num_devices])
  # The config's model; a 'custom' one with CLIP's vocabulary (its tokenizer is not read).
  family, cfg = families.get(config.model.name), families.model_config(config)
  dtype = jnp.dtype(config.model.dtype)
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=1000,
                               steps_per_epoch=100)

  def build():
    model = family.module_class(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    set_remat(model, config.model.remat)
    return model, nnx.Optimizer(model, tx,
                                wrt=optim.trainable_filter(config.optim, family.group_of))

  graphdef, state = nnx.split(nnx.eval_shape(build))
  state_sharding = sharding.state_shardings(mesh, state)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  num_sets, num_classes = text_shape(config, num_classes)
  text_frozen = config.optim.freeze_text
  length = text_length or cfg.clip.context_length
  step = jax.jit(make_train_step(graphdef, config, mesh,
                                 np.full((num_sets, num_classes), length), text_frozen,
                                 family.group_of),
                 in_shardings=(state_sharding, batch_sharding, replicated, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  b, size = config.train.batch_size, config.data.image_size
  batch = {'video': jax.ShapeDtypeStruct((b, config.data.num_frames, size, size, 3), jnp.uint8,
                                         sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
  text = (jax.ShapeDtypeStruct((num_sets, num_classes, cfg.clip.embed_dim), jnp.float32)
          if text_frozen else
          jax.ShapeDtypeStruct((num_sets, num_classes, length), jnp.int32))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, state_sharding)
  compiled = step.lower(abstract_state, batch, text,
                        jax.ShapeDtypeStruct((), jnp.int32)).compile()
  m = compiled.memory_analysis()
  return StepMemory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                    m.temp_size_in_bytes)


def micro_batch_memory(config: ml_collections.ConfigDict, per_device: int, num_devices: int,
                       text_length: int | None = None) -> StepMemory:
  """The step with `per_device` clips per device and no accumulation."""
  c = config.copy_and_resolve_references()
  c.train.batch_size, c.train.grad_accum_steps = per_device * num_devices, 1
  return train_step_memory(c, num_devices, text_length)


def load_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
  import importlib.util
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def clips_that_fit(at_one: StepMemory, at_two: StepMemory, budget: float) -> int:
  """The most clips per device within `budget` bytes, the peak being affine in the clip count."""
  if at_one.peak > budget:
    return 0
  return 1 + int((budget - at_one.peak) // max(at_two.peak - at_one.peak, 1))


def table(num_devices: int, text_length: int | None) -> str:
  """The README's table: one row per config of SETTINGS."""
  lines = ['| config | model | peak at 1 clip/device (text tower) | per further clip | ' +
           ' | '.join(name for name, _ in DEVICES) + f' | as shipped on {num_devices} devices |',
           '|---|---|---|---|' + '---|' * len(DEVICES) + '---|']
  for path, arg in SETTINGS:
    config = load_config(path, arg)
    at_one, at_two = (micro_batch_memory(config, n, num_devices, text_length) for n in (1, 2))
    frozen_text = config.copy_and_resolve_references()
    frozen_text.optim.freeze_text = True
    text = at_one.peak - micro_batch_memory(frozen_text, 1, num_devices, text_length).peak
    fits = [clips_that_fit(at_one, at_two, BUDGET_FRACTION * memory) for _, memory in DEVICES]
    shipped = train_step_memory(config, num_devices, text_length)
    tc = config.train
    per_device = tc.batch_size // (num_devices * tc.grad_accum_steps)
    model = (f'{config.model.arch} {config.data.num_frames}f {config.model.temporal}, '
             f'{config.model.dtype}, attention {config.model.attention}')
    lines.append(
        f'| {path}:{arg} | {model} | {at_one.peak / GiB:.1f} GiB ({text / GiB:.1f}) | '
        f'{(at_two.peak - at_one.peak) / GiB:.2f} GiB | ' + ' | '.join(map(str, fits)) +
        f' | {per_device} clips x {tc.grad_accum_steps} steps: {shipped.peak / GiB:.1f} GiB |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  if f.devices > jax.device_count():
    raise SystemExit(f'error: --devices={f.devices} but jax has {jax.device_count()}; pass '
                     '--devices on the command line of `python -m claver_jax.memory`.')
  print(f'XLA memory analysis of the train step on {f.devices} simulated {jax.default_backend()}'
        f' devices; fits = peak <= {BUDGET_FRACTION:.0%} of the device.')
  if f.table:
    print(table(f.devices, f.text_length))
    return
  if f.config is None:
    raise SystemExit('error: pass --config=configs/k400.py[:PRESET] or --table.')
  try:
    m = train_step_memory(f.config, f.devices, f.text_length, f.num_classes)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  c = f.config
  print(f'{c.model.arch}, {c.data.num_frames} frames, {c.model.temporal} '
        f'(attention {c.model.attention}), {c.model.dtype}, remat={c.model.remat}: batch '
        f'{c.train.batch_size} x accumulation {c.train.grad_accum_steps} on {f.devices} devices')
  print(f'per device: peak {m.peak / GiB:.2f} GiB = arguments {m.arguments / GiB:.2f} + outputs '
        f'{m.outputs / GiB:.2f} - donated {m.aliased / GiB:.2f} + temporaries '
        f'{m.temporaries / GiB:.2f}')
  for name, memory in DEVICES:
    verdict = 'fits' if m.peak <= BUDGET_FRACTION * memory else 'does not fit'
    print(f'  {name}: {verdict}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'A run config, e.g. configs/k400.py:B16,32.')
  flags.DEFINE_bool('table', False, "Print the README's table of what fits.")
  flags.DEFINE_integer('devices', 8, 'Simulated devices of the mesh (data parallel).')
  flags.DEFINE_integer('text_length', None, 'Tokens per text (default: the context length).')
  flags.DEFINE_integer('num_classes', None, 'Classes of a config without a prompt set '
                       '(config.text.prompts), e.g. X-CLIP\'s presets.')
  app.run(main)
