"""Versions of optional dependencies that the code relies on for safety, checked where used."""

from __future__ import annotations

import re

MIN_TORCH = (2, 6)


def require_torch(purpose: str, error: type[Exception] = ImportError):
  """torch, if installed at >= 2.6; else `error` saying why and what to do. Older versions'
  `torch.load(weights_only=True)` can be made to run code (CVE-2025-32434)."""
  try:
    import torch
  except ImportError as e:
    raise error(f'{purpose} needs PyTorch: `pip install torch==2.13.0` (the CPU build is '
                'enough).') from e
  found = tuple(int(p) for p in re.findall(r'\d+', torch.__version__)[:2])
  if found < MIN_TORCH:
    raise error(f'{purpose} needs torch >= {".".join(map(str, MIN_TORCH))}, found '
                f'{torch.__version__}, whose weights_only loading can be made to run code '
                '(CVE-2025-32434): `pip install torch==2.13.0`.')
  return torch
