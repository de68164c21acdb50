r"""First contact with a GPU or TPU host: what runs, how fast, in one command (< 8 minutes).

    python -m benchmarks.accelerator_smoke            # on the accelerator host
    python -m benchmarks.accelerator_smoke --quick    # a dry run at toy sizes (CPU, the tests)

Self-contained: random weights, synthetic clips and texts, nothing downloaded. Each check prints
one line, `RESULT <check> PASS|FAIL key=value ...`; a failed check prints its error and the
others go on; the exit status is 1 if any failed.

  environment     backend, device kind and count, versions, the device's published peak bf16
                  TFLOP/s, and a measured bf16 matmul rate.
  attention_t8, attention_t32
                  the temporal attention at ViT-B/16 sizes (197 tokens per frame, 12 heads of
                  64, bf16, a batch split over every local device) for KMT: the kernel the
                  program uses (models/kronecker.py's report, and the fused custom calls counted
                  in the compiled HLO: cuDNN's `__cudnn$fmha*`, Pallas' `tpu_custom_call`), in
                  evaluation (forward) and training (forward + backward); the error of both
                  against an fp32 dense reference computed at `highest` precision; and their
                  time against the portable chunked kernel's.
  train_step      the real train step of configs/k400.py:B16,8,kmt (random weights, the preset's
                  texts as random tokens of 32, its towers and optimizer), --clips_per_device
                  clips per device without accumulation (halved until the compiled step fits the
                  device): compile time, step time (median of --steps after 2 warm-up steps),
                  clips/s, MFU (per-device FLOPs from XLA's cost analysis plus the loop trips
                  it does not count, claver_jax.flops.step_flops, over the step time and the
                  peak) and peak memory.
  input_pipeline  the train pipeline's clips/s on this host with --workers grain workers, from
                  synthetic 320x240 mp4s of 10 s and from the dataset prepared from them
                  (benchmarks.input_pipeline.measure), and how many such hosts reading the
                  prepared dataset the train step above would need to be fed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if '--quick' in sys.argv and 'jax' not in sys.modules:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from claver_jax import aot, optim, sharding
from claver_jax import flops as flops_lib
from claver_jax.models import families, kronecker
from claver_jax.models.clip import set_remat

REPO = Path(__file__).resolve().parents[1]
# Published dense bf16 TFLOP/s per device, by a part of jax's device_kind.
PEAK_TFLOPS = (('H100 PCIe', 756), ('H100', 989), ('H200', 989), ('GH200', 989), ('B200', 2250),
               ('A100', 312), ('L40S', 362), ('L4', 121), ('TPU v4', 275),
               ('TPU v5 lite', 197), ('TPU v5e', 197), ('TPU v5', 459), ('TPU v6 lite', 918),
               ('TPU7x', 2307))
FUSED_CALLS = ('__cudnn$fmha', 'tpu_custom_call')


def result(name: str, ok: bool, **values: Any) -> bool:
  shown = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in values.items())
  print(f'RESULT {name} {"PASS" if ok else "FAIL"} {shown}', flush=True)
  return ok


def peak_tflops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((peak for part, peak in PEAK_TFLOPS if part in kind), None)


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
  """Median wall time of fn() (its outputs waited for), after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def local_mesh():
  return sharding.make_mesh(sharding.default_config(), devices=jax.local_devices())


