"""The one labels-file parser: training, prompts, zero-shot and predict read class lists with it.

A labels file is either
  * a CSV of `id,name` rows, optionally under an `id,name` header (any case); names with commas
    are quoted ("a, b"); ids are 0..C-1, each once, in any order; or
  * a plain list, one class name per line; the ids are the line order.
The first non-blank line decides: the header, or `INTEGER,name`, makes it a CSV. Blank lines
are skipped; a class name may appear only once. Every error names the file and the line.
"""

from __future__ import annotations

import csv
import os


class DataError(ValueError):
  """Malformed dataset metadata (list file, labels CSV, prepared dataset); says where and why."""


def _is_header(cells: list[str]) -> bool:
  return [c.strip().lower() for c in cells] == ['id', 'name']


def _is_int(text: str) -> bool:
  return text.strip().lstrip('-').isdigit()


def read_labels(path: str | os.PathLike) -> list[str]:
  """A labels file (see the module docstring), local or gs:// -> class names in id order."""
  from etils import epath
  path = epath.Path(path)
  if not path.is_file():
    raise DataError(f'Labels file {path} does not exist; pass a labels CSV (id,name rows) or a '
                    'file of one class name per line.')
  text = path.read_bytes().decode('utf-8-sig')
  numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
  if not numbered:
    raise DataError(f'Labels file {path} has no classes.')
  first = next(csv.reader([numbered[0][1]]))
  is_csv = _is_header(first) or (len(first) == 2 and _is_int(first[0]))
  if is_csv and _is_header(first):
    numbered = numbered[1:]
  names: dict[int, str] = {}
  line_of_id: dict[int, int] = {}
  line_of_name: dict[str, int] = {}
  for line_number, line in numbered:
    where = f'{path}:{line_number}'
    if is_csv:
      row = next(csv.reader([line]))
      if len(row) != 2 or not _is_int(row[0]) or not row[1].strip():
        raise DataError(f'{where}: expected "id,name" (e.g. "0,abseiling"), got {line.strip()!r}.')
      class_id, name = int(row[0]), row[1].strip()
      if class_id < 0:
        raise DataError(f'{where}: id {class_id} is negative; ids are 0..C-1.')
      if class_id in names:
        raise DataError(f'{where}: id {class_id} appears twice ({names[class_id]!r} on line '
                        f'{line_of_id[class_id]}, {name!r} here).')
    else:
      class_id, name = len(names), line.strip()
    if name in line_of_name:
      raise DataError(f'{where}: the class name {name!r} appears twice (also on line '
                      f'{line_of_name[name]}).')
    names[class_id], line_of_id[class_id], line_of_name[name] = name, line_number, line_number
  if not names:
    raise DataError(f'Labels file {path} has no classes.')
  count = len(names)
  beyond = sorted(i for i in names if i >= count)
  if beyond:
    missing = sorted(set(range(count)) - set(names))[:10]
    raise DataError(f'{path}:{line_of_id[beyond[0]]}: id {beyond[0]}: ids must be '
                    f'0..{count - 1} without gaps; missing {missing}.')
  return [names[i] for i in range(count)]
