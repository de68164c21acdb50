"""The configs as `--config=configs/NAME.py:ARG` loads them."""

from __future__ import annotations

from claver_jax.cli import _load_config
from conftest import REPO


def load_config(name: str, arg: str | None = None):
  """configs/NAME.py's get_config(ARG)."""
  return _load_config(f'{REPO / "configs" / name}.py' + (f':{arg}' if arg else ''))