def run(name: str, fn: Callable[[], Any]) -> Any:
  """fn()'s value; if it raises, the traceback on stderr and `RESULT name FAIL error=...`."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # one failed check, the rest go on
    traceback.print_exc()
    message = str(e).splitlines()[0][:300] if str(e) else ''
    return result(name, False, error=repr(f'{type(e).__name__}: {message}'))


# ------------------------------------------------------------------------------- checks
def check_environment(quick: bool) -> bool:
  import flax
  device = jax.devices()[0]
  import importlib.metadata
  versions = {'jax': jax.__version__, 'jaxlib': importlib.metadata.version('jaxlib'),
              'flax': flax.__version__}
  for extra in ('libtpu', 'jax-cuda12-plugin', 'jax-cuda13-plugin'):
    try:
      versions[extra.replace('-', '_')] = importlib.metadata.version(extra)
    except importlib.metadata.PackageNotFoundError:
      pass
  n = 1024 if quick else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  rate = 2 * n ** 3 / median_seconds(lambda: matmul(a), 3 if quick else 10) / 1e12
  peak = peak_tflops()
  return result('environment', True, backend=jax.default_backend(),
                device_kind=repr(device.device_kind), devices=jax.device_count(),
                processes=jax.process_count(), peak_tflops=peak if peak else 'unknown',
                matmul_tflops=rate, **versions)


def check_attention(frames: int, quick: bool) -> bool:
  mesh = local_mesh()
  tokens, heads, width = (5, 2, 16) if quick else (197, 12, 64)
  shape = (2 * mesh.size if quick else 4 * mesh.size, frames * tokens, heads, width)
  keys = jax.random.split(jax.random.key(frames), 4)
  q, k, v, w = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  spec = sharding.batch_sharding(mesh)
  q16, k16, v16 = (jax.device_put(x.astype(jnp.bfloat16), spec) for x in (q, k, v))
  w = jax.device_put(w, spec)

  def attend(q, k, v, implementation='chunked'):
    return kronecker.kronecker_attention(q, k, v, kind='kmt', num_frames=frames,
                                         implementation=implementation)

  def grads(q, k, v, w, implementation='chunked'):
    loss = lambda q, k, v: (attend(q, k, v, implementation).astype(jnp.float32) * w).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with jax.default_matmul_precision('highest'):
    reference = jax.jit(lambda q, k, v: attend(q, k, v, 'dense'))(q, k, v)
    reference_grads = jax.jit(lambda q, k, v, w: grads(q, k, v, w, 'dense'))(q, k, v, w)
  jit = lambda fn: (lambda: jax.jit(fn, in_shardings=spec))

  def compiled(fn, *args):
    return aot.compile_step(jit(fn), mesh, *args, name='attention')

  forward, backward = compiled(attend, q16, k16, v16), compiled(grads, q16, k16, v16, w)
  with kronecker.portable_kernels_only():
    portable_forward = compiled(attend, q16, k16, v16)
    portable_backward = compiled(grads, q16, k16, v16, w)
  relative = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) /
                                jnp.linalg.norm(b.ravel()))
  forward_error = relative(forward.compiled(q16, k16, v16), reference)
  backward_error = max(relative(g, r) for g, r in zip(backward.compiled(q16, k16, v16, w),
                                                      reference_grads))
  runs = 3 if quick else 10
  time_of = lambda step, *args: median_seconds(lambda: step.compiled(*args), runs)
  fused = lambda step: sum(step.compiled.as_text().count(call) for call in FUSED_CALLS)
  kernel = lambda step: step.kernels[0].split(': ', 1)[1] if step.kernels else 'none'
  speed_forward = time_of(portable_forward, q16, k16, v16) / time_of(forward, q16, k16, v16)
  speed_backward = (time_of(portable_backward, q16, k16, v16, w) /
                    time_of(backward, q16, k16, v16, w))
  ok = forward_error < 2e-2 and backward_error < 5e-2
  return result(f'attention_t{frames}', ok, tokens=frames * tokens, clips=shape[0],
                eval_kernel=repr(kernel(forward)), eval_fused_calls=fused(forward),
                train_kernel=repr(kernel(backward)), train_fused_calls=fused(backward),
                fallback=repr(forward.fallback or backward.fallback or ''),
                eval_rel_err=forward_error, train_grad_rel_err=backward_error,
                eval_speedup_vs_portable=speed_forward, train_speedup_vs_portable=speed_backward)


def train_config(quick: bool, clips_per_device: int, devices: int):
  from claver_jax.memory import load_config
  if quick:
    config = load_config(str(REPO / 'configs' / 'demo.py'), None)
    config.model.attention = 'chunked'
  else:
    config = load_config(str(REPO / 'configs' / 'k400.py'), 'B16,8,kmt')
  config.train.batch_size = clips_per_device * devices
  config.train.grad_accum_steps = 1
  config.eval.batch_size = devices
  return config


def check_train_step(quick: bool, clips_per_device: int, steps: int) -> tuple[bool, float]:
  """-> (passed, clips/s)."""
  from claver_jax.memory import text_shape
  from claver_jax.run_config import check_batches
  from claver_jax.step import make_train_step
  mesh = local_mesh()
  device = jax.local_devices()[0]
  capacity = (device.memory_stats() or {}).get('bytes_limit')
  for attempt in range(4):
    config = train_config(quick, clips_per_device, mesh.size)
    check_batches(config, mesh)
    family, cfg = families.get(config.model.name), families.model_config(config)
    num_sets, num_classes = text_shape(config, 12 if quick else None)
    length = 16 if quick else 32
    tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=1000,
                                 steps_per_epoch=100)

    def build():
      model = family.module_class(cfg, dtype=jnp.dtype(config.model.dtype), rngs=nnx.Rngs(0))
      set_remat(model, config.model.remat)
      return model, nnx.Optimizer(model, tx,
                                  wrt=optim.trainable_filter(config.optim, family.group_of))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    state_sharding = sharding.state_shardings(mesh, abstract_state)
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    make_jitted = lambda: jax.jit(
        make_train_step(graphdef, config, mesh, np.full((num_sets, num_classes), length),
                        config.optim.freeze_text, family.group_of),
        in_shardings=(state_sharding, batch_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    b, t, size = config.train.batch_size, config.data.num_frames, config.data.image_size
    rng = np.random.default_rng(0)
    batch = {'video': rng.integers(0, 256, (b, t, size, size, 3), dtype=np.uint8),
             'label': rng.integers(0, num_classes, (b,), dtype=np.int32)}
    text = (rng.normal(size=(num_sets, num_classes, cfg.clip.embed_dim)).astype(np.float32)
            if config.optim.freeze_text else
            np.concatenate([rng.integers(1, cfg.clip.eos_token_id, (num_sets, num_classes,
                                                                    length - 1)),
                            np.full((num_sets, num_classes, 1), cfg.clip.eos_token_id)],
                           -1).astype(np.int32))
    args = (aot.abstract(abstract_state), aot.abstract(batch), aot.abstract(text),
            jax.ShapeDtypeStruct((), jnp.int32))
    step = aot.compile_step(make_jitted, mesh, *args, name='train step')
    if capacity is None or step.memory is None or step.memory.peak <= 0.95 * capacity:
      break
    print(f'  {clips_per_device} clips per device need {aot.size(step.memory.peak)} of '
          f'{aot.size(capacity)}: halving.', flush=True)
    clips_per_device //= 2
    if not clips_per_device:
      return result('train_step', False, error='one clip per device does not fit'), 0.0
  counted, hidden = flops_lib.step_flops(make_jitted, mesh, *args, compiled=step.compiled)
  state = jax.device_put(nnx.split(build())[1], state_sharding)    # random weights
  batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  text, number = jax.device_put(text, replicated), jax.device_put(np.int32(1), replicated)
  holder = [state]

  def one_step():
    holder[0], out = step.compiled(holder[0], batch, text, number)
    return out['loss']

  for _ in range(2):
    jax.block_until_ready(one_step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = jax.block_until_ready(one_step())
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  clips_per_s = config.train.batch_size / seconds
  per_device = counted + hidden
  peak = peak_tflops()
  stats = device.memory_stats() or {}
  memory = stats.get('peak_bytes_in_use', step.memory.peak if step.memory else 0)
  finite = bool(np.isfinite(float(loss)))
  return result('train_step', finite, config=repr(config.model.arch + f',{t},kmt'),
                clips_per_device=clips_per_device, devices=mesh.size,
                kernel=repr(step.kernels[0].split(': ', 1)[1] if step.kernels else 'none'),
                compile_s=step.seconds, step_s=seconds, clips_per_s=clips_per_s,
                tflop_per_device=per_device / 1e12, loop_tflop_added=hidden / 1e12,
                mfu=per_device / seconds / (peak * 1e12) if peak else 'unknown',
                peak_memory_gib=memory / aot.GiB, loss=float(loss)), clips_per_s


def check_input_pipeline(quick: bool, workers: int, accelerator_clips_per_s: float) -> bool:
  """The train pipeline's clips/s on this host, from mp4 and from a prepared dataset (what a pod
  should read), on synthetic 320x240 clips (10 s at 25 fps; 16 frames with --quick)."""
  from benchmarks.input_pipeline import measure
  seconds, videos, batches = (0.64, 8, 2) if quick else (10, 24, 12)
  rates = measure(seconds=seconds, num_videos=videos, batches=batches, workers=(workers,),
                  bare=False)
  mp4, prepared = rates[f'mp4/{workers}'], rates[f'prepared/{workers}']
  hosts = accelerator_clips_per_s / prepared if accelerator_clips_per_s else 'unknown'
  return result('input_pipeline', mp4 > 0 and prepared > 0,
                video=f'320x240x{int(round(seconds * 25))}f', workers=workers,
                cpus=os.cpu_count(), mp4_clips_per_s=mp4, prepared_clips_per_s=prepared,
                prepared_clips_per_s_per_worker=prepared / max(workers, 1),
                hosts_to_feed_train_step=hosts)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  start = time.time()
  print(f'accelerator smoke benchmark on {jax.device_count()} {jax.devices()[0].device_kind} '
        f'device(s){" (--quick)" if f.quick else ""}', flush=True)
  passed, train_rate = [], 0.0
  passed.append(run('environment', lambda: check_environment(f.quick)))
  for frames in (8, 32):
    passed.append(run(f'attention_t{frames}', lambda: check_attention(frames, f.quick)))
  out = run('train_step', lambda: check_train_step(f.quick, f.clips_per_device, f.steps))
  if isinstance(out, tuple):
    out, train_rate = out
  passed.append(out)
  workers = f.workers if f.workers >= 0 else min(16, max((os.cpu_count() or 2) - 2, 1))
  passed.append(run('input_pipeline',
                    lambda: check_input_pipeline(f.quick, workers, train_rate)))
  print(f'{sum(passed)} of {len(passed)} checks passed in {time.time() - start:.0f} s', flush=True)
  if not all(passed):
    sys.exit(1)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_bool('quick', False, 'A dry run at toy sizes (the tests run it on the CPU).')
  flags.DEFINE_integer('clips_per_device', 16, 'Train step clips per device (halved until it '
                       'fits).')
  flags.DEFINE_integer('steps', 5, 'Timed train steps.')
  flags.DEFINE_integer('workers', -1, 'grain workers of the input check (-1: CPUs - 2, at most '
                       '16; 0: in-process).')
  app.run(main)
