"""Config presets: `--config=configs/k400.py:B16,16,kmct` -> arch, frames, temporal, in any order."""

from __future__ import annotations

from claver_jax.models.clip import PRESET_ALIASES
from claver_jax.models.temporal import TEMPORAL_KINDS

FRAME_COUNTS = (8, 16, 32)


def parse_preset(arg: str | None, *, arch: str = 'B16', frames: int = 8,
                 temporal: str = 'kmt') -> dict[str, str | int]:
  """'B16,16,kmct' -> {'arch': 'B16', 'num_frames': 16, 'temporal': 'kmct'}; omitted parts default."""
  preset = {'arch': arch, 'num_frames': frames, 'temporal': temporal}
  for token in filter(None, (arg or '').replace(' ', '').split(',')):
    if token in PRESET_ALIASES:
      preset['arch'] = token
    elif token.isdigit() and int(token) in FRAME_COUNTS:
      preset['num_frames'] = int(token)
    elif token in TEMPORAL_KINDS:
      preset['temporal'] = token
    else:
      raise ValueError(f'Unknown preset part {token!r} in {arg!r}. Parts: an architecture '
                       f'{list(PRESET_ALIASES)}, a frame count {list(FRAME_COUNTS)}, a temporal '
                       f'head {list(TEMPORAL_KINDS)}; e.g. "B16,16,kmct".')
  return preset
