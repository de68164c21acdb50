"""Config presets: `--config=configs/k400.py:B16,16,kmct` -> arch, frames, temporal (and model
family), in any order."""

from __future__ import annotations

from claver_jax.models.clip import PRESET_ALIASES
from claver_jax.models.families import FAMILIES
from claver_jax.models.temporal import TEMPORAL_KINDS

FRAME_COUNTS = (8, 16, 32)


def parse_preset(arg: str | None, *, arch: str = 'B16', frames: int = 8,
                 temporal: str = 'kmt') -> dict[str, str | int]:
  """'B16,16,kmct' -> {'name': 'claver', 'arch': 'B16', 'num_frames': 16, 'temporal': 'kmct'};
  'xclip' picks X-CLIP (whose temporal parts are its own: no temporal head with it). Omitted
  parts default."""
  preset = {'name': 'claver', 'arch': arch, 'num_frames': frames, 'temporal': temporal}
  temporal_given = False
  for token in filter(None, (arg or '').replace(' ', '').split(',')):
    if token in PRESET_ALIASES:
      preset['arch'] = token
    elif token.isdigit() and int(token) in FRAME_COUNTS:
      preset['num_frames'] = int(token)
    elif token in TEMPORAL_KINDS:
      preset['temporal'], temporal_given = token, True
    elif token in FAMILIES:
      preset['name'] = token
    else:
      raise ValueError(f'Unknown preset part {token!r} in {arg!r}. Parts: an architecture '
                       f'{list(PRESET_ALIASES)}, a frame count {list(FRAME_COUNTS)}, a temporal '
                       f'head {list(TEMPORAL_KINDS)}, a model family {list(FAMILIES)}; e.g. '
                       '"B16,16,kmct" or "B16,8,xclip".')
  if temporal_given and preset['name'] != 'claver':
    raise ValueError(f'{arg!r}: a temporal head ({preset["temporal"]}) is a CLAVER part; '
                     f'{preset["name"]} has its own.')
  return preset
