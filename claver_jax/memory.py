r"""Per-device memory of the compiled train step, from XLA's memory analysis: nothing is run.

    python -m claver_jax.memory --config=configs/k400.py:B16,32 --topology=v5e:4x4
    python -m claver_jax.memory --table --topology=v5e:2x4 --text_length=32   # the docs'
    python -m claver_jax.memory --config=configs/k400.py:B16,8,xclip --num_classes=400 --devices=8

--topology=NAME (v5e:4x4, v5e:2x4, v4:2x2x4, v6e:4x4, ...: claver_jax.topologies) compiles the
train step for that TPU slice with XLA's TPU compiler, on this machine, through libtpu's
description of the slice (`pip install -e '.[tpu]'`; no TPU needed). Before compiling it runs
the checks a run starts with (the mesh from config.mesh, every host's rows of each batch, the
parameters' sharding rules), so a preset that would fail at start-up on that slice fails here.
Without --topology the step is compiled by XLA's CPU backend for --devices simulated CPU devices:
XLA:CPU computes bf16 matrix products in fp32 and lays out, fuses and schedules differently, so
its figures overstate an accelerator's (K400 B/16 32f with the image tower frozen, 16 clips per
device: 38.0 GiB for the CPU, 14.71 GiB for v5e); they are no GPU figures, only an upper bound.

The train step is the one train.py compiles (`step.make_train_step`, its shardings, the donated
state, the fused attention kernel the platform gets: splash on TPU), lowered on abstract shapes
(`nnx.eval_shape`, `jax.ShapeDtypeStruct`); `memory_analysis()` of the per-device program gives
its arguments, outputs and temporaries, and a device's peak is arguments + outputs - donated +
temporaries. The class count and description sets come from the config's prompt set, templates
and text.bare_name; a config without a prompt set (X-CLIP's presets: the class name alone) needs
--num_classes. Every text is counted at `context_length` tokens, or at --text_length (the step
cuts texts to the longest one, rounded up to 8: 32 for the shipped prompt sets with OpenAI's
vocabulary; docs/performance.md's tables use --text_length=32).

A micro-batch fits a TPU chip when the compiled peak is at most TPU_BUDGET_FRACTION of its HBM
(the runtime keeps some for itself); a CPU-compiled one fits a device at CPU_BUDGET_FRACTION
(the share of a GPU JAX preallocates, and a margin for the CPU compiler's other layout).

--table: for each config of SETTINGS, the step compiled at 1 and 2 clips per device (no
accumulation), the text tower's share (the same step with the text tower frozen, its embeddings
cached, subtracted), the largest micro-batch per device that fits, extrapolated linearly from
the two, and the config as shipped.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':   # Simulated devices must be asked for before jax starts.
  _count = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_count}')
  if any(a.startswith('--topology=') for a in sys.argv):
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # compiling for a TPU slice needs no TPU

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from claver_jax import aot, optim, sharding, topologies
from claver_jax.models import families
from claver_jax.models.clip import set_remat
from claver_jax.text.prompts import (build_prompt_texts, load_prompt_set, resolve_aspects,
                                     resolve_templates)

GiB = aot.GiB
CPU_BUDGET_FRACTION = 0.75
TPU_BUDGET_FRACTION = 0.9
# CPU-compiled tables: device kinds (name, memory in bytes).
DEVICES = (('80 GB GPU', 80 * GiB), ('32 GiB TPU (v4)', 32 * GiB), ('16 GiB TPU (v5e)', 16 * GiB))
# The --table rows: (config file, argument).
SETTINGS = (('configs/k400.py', 'B16,8,kmt'), ('configs/k400.py', 'B16,32,kmt'),
            ('configs/ucf101.py', 'full'), ('configs/hmdb51.py', 'full'))
StepMemory = aot.StepMemory


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


def step_devices(num_devices: int = 0, topology: str = '') -> list:
  """The devices to compile for: a TPU slice's (`topology`) or the first `num_devices` of JAX's."""
  if topology:
    return list(topologies.tpu_devices(topology))
  if num_devices > jax.device_count():
    raise ValueError(f'--devices={num_devices} but jax has {jax.device_count()}; pass --devices '
                     'on the command line of `python -m claver_jax.memory`.')
  return jax.devices()[:num_devices]


def compile_train_step(config: ml_collections.ConfigDict, devices: list,
                       text_length: int | None = None,
                       num_classes: int | None = None) -> aot.CompiledStep:
  """The train step of `config` (its global batch and accumulation) compiled for `devices`
  after the train loop's batch checks (run_config.check_batches); `num_classes` for a config
  without a prompt set (see `text_shape`)."""
  from claver_jax.run_config import check_batches
  from claver_jax.step import make_train_step
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  check_batches(config, mesh)
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
  make_jitted = lambda: jax.jit(
      make_train_step(graphdef, config, mesh, np.full((num_sets, num_classes), length),
                      text_frozen, family.group_of),
      in_shardings=(state_sharding, batch_sharding, replicated, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  b, size = config.train.batch_size, config.data.image_size
  batch = {'video': jax.ShapeDtypeStruct((b, config.data.num_frames, size, size, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  text = (jax.ShapeDtypeStruct((num_sets, num_classes, cfg.clip.embed_dim), jnp.float32)
          if text_frozen else
          jax.ShapeDtypeStruct((num_sets, num_classes, length), jnp.int32))
  return aot.compile_step(make_jitted, mesh, aot.abstract(state), batch, text,
                          jax.ShapeDtypeStruct((), jnp.int32), name='train step')


def train_step_memory(config: ml_collections.ConfigDict, num_devices: int = 0,
                      text_length: int | None = None, num_classes: int | None = None,
                      topology: str = '') -> StepMemory:
  """Per-device bytes of `compile_train_step` on `topology` or `num_devices` CPU devices."""
  return compile_train_step(config, step_devices(num_devices, topology), text_length,
                            num_classes).memory


def micro_batch_memory(config: ml_collections.ConfigDict, per_device: int, num_devices: int = 0,
                       text_length: int | None = None, topology: str = '') -> StepMemory:
  """The step with `per_device` clips per device and no accumulation."""
  devices = step_devices(num_devices, topology)
  c = config.copy_and_resolve_references()
  c.train.batch_size, c.train.grad_accum_steps = per_device * len(devices), 1
  c.eval.batch_size = len(devices)
  return compile_train_step(c, devices, text_length).memory


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


def budget(topology: str) -> tuple[str, float]:
  """(the device kind, the bytes a micro-batch may peak at) of a TPU slice's chips."""
  return (f'{topologies.chip_memory(topology) / GiB:.0f} GiB {topology.split(":")[0]} chip',
          TPU_BUDGET_FRACTION * topologies.chip_memory(topology))


