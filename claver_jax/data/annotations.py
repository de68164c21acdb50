r"""Builds list files + a labels CSV from the datasets' own annotation files.

    python -m claver_jax.data.annotations --format=kinetics --src=train.csv --out=DIR \
        [--split_name=train] [--labels=labels.csv]
    python -m claver_jax.data.annotations --format=ucf101 --src=ucfTrainTestlist/ --split=1 \
        --out=DIR
    python -m claver_jax.data.annotations --format=hmdb51 --src=testTrainMulti_7030_splits/ \
        --split=1 --out=DIR

Kinetics: a CSV with `label,youtube_id,time_start,time_end,split`; clips are expected at
`<label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4` (--path_format changes that); class
ids are the sorted class names unless --labels gives them. Writes <split_name>.txt.
UCF-101: classInd.txt (1-based ids) with trainlist0N.txt / testlist0N.txt; writes train.txt,
test.txt. HMDB-51: `<class>_test_split<N>.txt` files (`video.avi 1|2|0`: train, test, unused);
classes sorted, named with spaces for underscores; writes train.txt, test.txt.
Every format also writes labels.csv.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

from claver_jax.data.sources import DataError, read_labels
from claver_jax.fileio import atomic_write_text

KINETICS_PATH = '{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4'


def _lines(items: list[tuple[str, int]]) -> str:
  return ''.join(f'{path} {label}\n' for path, label in items)


def _labels_csv(names: list[str]) -> str:
  rows = [['id', 'name']] + [[str(i), n] for i, n in enumerate(names)]
  return ''.join(','.join(f'"{c}"' if ',' in c else c for c in row) + '\n' for row in rows)


def kinetics(csv_path: str | os.PathLike, class_names: list[str] | None = None,
             path_format: str = KINETICS_PATH) -> tuple[list[tuple[str, int]], list[str]]:
  """Kinetics' annotation CSV -> ([(path, label)], class names)."""
  with open(csv_path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  needed = {'label', 'youtube_id', 'time_start', 'time_end'}
  if not rows or not needed <= set(rows[0]):
    raise DataError(f'{csv_path}: expected a Kinetics CSV with columns {sorted(needed)}.')
  names = class_names or sorted({r['label'] for r in rows})
  ids = {n: i for i, n in enumerate(names)}
  items = []
  for line_number, row in enumerate(rows, 2):
    if row['label'] not in ids:
      raise DataError(f'{csv_path}:{line_number}: class {row["label"]!r} is not in the labels.')
    path = path_format.format(label=row['label'], youtube_id=row['youtube_id'],
                              time_start=int(float(row['time_start'])),
                              time_end=int(float(row['time_end'])))
    items.append((path, ids[row['label']]))
  return items, names


def ucf101(directory: str | os.PathLike, split: int
           ) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
  """ucfTrainTestlist/ -> ({'train': [...], 'test': [...]}, class names)."""
  directory = Path(directory)
  names = {}
  for line_number, line in enumerate((directory / 'classInd.txt').read_text().splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) != 2 or not fields[0].isdigit():
      raise DataError(f'{directory / "classInd.txt"}:{line_number}: expected "ID ClassName".')
    names[int(fields[0]) - 1] = fields[1]
  class_names = [names[i] for i in range(len(names))]
  ids = {n: i for i, n in enumerate(class_names)}
  splits = {}
  for split_name, prefix in (('train', 'trainlist'), ('test', 'testlist')):
    path = directory / f'{prefix}{split:02d}.txt'
    items = []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      video = line.split()[0]
      class_name = video.split('/')[0]
      if class_name not in ids:
        raise DataError(f'{path}:{line_number}: class folder {class_name!r} is not in classInd.')
      items.append((video, ids[class_name]))
    splits[split_name] = items
  return splits, class_names


def hmdb51(directory: str | os.PathLike, split: int
           ) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
  """HMDB-51 split files -> ({'train': [...], 'test': [...]}, class names)."""
  directory = Path(directory)
  files = sorted(directory.glob(f'*_test_split{split}.txt'))
  if not files:
    raise DataError(f'{directory} has no HMDB-51 split files *_test_split{split}.txt.')
  folders = [re.sub(rf'_test_split{split}\.txt$', '', f.name) for f in files]
  splits = {'train': [], 'test': []}
  for label, (folder, path) in enumerate(zip(folders, files)):
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2 or fields[1] not in ('0', '1', '2'):
        raise DataError(f'{path}:{line_number}: expected "video.avi 0|1|2", got {line!r}.')
      if fields[1] != '0':
        splits['train' if fields[1] == '1' else 'test'].append((f'{folder}/{fields[0]}', label))
  return splits, [f.replace('_', ' ') for f in folders]


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  out = Path(f.out)
  try:
    if f.format == 'kinetics':
      names = read_labels(f.labels) if f.labels else None
      items, names = kinetics(f.src, names, f.path_format)
      splits = {f.split_name: items}
    elif f.format == 'ucf101':
      splits, names = ucf101(f.src, f.split)
    else:
      splits, names = hmdb51(f.src, f.split)
  except (DataError, OSError) as e:
    sys.exit(f'error: {e}')
  out.mkdir(parents=True, exist_ok=True)
  for split, items in splits.items():
    atomic_write_text(out / f'{split}.txt', _lines(items))
  atomic_write_text(out / 'labels.csv', _labels_csv(names))
  print(f'Wrote {", ".join(f"{s}.txt ({len(i)} clips)" for s, i in splits.items())} and '
        f'labels.csv ({len(names)} classes) to {out}.')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_enum('format', None, ['kinetics', 'ucf101', 'hmdb51'], 'Annotation format.',
                    required=True)
  flags.DEFINE_string('src', None, 'Kinetics CSV, or the UCF-101 / HMDB-51 split folder.',
                      required=True)
  flags.DEFINE_string('out', None, 'Folder for the list files and labels.csv.', required=True)
  flags.DEFINE_integer('split', 1, 'UCF-101 / HMDB-51 split number (1, 2 or 3).')
  flags.DEFINE_string('split_name', 'train', 'Kinetics: the list file name (without .txt).')
  flags.DEFINE_string('labels', None, 'Kinetics: a labels CSV fixing the class ids.')
  flags.DEFINE_string('path_format', KINETICS_PATH, 'Kinetics: clip path under the root.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
