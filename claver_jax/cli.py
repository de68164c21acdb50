"""Command-line helpers: flag parsing whose errors are one line, for main and zeroshot.

    app.run(main, flags_parser=cli.parse_flags)

A misspelt config key (`--config.model.temporall=kmt`) names the key and its closest match, a
key that moved (`--config.model.xclip_mit_layers`) its new place, a bad value names the flag and
the value; each exits 2 with one line on stderr.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path
from typing import NoReturn

from absl import flags

USAGE_ERROR = 2


def fail(message: str) -> NoReturn:
  """Prints `error: message` (its first line) on stderr and exits 2."""
  print(f'error: {message.strip().splitlines()[0]}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser with one-line errors (see the module docstring)."""
  missing = [a for a in argv if a.startswith('--config=')
             and not Path(a.split('=', 1)[1].partition(':')[0]).is_file()]
  if missing:                   # ml_collections would only fail later, at first use.
    fail(f'{missing[-1]}: no such config file.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(config_file_error(argv) or str(e))
  except (AttributeError, KeyError) as e:      # ml_collections: an override of no such key.
    fail(unknown_key(argv) or str(e).strip("'\""))


def _load_config(spec: str):
  """`--config=FILE.py[:ARG]` -> get_config(ARG), as config_flags loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_file_error(argv: list[str], flag: str = 'config') -> str | None:
  """Why `--config=FILE.py[:ARG]` of argv cannot be loaded, in one line (ml_collections' own
  message puts the cause on the last line of a traceback); None when it loads."""
  specs = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')]
  if not specs:
    return None
  try:
    _load_config(specs[-1])
  except Exception as e:  # noqa: BLE001 (a config file may raise anything)
    cause = (str(e).strip().splitlines() or [''])[0]
    kind = '' if isinstance(e, ValueError) and cause else f'{type(e).__name__}: '
    return f'--{flag}={specs[-1]}: {kind}{cause}'
  return None


def _moved_key(node, part: str) -> list[str] | None:
  """[sub, key] when `part` is a flat key of earlier versions, 'sub_key', whose key is now in
  the sub-dict node.sub (model.xclip_mit_layers -> model.xclip.mit_layers); else None."""
  import ml_collections
  if part in node:
    return None
  for cut in (m.start() for m in re.finditer('_', part)):
    sub, key = part[:cut], part[cut + 1:]
    if isinstance(node.get(sub), ml_collections.ConfigDict) and key in node[sub]:
      return [sub, key]
  return None


def unknown_key(argv: list[str], flag: str = 'config') -> str | None:
  """The first `--config.a.b=...` of argv whose key the config lacks: which part is unknown and
  the closest known key; None when every key exists (or the config cannot be loaded)."""
  import ml_collections
  specs = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')]
  spec = specs[-1] if specs else None                  # absl takes the last one given
  if spec is None:
    return None
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 (then absl's own message is shown)
    return None
  for arg in argv:
    match = re.match(rf'^--?{flag}\.([^=]+)', arg)
    if not match:
      continue
    node, parents = config, [flag]
    for part in match.group(1).split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      moved = _moved_key(node, part)
      if moved:
        return (f'--{flag}.{match.group(1)}: {".".join(parents + [part])} is now '
                f'{".".join(parents + moved)} (each model family\'s keys are in its own '
                'sub-dict).')
      if part not in node:
        swapped = [k for k in node.keys() if sorted(k) == sorted(part)]  # transposed letters
        close = swapped[:1] or difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f"; did you mean {'.'.join(parents + close)!r}?" if close else '.'
        return (f'--{flag}.{match.group(1)}: {".".join(parents)} has no key {part!r}{hint} '
                f'Its keys: {", ".join(sorted(node.keys()))}.')
      node, parents = node[part], parents + [part]
  return None
