"""Steps compiled ahead of time for their mesh, with what the run's start-up summary says.

    step = aot.compile_step(make_jitted, mesh, *abstract_args, name='train step')
    step.compiled(*args)          # the executable; step.summary(): kernels, time, memory

A step is lowered and compiled under `jax.set_mesh(mesh)`: the fused attention kernels
(models/kronecker.py) need the mesh to split their work over the devices and to know the
platform they compile for (a TPU slice's when compiling for one from a CPU host). When the
program fails to compile and a fused kernel was traced into it (a cuDNN or Mosaic rejection that
only the compiler sees), it is compiled again with the portable kernel, after a warning naming
the error. `on_first_call` does this with the arguments of the first call (and of each call
with new shapes), as the train loop uses it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax

from claver_jax.models import kronecker

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled step (XLA's memory analysis)."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @property
  def peak(self) -> int:
    """Arguments + outputs - donated aliases + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @classmethod
  def of(cls, compiled) -> StepMemory | None:
    m = compiled.memory_analysis()
    if m is None:
      return None
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
               m.temp_size_in_bytes)


@dataclasses.dataclass
class CompiledStep:
  """A compiled step and how it was made."""
  name: str
  compiled: Any                     # jax.stages.Compiled
  seconds: float
  memory: StepMemory | None
  kernels: list[str]                # kronecker.kernel_report() of its trace
  fallback: str | None              # why the fused kernels were given up, if they were

  def summary(self) -> list[str]:
    """The start-up summary's lines for this step."""
    m = self.memory
    memory = ('' if m is None else f'; per device: peak {size(m.peak)} (arguments '
              f'{size(m.arguments)}, temporaries {size(m.temporaries)})')
    lines = [f'Compiled the {self.name} in {self.seconds:.1f} s{memory}.']
    if self.fallback:
      lines.append(f'  The fused attention kernel did not compile ({self.fallback}): the portable '
                   'kernel is used.')
    return lines + [f'  {line}' for line in self.kernels]


def size(num_bytes: int) -> str:
  """'3.41 GiB', or MiB below a tenth of a GiB."""
  return (f'{num_bytes / GiB:.2f} GiB' if num_bytes >= GiB / 10 else
          f'{num_bytes / 2 ** 20:.1f} MiB')


def abstract(tree: Any) -> Any:
  """Arrays -> jax.ShapeDtypeStruct (shape and dtype only: the jitted step's shardings apply)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compile_step(make_jitted: Callable[[], Any], mesh: jax.sharding.Mesh, *args: Any,
                 name: str) -> CompiledStep:
  """make_jitted() -> a jax.jit-ed step; lowered for `args` (arrays or ShapeDtypeStructs) and
  compiled under `mesh`, and made and traced again for the portable retry."""
  kronecker.clear_kernel_report()
  start = time.perf_counter()
  fallback = None
  with jax.set_mesh(mesh):
    try:
      compiled = make_jitted().lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except  # XLA's errors have no common type.
      fused = kronecker.fused_kernels_traced()
      if not fused:
        raise
      fallback = f'{"/".join(sorted(fused))}: {type(e).__name__}: {str(e).splitlines()[0][:300]}'
      logging.warning('The %s failed to compile with the fused attention kernel (%s); compiling it '
                      'again with the portable chunked kernel.', name, fallback)
      kronecker.clear_kernel_report()
      jax.clear_caches()                 # jit would reuse the trace with the fused kernel.
      with kronecker.portable_kernels_only():
        compiled = make_jitted().lower(*args).compile()
  return CompiledStep(name, compiled, time.perf_counter() - start, StepMemory.of(compiled),
                      kronecker.kernel_report(), fallback)


def on_first_call(make_jitted: Callable[[], Any], mesh: jax.sharding.Mesh, name: str,
                  report: Callable[[CompiledStep], None] | None = None) -> Callable[..., Any]:
  """A step that compiles itself (`compile_step`) for the shapes of its first call, and again for
  each new set of shapes (zero-shot scores datasets of other class counts), logs its summary (or
  hands it to `report`), then runs the executable."""
  steps: dict[Any, CompiledStep] = {}

  def call(*args):
    shapes = abstract(args)
    key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(shapes))
    if key not in steps:
      steps[key] = compile_step(make_jitted, mesh, *shapes, name=name)
      if report is not None:
        report(steps[key])
      else:
        for line in steps[key].summary():
          logging.info('%s', line)
    return steps[key].compiled(*args)

  return call
