"""PyTorch references for X-CLIP: a small random transformers XCLIPModel, its outputs, and its
weights renamed into the official checkpoint's key layout (microsoft/VideoX X-CLIP/models).

The renaming is written here from the official module names, independently of the converter, so
that the tests do not check the converter against itself. Head counts follow the official rule
(width // 64) so that both layouts describe the same model.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import XCLIPConfig, XCLIPModel

import torch_clip

FRAMES = 3
EMBED = 128     # 2 heads in the MIT and the prompt generator by the official width // 64.


def tiny_hf_xclip(seed: int = 0, *, text: dict | None = None, vision: dict | None = None,
                  **fields) -> XCLIPModel:
  """Every parameter random (biases, LayerNorms, alpha, logit scale included). text, vision and
  fields override the text_config, vision_config and top-level XCLIPConfig fields."""
  config = XCLIPConfig(
      text_config={**dict(vocab_size=torch_clip.VOCAB, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=torch_clip.CONTEXT), **(text or {})},
      vision_config={**dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, image_size=torch_clip.IMAGE,
                            patch_size=torch_clip.PATCH, num_frames=FRAMES, mit_hidden_size=EMBED,
                            mit_intermediate_size=4 * EMBED, mit_num_hidden_layers=1,
                            mit_num_attention_heads=EMBED // 64), **(vision or {})},
      **{'projection_dim': EMBED, 'prompt_layers': 2, 'prompt_num_attention_heads': EMBED // 64,
         **fields})
  torch.manual_seed(seed)
  return torch_clip.randomize_(XCLIPModel(config), seed)


def random_video(seed: int = 0, batch: int = 2) -> np.ndarray:
  """float32 [B, T, H, W, 3], channels last."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, FRAMES, torch_clip.IMAGE, torch_clip.IMAGE, 3)).astype(
      np.float32)


@torch.no_grad()
def hf_outputs(model: XCLIPModel, video: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  pixels = torch.from_numpy(video).permute(0, 1, 4, 2, 3)
  ids = torch.from_numpy(tokens).long()
  return {'video': model.get_video_features(pixel_values=pixels).pooler_output.numpy(),
          'logits': model(input_ids=ids, pixel_values=pixels).logits_per_video.numpy()}


def hf_to_official_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """An HF XCLIPModel state dict in the official checkpoint's key layout."""
  clip_part = {k.replace('vision_model.pre_layernorm', 'vision_model.pre_layrnorm'): v
               for k, v in hf.items()}
  out = torch_clip.hf_to_openai_state_dict(clip_part)       # visual.*, transformer.*, ...

  def packed(prefix: str, dst: str) -> None:                 # nn.MultiheadAttention
    for kind in ('weight', 'bias'):
      out[f'{dst}.in_proj_{kind}'] = torch.cat([hf[f'{prefix}.{x}_proj.{kind}'] for x in 'qkv'])
      out[f'{dst}.out_proj.{kind}'] = hf[f'{prefix}.out_proj.{kind}']

  def same(src: str, dst: str) -> None:
    for kind in ('weight', 'bias'):
      if f'{src}.{kind}' in hf:
        out[f'{dst}.{kind}'] = hf[f'{src}.{kind}']

  layers = {int(k.split('.')[3]) for k in hf if k.startswith('vision_model.encoder.layers.')}
  for i in layers:
    s, d = f'vision_model.encoder.layers.{i}', f'visual.transformer.resblocks.{i}'
    same(f'{s}.message_fc', f'{d}.message_fc')
    same(f'{s}.message_ln', f'{d}.message_ln')
    packed(f'{s}.message_attn', f'{d}.message_attn')
  out['mit.positional_embedding'] = hf['mit.position_embedding']
  mit_layers = {int(k.split('.')[3]) for k in hf if k.startswith('mit.encoder.layers.')}
  for i in mit_layers:
    s, d = f'mit.encoder.layers.{i}', f'mit.resblocks.{i}'
    packed(f'{s}.self_attn', f'{d}.attn')
    for hf_name, name in (('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'), ('mlp.fc1', 'mlp.c_fc'),
                          ('mlp.fc2', 'mlp.c_proj')):
      same(f'{s}.{hf_name}', f'{d}.{name}')
  for k, v in hf.items():     # The prompt generator: the same names, but for its input norm.
    if k.startswith('prompts_generator.'):
      out[k.replace('prompts_generator.layernorm', 'prompts_generator.norm')] = v
  same('prompts_visual_layernorm', 'prompts_visual_ln')
  out['prompts_visual_proj'] = hf['prompts_visual_projection']
  return {k: v.detach().clone().contiguous() for k, v in out.items()}
