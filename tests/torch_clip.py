"""PyTorch references for the parity tests: small random CLIPs in HF and OpenAI layouts.

`OpenAICLIP` follows the structure of OpenAI's `clip/model.py` (ViT only), so its state dict has
OpenAI's keys and a traced copy is a TorchScript archive like the ones OpenAI distributes.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

# A tiny CLIP: widths are multiples of 64 so OpenAI's heads = width // 64 rule holds.
VOCAB, SOT, EOT, CONTEXT = 1000, 998, 999, 16
IMAGE, PATCH = 32, 8


def tiny_hf_config(eos_token_id: int = EOT) -> CLIPConfig:
  return CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CONTEXT,
                       eos_token_id=eos_token_id, bos_token_id=SOT, pad_token_id=0),
      vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, image_size=IMAGE, patch_size=PATCH),
      projection_dim=64)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Every parameter random, LayerNorms and biases included, at scales that keep outputs O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name == 'logit_scale':
        p.copy_(torch.tensor(2.5) + 0.1 * noise)
      elif any(s in name for s in ('layer_norm', 'layernorm', 'layrnorm', 'ln_', '_ln.', 'norm1',
                                   'norm3')):
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def tiny_hf_clip(seed: int = 0, eos_token_id: int = EOT) -> CLIPModel:
  torch.manual_seed(seed)
  return randomize_(CLIPModel(tiny_hf_config(eos_token_id)), seed)


def random_inputs(seed: int = 0, n_images: int = 3, n_texts: int = 4):
  """-> images float32 [N, H, W, 3] (channels last), tokens int32 [N, CONTEXT] in CLIP's shape."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n_images, IMAGE, IMAGE, 3)).astype(np.float32)
  tokens = np.zeros((n_texts, CONTEXT), np.int32)
  for i in range(n_texts):
    length = int(rng.integers(3, CONTEXT + 1))
    tokens[i, 0] = SOT
    tokens[i, 1:length - 1] = rng.integers(1, SOT, length - 2)
    tokens[i, length - 1] = EOT
  return images, tokens


@torch.no_grad()
def hf_outputs(model: CLIPModel, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
  ids = torch.from_numpy(tokens).long()
  return {
      'image': model.get_image_features(pixel_values=pixels).pooler_output.numpy(),
      'text': model.get_text_features(input_ids=ids).pooler_output.numpy(),
      'logits': model(input_ids=ids, pixel_values=pixels).logits_per_image.numpy(),
  }


# ------------------------------------------------------------------ OpenAI layout
class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):

  def __init__(self, width: int, heads: int, mlp_dim: int, attn_mask: torch.Tensor | None = None):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict([('c_fc', nn.Linear(width, mlp_dim)),
                                          ('gelu', QuickGELU()),
                                          ('c_proj', nn.Linear(mlp_dim, width))]))
    self.ln_2 = nn.LayerNorm(width)
    self.attn_mask = attn_mask  # An attribute, not a buffer, as in OpenAI's code.

  def forward(self, x):  # [S, B, D], sequence first.
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, width, layers, heads, mlp_dim, attn_mask=None):
    super().__init__()
    self.resblocks = nn.Sequential(
        *[ResidualAttentionBlock(width, heads, mlp_dim, attn_mask) for _ in range(layers)])

  def forward(self, x):
    return self.resblocks(x)


class VisionTransformer(nn.Module):

  def __init__(self, image_size, patch, width, layers, heads, mlp_dim, embed_dim):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(width))
    self.positional_embedding = nn.Parameter(torch.zeros((image_size // patch) ** 2 + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, mlp_dim)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.zeros(width, embed_dim))

  def forward(self, x):  # [B, 3, H, W]
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):

  def __init__(self, embed_dim=64, image_size=IMAGE, patch=PATCH, vision_width=128,
               vision_layers=2, context=CONTEXT, vocab=VOCAB, text_width=128, text_layers=2):
    super().__init__()
    self.visual = VisionTransformer(image_size, patch, vision_width, vision_layers,
                                    vision_width // 64, 4 * vision_width, embed_dim)
    causal = torch.full((context, context), float('-inf')).triu(1)
    self.transformer = Transformer(text_width, text_layers, text_width // 64, 4 * text_width,
                                   causal)
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(torch.zeros(context, text_width))
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.zeros(text_width, embed_dim))
    self.logit_scale = nn.Parameter(torch.zeros(()))

  def encode_image(self, image):
    return self.visual(image)

  def encode_text(self, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

  def forward(self, image, text):
    i = self.encode_image(image)
    t = self.encode_text(text)
    i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return self.logit_scale.exp() * i @ t.t()


def hf_to_openai_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Renames an HF CLIPModel state dict into OpenAI's layout (written here, independently of
  the converter, so the tests do not check the converter against itself)."""
  out = {}
  towers = {'vision_model.encoder.layers.': 'visual.transformer.resblocks.',
            'text_model.encoder.layers.': 'transformer.resblocks.'}
  singles = {
      'vision_model.embeddings.class_embedding': 'visual.class_embedding',
      'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
      'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
      'vision_model.pre_layrnorm.weight': 'visual.ln_pre.weight',
      'vision_model.pre_layrnorm.bias': 'visual.ln_pre.bias',
      'vision_model.post_layernorm.weight': 'visual.ln_post.weight',
      'vision_model.post_layernorm.bias': 'visual.ln_post.bias',
      'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
      'text_model.embeddings.position_embedding.weight': 'positional_embedding',
      'text_model.final_layer_norm.weight': 'ln_final.weight',
      'text_model.final_layer_norm.bias': 'ln_final.bias',
      'logit_scale': 'logit_scale',
  }
  for k, v in hf.items():
    if k in singles:
      out[singles[k]] = v
    elif k == 'visual_projection.weight':
      out['visual.proj'] = v.t()
    elif k == 'text_projection.weight':
      out['text_projection'] = v.t()
  for src, dst in towers.items():
    layers = {int(k[len(src):].split('.')[0]) for k in hf if k.startswith(src)}
    for i in layers:
      s, d = f'{src}{i}.', f'{dst}{i}.'
      for kind in ('weight', 'bias'):
        out[f'{d}attn.in_proj_{kind}'] = torch.cat(
            [hf[f'{s}self_attn.{x}_proj.{kind}'] for x in 'qkv'])
        out[f'{d}attn.out_proj.{kind}'] = hf[f'{s}self_attn.out_proj.{kind}']
        out[f'{d}ln_1.{kind}'] = hf[f'{s}layer_norm1.{kind}']
        out[f'{d}ln_2.{kind}'] = hf[f'{s}layer_norm2.{kind}']
        out[f'{d}mlp.c_fc.{kind}'] = hf[f'{s}mlp.fc1.{kind}']
        out[f'{d}mlp.c_proj.{kind}'] = hf[f'{s}mlp.fc2.{kind}']
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


@torch.no_grad()
def openai_outputs(model: OpenAICLIP, images: np.ndarray, tokens: np.ndarray):
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
  ids = torch.from_numpy(tokens).long()
  return {'image': model.encode_image(pixels).numpy(), 'text': model.encode_text(ids).numpy(),
          'logits': model(pixels, ids).numpy()}
