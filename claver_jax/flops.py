r"""Per-view FLOPs of the video encoder, from XLA's cost analysis of the lowered program.

    python -m claver_jax.flops --config=configs/k400.py:B16,16
    python -m claver_jax.flops --table        # the README's table of the paper's variants

Shapes only: the model is built with `nnx.eval_shape` and the encoder is lowered, never run.
XLA counts a multiply-add as 2 FLOPs; GMACs below are half the GFLOPs. One view is one clip of T
frames at the config's image size through the ViT and the temporal head (no text tower).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from claver_jax.models.claver import CLAVER, CLAVERConfig, config_from

# The paper's reported per-view GFLOPs (its Table of Kinetics-400 results).
PAPER_VARIANTS = [('B32', 8, 33), ('B32', 16, 64), ('B16', 8, 122), ('B16', 16, 241),
                  ('L14', 8, 558)]


def video_flops(cfg: CLAVERConfig) -> float:
  """FLOPs of `encode_video` on one clip, from the lowered (not compiled) program.

  The temporal attention is counted dense, whatever `cfg.attention` says: XLA's cost analysis
  counts the body of a loop once, not once per trip, so it cannot count the chunked kernel."""
  cfg = dataclasses.replace(cfg, attention='dense')
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CLAVER(cfg, rngs=nnx.Rngs(0))))
  size = cfg.clip.image_size
  video = jax.ShapeDtypeStruct((1, cfg.num_frames, size, size, 3), jnp.float32)
  lowered = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode_video(v)).lower(state, video)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def report(cfg: CLAVERConfig) -> dict[str, float]:
  """GFLOPs of the whole view, of the ViT over its frames, and of the temporal head."""
  total = video_flops(cfg)
  vit = total if cfg.temporal == 'mean' else video_flops(
      dataclasses.replace(cfg, temporal='mean', temporal_layers=None))
  return {'total': total / 1e9, 'vit': vit / 1e9, 'temporal': (total - vit) / 1e9}


def paper_table() -> str:
  from claver_jax.models.clip import get_preset
  lines = ['| variant | ours: GFLOPs (XLA, 2 per MAC) | ours: GMACs | ViT share | paper |',
           '|---|---|---|---|---|']
  for arch, frames, paper in PAPER_VARIANTS:
    r = report(CLAVERConfig(clip=get_preset(arch), num_frames=frames))
    lines.append(f'| {arch}-{frames}f KMT | {r["total"]:.0f} | {r["total"] / 2:.0f} | '
                 f'{r["vit"] / r["total"]:.0%} | {paper} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  if f.table:
    print(paper_table())
    return
  if f.config is None:
    raise SystemExit('error: pass --config=configs/k400.py[:PRESET] or --table.')
  cfg = config_from(f.config)
  r = report(cfg)
  print(f'{f.config.model.arch}, {cfg.num_frames} frames at {cfg.clip.image_size} px, '
        f'temporal {cfg.temporal} ({cfg.temporal_depth} layers)')
  print(f'per view: {r["total"]:.1f} GFLOPs = {r["total"] / 2:.1f} GMACs '
        f'(ViT over {cfg.num_frames} frames {r["vit"]:.1f}, temporal head {r["temporal"]:.1f})')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'A run config, e.g. configs/k400.py:B16,16.')
  flags.DEFINE_bool('table', False, "Print the README's table of the paper's variants.")
  app.run(main)
