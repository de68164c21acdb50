"""Reads PyTorch checkpoints without running anything they contain.

A pickle may name any importable function and have it called while it is read (`os.system`
included), and `torch.jit.load` also runs the archive's TorchScript code (a module's
`__setstate__` can write files). This reader does neither, for both zip formats:
  * torch.save archives (PyTorch >= 1.6): NAME/data.pkl + NAME/data/<storage key>;
  * TorchScript archives (torch.jit.save, OpenAI's CLIP .pt files): the same, plus code/ and
    constants.pkl.
Its unpickler builds tensors itself, as numpy arrays read from the archive's storages (offsets,
sizes and strides checked against the storage), builds dicts, lists, tuples and OrderedDicts, and
turns every other global the pickle names into an inert `Opaque` placeholder: it is never
imported, and calling it only records its arguments. A TorchScript module is such a placeholder
holding its attributes; `module_state_dict` walks it into the state dict `module.state_dict()`
gives, taking which attributes are parameters and buffers from the declarations in code/ (read as
text, never run).

The legacy format (torch.save before 1.6, not a zip) is read by `torch.load(weights_only=True)`,
which needs torch >= 2.6: older versions' weights_only can be bypassed (CVE-2025-32434).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
# Globals that are built as what they are; everything else becomes an Opaque placeholder.
_CONTAINERS = {('collections', 'OrderedDict'): collections.OrderedDict,
               ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
               ('builtins', 'list'): list, ('builtins', 'dict'): dict,
               ('builtins', 'tuple'): tuple, ('torch', 'Size'): tuple}


class UnsafeCheckpointError(ValueError):
  """An archive this reader refuses: the message says why."""


class Opaque:
  """An object of a class the reader does not build: its global name, the arguments it was
  called with and the state it was given. Nothing of the class is imported or run."""

  qualified_name = ''
  args: tuple = ()
  kwargs: dict = {}
  state: Any = None            # What BUILD gave it (a TorchScript module: its attributes).

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f'<{self.qualified_name}>'


class _StorageType:
  def __init__(self, name: str, dtype: Any):
    self.name, self.dtype = name, np.dtype(dtype)


def _bfloat16():
  import ml_dtypes  # A jax dependency.
  return ml_dtypes.bfloat16


class _TensorUnpickler(pickle.Unpickler):
  """Tensors as numpy arrays, plain containers, placeholders for everything else."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes, byteorder: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
    self.storages: dict[str, np.ndarray] = {}
    self.placeholders: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _CONTAINERS:
      return _CONTAINERS[(module, name)]
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch._utils' and name in ('_rebuild_parameter',
                                             '_rebuild_parameter_with_state'):
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module == 'torch' and name == 'BFloat16Storage':
      return _StorageType(name, _bfloat16())
    qualified = f'{module}.{name}'
    if qualified not in self.placeholders:
      self.placeholders[qualified] = type(name, (Opaque,), {'qualified_name': qualified})
    return self.placeholders[qualified]

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafeCheckpointError(f'unknown persistent id {str(pid)[:80]}')
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f'storage of unsupported type {storage_type!r}')
    if key not in self.storages:
      if not isinstance(numel, int) or numel < 0:
        raise UnsafeCheckpointError(f'storage {key} of {numel!r} elements')
      size = numel * storage_type.dtype.itemsize
      with self.archive.open(f'{self.prefix}/data/{key}') as f:
        raw = f.read(size)                   # What the pickle claims, no more.
      if len(raw) < size:
        raise UnsafeCheckpointError(f'storage {key} holds {len(raw)} bytes, fewer than its '
                                    f'{numel} elements of {storage_type.name}')
      dtype = storage_type.dtype.newbyteorder('>' if self.byteorder == 'big' else '<')
      array = np.frombuffer(raw, dtype, count=numel)
      self.storages[key] = array.astype(storage_type.dtype, copy=False)
    return self.storages[key]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 with numpy: the view of `storage`, checked to lie in it."""
  del rest  # requires_grad, backward hooks, metadata: nothing a weight needs.
  if not isinstance(storage, np.ndarray):
    raise UnsafeCheckpointError('a tensor without a storage')
  ints = lambda xs: isinstance(xs, tuple) and all(isinstance(x, int) and x >= 0 for x in xs)
  if not (isinstance(offset, int) and offset >= 0 and ints(tuple(size)) and ints(tuple(stride))
          and len(size) == len(stride)):
    raise UnsafeCheckpointError(f'a tensor with offset {offset}, size {size}, stride {stride}')
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise UnsafeCheckpointError(f'a tensor of size {size}, stride {stride} at offset {offset} '
                                f'reaches past its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride], writeable=False)
  return np.array(view)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
  del rest
  return data


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
  prefixes = {n.split('/', 1)[0] for n in archive.namelist() if n.count('/') == 1
              and n.endswith('/data.pkl')}
  if len(prefixes) != 1:
    raise UnsafeCheckpointError(f'{path} is a zip archive without one NAME/data.pkl: not a '
                                'PyTorch checkpoint')
  return prefixes.pop()


def is_torchscript(archive: zipfile.ZipFile) -> bool:
  return any(n.endswith('/constants.pkl') or '/code/' in n for n in archive.namelist())


def read_archive(path: str | Path) -> tuple[Any, bool, dict[str, tuple[list[str], list[str]]]]:
  """A PyTorch zip archive -> (its unpickled data.pkl with numpy arrays for tensors, whether it is
  TorchScript, the parameter and buffer names each TorchScript class declares)."""
  path = Path(path)
  with zipfile.ZipFile(path) as archive:
    prefix = _archive_prefix(archive, path)
    names = set(archive.namelist())
    byteorder = (archive.read(f'{prefix}/byteorder').decode().strip()
                 if f'{prefix}/byteorder' in names else 'little')
    unpickler = _TensorUnpickler(archive, prefix, archive.read(f'{prefix}/data.pkl'), byteorder)
    try:
      data = unpickler.load()
    except UnsafeCheckpointError:
      raise
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            IndexError, RecursionError) as e:
      raise UnsafeCheckpointError(f'{prefix}/data.pkl cannot be read as tensors and plain '
                                  f'containers ({type(e).__name__}: {e})') from e
    torchscript = is_torchscript(archive)
    declared = _declared_state(archive, prefix) if torchscript else {}
  return data, torchscript, declared


_CLASS = re.compile(r'^class (\w+)\(.*?\):\n((?:[ \t].*\n|\n)*)', re.MULTILINE)


def _declared_state(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str],
                                                                                list[str]]]:
  """{qualified class name: (parameter names, buffer names)} from code/*.py, read as text."""
  declared = {}
  code = f'{prefix}/code/'
  for name in archive.namelist():
    if not (name.startswith(code) and name.endswith('.py')):
      continue
    module = name[len(code):-len('.py')].replace('/', '.')
    text = archive.read(name).decode('utf-8', 'replace')
    for match in _CLASS.finditer(text if text.endswith('\n') else text + '\n'):
      body = match.group(2)
      lists = [re.search(rf'^\s*{key} = \[(.*?)\]', body, re.MULTILINE)
               for key in ('__parameters__', '__buffers__')]
      if all(lists):
        declared[f'{module}.{match.group(1)}'] = tuple(re.findall(r'"([^"]*)"', m.group(1))
                                                       for m in lists)
  return declared


def module_state_dict(module: Any, declared: dict[str, tuple[list[str], list[str]]]
                      ) -> dict[str, np.ndarray]:
  """A TorchScript module placeholder -> {'a.b.weight': array}, the keys `state_dict()` has: the
  declared parameters and buffers of every submodule (every array attribute of a class whose
  declarations are not in code/)."""
  out: dict[str, np.ndarray] = {}

  def walk(node: Any, prefix: str, seen: tuple[int, ...]) -> None:
    if id(node) in seen or not isinstance(node, Opaque) or not isinstance(node.state, dict):
      return
    names = declared.get(node.qualified_name)
    for key, value in node.state.items():
      if not isinstance(key, str):
        continue
      if isinstance(value, np.ndarray):
        if names is None or key in names[0] or key in names[1]:
          out[prefix + key] = value
      elif isinstance(value, Opaque):
        walk(value, f'{prefix}{key}.', seen + (id(node),))

  walk(module, '', ())
  return out