def table(num_devices: int, text_length: int | None, topology: str = '',
          remat: bool | None = None) -> str:
  """docs/performance.md's memory table: one row per config of SETTINGS, on `topology`'s chips
  (or CPU devices); `remat` overrides the configs' model.remat."""
  devices = step_devices(num_devices, topology)
  kinds = [budget(topology)] if topology else [(n, CPU_BUDGET_FRACTION * m) for n, m in DEVICES]
  lines = ['| config | model | peak at 1 clip/device (text tower) | per further clip | clips/device '
           'that fit: ' + ' | '.join(name for name, _ in kinds) +
           f' | as shipped on {len(devices)} devices |',
           '|---|---|---|---|' + '---|' * len(kinds) + '---|']
  for path, arg in SETTINGS:
    config = load_config(path, arg)
    if remat is not None:
      config.model.remat = remat
    at_one, at_two = (micro_batch_memory(config, n, text_length=text_length, topology=topology,
                                         num_devices=num_devices) for n in (1, 2))
    frozen_text = config.copy_and_resolve_references()
    frozen_text.optim.freeze_text = True
    text = at_one.peak - micro_batch_memory(frozen_text, 1, text_length=text_length,
                                            topology=topology, num_devices=num_devices).peak
    fits = [clips_that_fit(at_one, at_two, limit) for _, limit in kinds]
    tc = config.train
    shipped = '-'
    if tc.batch_size % (len(devices) * tc.grad_accum_steps) == 0:
      peak = compile_train_step(config, devices, text_length).memory.peak
      per_device = tc.batch_size // (len(devices) * tc.grad_accum_steps)
      shipped = f'{per_device} clips x {tc.grad_accum_steps} steps: {peak / GiB:.1f} GiB'
    model = (f'{config.model.arch} {config.data.num_frames}f {config.model.temporal}, '
             f'{"both towers" if not config.optim.freeze_image else "text tower"} trained, '
             f'remat {config.model.remat}')
    lines.append(
        f'| `{path.split("/")[-1]}:{arg}` | {model} | {at_one.peak / GiB:.2f} GiB '
        f'({text / GiB:.2f}) | {(at_two.peak - at_one.peak) / GiB:.2f} GiB | ' +
        ' | '.join(map(str, fits)) + f' | {shipped} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    devices = step_devices(f.devices, f.topology)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  if f.topology:
    kind, _ = budget(f.topology)
    hosts = len({d.process_index for d in devices})
    print(f'XLA memory analysis of the train step compiled for TPU {f.topology} '
          f'({len(devices)} {devices[0].device_kind} chips, {hosts} '
          f'host{"s" if hosts > 1 else ""}) by the TPU compiler; '
          f'fits = peak <= {TPU_BUDGET_FRACTION:.0%} of a {kind}.')
  else:
    print(f'XLA memory analysis of the train step on {len(devices)} simulated '
          f'{jax.default_backend()} devices; fits = peak <= {CPU_BUDGET_FRACTION:.0%} of the device '
          '(CPU figures overstate accelerators\'; see --topology).')
  if f.table:
    print(table(f.devices, f.text_length, f.topology,
                None if f.remat is None else f.remat == 'true'))
    return
  if f.config is None:
    raise SystemExit('error: pass --config=configs/k400.py[:PRESET] or --table.')
  try:
    step = compile_train_step(f.config, devices, f.text_length, f.num_classes)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  m, c = step.memory, f.config
  print(f'{c.model.arch}, {c.data.num_frames} frames, {c.model.temporal} '
        f'(attention {c.model.attention}), {c.model.dtype}, remat={c.model.remat}: batch '
        f'{c.train.batch_size} x accumulation {c.train.grad_accum_steps} on {len(devices)} '
        'devices')
  for line in step.kernels:
    print(f'  {line}')
  print(f'per device: peak {m.peak / GiB:.2f} GiB = arguments {m.arguments / GiB:.2f} + outputs '
        f'{m.outputs / GiB:.2f} - donated {m.aliased / GiB:.2f} + temporaries '
        f'{m.temporaries / GiB:.2f}')
  kinds = [budget(f.topology)] if f.topology else [
      (name, CPU_BUDGET_FRACTION * memory) for name, memory in DEVICES]
  for name, limit in kinds:
    print(f'  {name}: {"fits" if m.peak <= limit else "does not fit"}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'A run config, e.g. configs/k400.py:B16,32.')
  flags.DEFINE_bool('table', False, "Print docs/performance.md's table of what fits.")
  flags.DEFINE_string('topology', '', 'A TPU slice to compile for (v5e:4x4, v5e:2x4, v4:2x2x4, '
                      'v6e:4x4, ...; needs libtpu, no TPU). Default: simulated CPU devices.')
  flags.DEFINE_enum('remat', None, ['true', 'false'], '--table: set model.remat in every config '
                    '(default: as each config has it).')
  flags.DEFINE_integer('devices', 8, 'Simulated CPU devices of the mesh, without --topology.')
  flags.DEFINE_integer('text_length', None, 'Tokens per text (default: the context length).')
  flags.DEFINE_integer('num_classes', None, 'Classes of a config without a prompt set '
                       '(config.text.prompts), e.g. X-CLIP\'s presets.')
  app.run(main)
