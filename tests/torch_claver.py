"""A PyTorch CLAVER written from the paper's and the issue's description of the official model:
OpenAI's CLIP (torch_clip.OpenAICLIP) plus `visual.temporal_embedding` [1, T, W] and
`visual.transformer_t.resblocks.{i}.temporal_*` blocks with packed-q/k/v nn.MultiheadAttention.
The Kronecker masks here are built with loops from their definitions, not with kron, once per
(kind, T, L): the official code builds its mask once, so the speed benchmark
(benchmarks/model_speed.py) times the model, not the mask.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn

import torch_clip


def loop_mask(kind: str, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
  """bool [T·L, T·L], True = may attend, from the definitions token by token."""
  n = num_frames * tokens_per_frame
  allowed = torch.zeros(n, n, dtype=torch.bool)
  for i in range(n):
    for j in range(n):
      ti, tj = divmod(i, tokens_per_frame)[0], divmod(j, tokens_per_frame)[0]
      li, lj = i % tokens_per_frame, j % tokens_per_frame
      allowed[i, j] = {
          'kmt': i == j or ti != tj,
          'kmct': i == j or tj < ti,
          'spatial': ti == tj,
          'joint': True,
          'pipeline': li == lj,
      }[kind]
  return allowed


@functools.lru_cache(maxsize=None)
def additive_mask(kind: str, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
  """float [T·L, T·L]: 0 where `loop_mask` allows, -inf elsewhere (nn.MultiheadAttention's form)."""
  allowed = loop_mask(kind, num_frames, tokens_per_frame)
  return torch.zeros(allowed.shape).masked_fill(~allowed, float('-inf'))


class TemporalBlock(nn.Module):

  def __init__(self, width: int):
    super().__init__()
    self.temporal_attn = nn.MultiheadAttention(width, width // 64)
    self.temporal_ln_1 = nn.LayerNorm(width)
    self.temporal_mlp = nn.Sequential(OrderedDict([('c_fc', nn.Linear(width, 4 * width)),
                                                   ('gelu', torch_clip.QuickGELU()),
                                                   ('c_proj', nn.Linear(4 * width, width))]))
    self.temporal_ln_2 = nn.LayerNorm(width)

  def forward(self, x, attn_mask):  # [S, B, D]; attn_mask float [S, S], -inf where forbidden.
    y = self.temporal_ln_1(x)
    x = x + self.temporal_attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
    return x + self.temporal_mlp(self.temporal_ln_2(x))


class TemporalTransformer(nn.Module):

  def __init__(self, width: int, layers: int):
    super().__init__()
    self.resblocks = nn.ModuleList([TemporalBlock(width) for _ in range(layers)])


class OfficialLayoutCLAVER(torch_clip.OpenAICLIP):
  """Our reconstruction of the official CLAVER (not its code): its state dict has the official
  checkpoint's keys."""

  def __init__(self, num_frames: int, temporal_layers: int, mask: str = 'kmt', **clip_kwargs):
    super().__init__(**clip_kwargs)
    width = self.visual.conv1.out_channels
    self.num_frames, self.mask = num_frames, mask
    self.visual.temporal_embedding = nn.Parameter(torch.zeros(1, num_frames, width))
    self.visual.transformer_t = TemporalTransformer(width, temporal_layers)

  def encode_video(self, video):  # [B, T, 3, H, W]
    v = self.visual
    b, t = video.shape[:2]
    x = v.conv1(video.flatten(0, 1)).flatten(2).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = v.ln_pre(x + v.positional_embedding)
    x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)          # [B*T, L, D], before ln_post
    l, d = x.shape[1:]
    x = x.reshape(b, t, l, d) + v.temporal_embedding[:, :, None, :]   # to every token of a frame
    x = x.reshape(b, t * l, d).permute(1, 0, 2)                      # frame-major: t*L + l
    attn_mask = additive_mask(self.mask, t, l)
    for block in v.transformer_t.resblocks:
      x = block(x, attn_mask)
    cls = x.permute(1, 0, 2).reshape(b, t, l, d)[:, :, 0]
    frames = v.ln_post(cls) @ v.proj
    frames = frames / frames.norm(dim=-1, keepdim=True)
    return frames.mean(dim=1)                                        # not re-normalised

  def video_logits(self, video, text):
    t = self.encode_text(text)
    return self.logit_scale.exp() * self.encode_video(video) @ (t / t.norm(dim=-1, keepdim=True)).t()
