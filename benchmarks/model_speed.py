r"""claver_jax against the official PyTorch CLAVER on this machine: inference and the train step.

    python -m benchmarks.model_speed [--arch=B32|tiny] [--rounds=5] [--train_rounds=3]
        [--text_lengths=mixed|full] [--single_thread --clock=cpu]

The reference is the official model's PyTorch structure (tests/torch_claver.py: OpenAI CLIP
blocks with packed-q/k/v nn.MultiheadAttention, temporal blocks under an additive -inf KMT mask,
the text tower run in full every step), at torch's default thread count. Its random weights are
saved as an official checkpoint and read by `convert.claver_to_flax`, so both sides hold the same
weights (the printed video-embedding difference checks it). fp32, T = 8 frames, batch 2.

  inference  `encode_video` of a [2, 8, 224, 224, 3] clip batch (torch under no_grad; ours jitted).
  train      the Appendix-D step: the whole image tower frozen (as measured; the presets now
             train it, and optim.freeze_image keeps its head trainable, see claver_jax/optim.py);
             temporal parts, text tower and logit scale
             trained (the same parameter count on both sides, printed); 5 description sets x 20
             classes of texts 8 to 77 tokens long in 77-token rows, encoded in the step; soft
             cross-entropy; AdamW with the temporal parts at 10x lr. Ours is
             claver_jax.step.make_train_step, jitted with the state donated, as the train loop
             runs it: the texts cut to the longest and encoded in groups at their own length
             (the reference encodes every row at 77 tokens, as the official code does); mixup
             off on both sides. `--text_lengths=full` makes every text 77 tokens long: then
             both sides encode the same 77-token texts and the ratio is the speed of the same
             computation, without the saving from encoding texts at their own length.
  peak       a 2048^3 fp32 matmul in each framework; our ViT forward over the B·T = 16 frames
             (FLOPs from XLA's cost analysis) as a fraction of JAX's matmul rate.

Each figure is the median of interleaved runs (ours, then torch, per round) after a warm-up run.
The last three lines are the ratios `inference ours/torch speed`, `train ours/torch speed` (> 1:
ours is faster) and `vit forward / matmul peak`. Goals: >= 1.0, >= 1.15 and >= 0.8.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BATCH, FRAMES, SETS, CLASSES = 2, 8, 5, 20
ARCHS = {
    # OfficialLayoutCLAVER keyword arguments (torch_clip.OpenAICLIP's) and temporal depth.
    'B32': dict(clip=dict(embed_dim=512, image_size=224, patch=32, vision_width=768,
                          vision_layers=12, context=77, vocab=49408, text_width=512,
                          text_layers=12), temporal_layers=4),
    'tiny': dict(clip=dict(embed_dim=32, image_size=32, patch=16, vision_width=64,
                           vision_layers=1, context=77, vocab=1000, text_width=64,
                           text_layers=1), temporal_layers=1),
}


def load_average() -> str:
  return open('/proc/loadavg').read().split()[0] if Path('/proc/loadavg').exists() else '?'


def _reference_module():
  """tests/torch_claver.py, the PyTorch model the parity tests check against."""
  sys.path.insert(0, str(REPO / 'tests'))
  import torch_claver
  return torch_claver


def init_weights_(model, seed: int) -> None:
  """CLIP-like scales: LayerNorm weights ~1, biases ~0, matrices and embeddings std 0.02."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name == 'logit_scale':
        p.fill_(math.log(1 / 0.07))
      elif 'ln_' in name or 'ln_final' in name:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.02 * noise)
      else:
        p.copy_(0.02 * noise)


def random_tokens(rng: np.random.Generator, n: int, context: int, vocab: int,
                  full: bool = False) -> np.ndarray:
  """[n, context] int32: start, random ids, end-of-text (the largest id), zero padding.
  Lengths uniform in 8..context, or every text `context` tokens long if `full`."""
  tokens = np.zeros((n, context), np.int32)
  for i in range(n):
    length = context if full else int(rng.integers(8, context + 1))
    tokens[i, 0] = vocab - 2
    tokens[i, 1:length - 1] = rng.integers(1, vocab - 2, length - 2)
    tokens[i, length - 1] = vocab - 1
  return tokens


def interleaved(ours, theirs, rounds: int, clock) -> tuple[list[float], list[float]]:
  """Seconds per call of each by `clock`, alternating ours and theirs, after one warm-up call of
  each."""
  ours(), theirs()
  a, b = [], []
  for _ in range(rounds):
    for fn, times in ((ours, a), (theirs, b)):
      start = clock()
      fn()
      times.append(clock() - start)
  return a, b


def spread(times: list[float]) -> str:
  return f'{statistics.median(times):7.3f} s (min {min(times):.3f}, max {max(times):.3f})'


def ratio_line(name: str, ours: list[float], theirs: list[float]) -> str:
  """Median torch/ours, with the range of the per-round (paired) ratios."""
  paired = [t / o for o, t in zip(ours, theirs)]
  return (f'{name}: torch/ours {statistics.median(theirs) / statistics.median(ours):.2f} '
          f'(rounds {min(paired):.2f}-{max(paired):.2f})')


# --------------------------------------------------------------------------------- the two sides
def torch_train_step(model, tokens: np.ndarray, mean, std, label_smoothing: float, lr: float,
                     new_lr_multiplier: float, weight_decay: float, betas, eps: float):
  """The reference's step: frozen image tower, (temporal, text, logit scale) trained by AdamW."""
  import torch
  from claver_jax.optim import decays
  new = ('visual.temporal_embedding', 'visual.transformer_t.')
  groups = {(True, True): [], (True, False): [], (False, True): [], (False, False): []}
  for name, p in model.named_parameters():
    is_new = name.startswith(new)
    trains = is_new or not name.startswith('visual.')
    p.requires_grad_(trains)
    if trains:
      groups[(is_new, decays(name, p.ndim))].append(p)
  optimizer = torch.optim.AdamW(
      [{'params': ps, 'lr': lr * (new_lr_multiplier if is_new else 1.0),
        'weight_decay': weight_decay if decay else 0.0}
       for (is_new, decay), ps in groups.items() if ps], betas=betas, eps=eps)
  text = torch.from_numpy(tokens).long()                              # [A, C, S]
  mean = torch.tensor(mean).view(1, 1, 3, 1, 1)
  std = torch.tensor(std).view(1, 1, 3, 1, 1)

  def step(video_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    video = (video_uint8.permute(0, 1, 4, 2, 3).float() / 255.0 - mean) / std
    targets = torch.nn.functional.one_hot(labels, CLASSES).float()
    targets = targets * (1 - label_smoothing) + label_smoothing / CLASSES
    sets = text[torch.randperm(text.shape[0])[:SETS]]
    v = model.encode_video(video)                                     # [B, E]
    t = model.encode_text(sets.flatten(0, 1))
    t = (t / t.norm(dim=-1, keepdim=True)).view(SETS, CLASSES, -1)
    logits = model.logit_scale.exp() * torch.einsum('be,kce->kbc', v, t)
    loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  trainable = sum(p.numel() for ps in groups.values() for p in ps)
  return step, trainable


def torch_vit_tokens(visual, images):
  """The reference ViT's tokens before `ln_post`, as OfficialLayoutCLAVER.encode_video computes
  them."""
  x = visual.conv1(images).flatten(2).transpose(1, 2)
  x = torch_cat_class(visual, x)
  return visual.transformer(visual.ln_pre(x + visual.positional_embedding).transpose(0, 1))


def torch_cat_class(visual, patches):
  import torch
  return torch.cat([visual.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)


def train_config(image_size: int):
  """The run config of the paper's step (the train step reads train, data, text, optim, seed)."""
  from claver_jax.run_config import base_config
  config = base_config()
  config.data.num_frames = FRAMES
  config.data.image_size = image_size
  config.train.batch_size = BATCH
  config.train.mixup_alpha = config.train.cutmix_alpha = 0.0
  config.text.sets_per_step = SETS
  config.optim.freeze_image = True
  return config


def whole_image_tower(group_of):
  """The family's groups with the ViT's head in the image group: freeze_image freezes all of it,
  as this benchmark's reference does."""
  return lambda path: 'image' if group_of(path) == 'image_head' else group_of(path)


def main(argv: list[str]) -> None:
  from absl import flags
  from absl import logging as absl_logging
  del argv
  f = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.WARNING)
  if f.single_thread:  # Before JAX and torch size their thread pools.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from claver_jax import optim, sharding
  from claver_jax.models import families, load
  from claver_jax.models.clip import needed_context, pool_index
  from claver_jax.step import make_train_step
  from convert.claver_to_flax import convert

  if f.single_thread:
    torch.set_num_threads(1)
  clock = time.process_time if f.clock == 'cpu' else time.perf_counter
  torch_claver = _reference_module()
  spec = ARCHS[f.arch]
  c = spec['clip']
  torch.manual_seed(0)
  reference = torch_claver.OfficialLayoutCLAVER(
      num_frames=FRAMES, temporal_layers=spec['temporal_layers'], mask='kmt', **c)
  init_weights_(reference, seed=0)
  reference.eval()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = Path(tmp) / 'claver.pth'
    torch.save({'model': reference.state_dict()}, checkpoint)
    convert(checkpoint, Path(tmp) / 'model')
    model = load(Path(tmp) / 'model')
  print(f'arch {f.arch}: ViT {c["vision_width"]}x{c["vision_layers"]} patch {c["patch"]} at '
        f'{c["image_size"]} px, text {c["text_width"]}x{c["text_layers"]}, KMT '
        f'{model.cfg.temporal_depth} layers; fp32, B={BATCH}, T={FRAMES}.')
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}, XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}), torch {torch.__version__} with '
        f'{torch.get_num_threads()} threads; {len(os.sched_getaffinity(0))} CPUs; {f.clock} clock; '
        f'load average {load_average()}.')

  rng = np.random.default_rng(0)
  size = c['image_size']
  video_uint8 = rng.integers(0, 256, (BATCH, FRAMES, size, size, 3), dtype=np.uint8)
  video = ((video_uint8 / 255.0 - 0.45) / 0.27).astype(np.float32)
  video_torch = torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous()
  video_jax = jnp.asarray(video)

  # ------------------------------------------------------------------------------- inference
  graphdef, params = nnx.split(model)
  encode_video = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode_video(v))
  with torch.no_grad():
    expected = reference.encode_video(video_torch).numpy()
  diff = np.abs(np.asarray(encode_video(params, video_jax)) - expected).max()
  print(f'same weights: max |video embedding ours - torch| = {diff:.1e}')
  with torch.no_grad():
    inf_ours, inf_torch = interleaved(lambda: encode_video(params, video_jax).block_until_ready(),
                                      lambda: reference.encode_video(video_torch), f.rounds, clock)
  print(f'inference (encode_video), ours:  {spread(inf_ours)}')
  print(f'inference (encode_video), torch: {spread(inf_torch)}')

  # ------------------------------------------------------------------------------- peak
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  at = torch.randn(n, n)
  mm_ours, mm_torch = interleaved(lambda: matmul(a).block_until_ready(), lambda: at @ at,
                                  f.rounds, clock)
  frames = video_jax.reshape(BATCH * FRAMES, size, size, 3)
  frames_torch = video_torch.flatten(0, 1)
  visual_def, visual_params = nnx.split(model.clip.visual)
  vit = jax.jit(lambda s, x: nnx.merge(visual_def, s).encode_tokens(x))
  cost = vit.lower(visual_params, frames).compile().cost_analysis()
  vit_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  with torch.no_grad():
    vit_ours, vit_torch = interleaved(lambda: vit(visual_params, frames).block_until_ready(),
                                      lambda: torch_vit_tokens(reference.visual, frames_torch),
                                      f.rounds, clock)
  rate = lambda flops, times: flops / statistics.median(times) / 1e9
  print(f'matmul {n}^3 fp32: ours {rate(2 * n ** 3, mm_ours):.0f} GFLOP/s, '
        f'torch {rate(2 * n ** 3, mm_torch):.0f} GFLOP/s')
  print(f'ViT forward, {BATCH * FRAMES} frames ({vit_flops / 1e9:.1f} GFLOP), ours:  '
        f'{spread(vit_ours)} = {rate(vit_flops, vit_ours):.0f} GFLOP/s')
  print(f'ViT forward, {BATCH * FRAMES} frames ({vit_flops / 1e9:.1f} GFLOP), torch: '
        f'{spread(vit_torch)} = {rate(vit_flops, vit_torch):.0f} GFLOP/s')
  temporal = lambda inference, vit: statistics.median(inference) - statistics.median(vit)
  print(f'temporal part (encode_video - ViT forward): ours {temporal(inf_ours, vit_ours):.3f} s, '
        f'torch {temporal(inf_torch, vit_torch):.3f} s')

  # ------------------------------------------------------------------------------- train step
  # Last: the step donates the model's arrays.
  config = train_config(size)
  tokens = random_tokens(rng, SETS * CLASSES, c['context'], c['vocab'],
                         full=f.text_lengths == 'full').reshape(SETS, CLASSES, -1)
  labels = rng.integers(0, CLASSES, (BATCH,)).astype(np.int32)
  oc = config.optim
  group_of = whole_image_tower(families.of(model).group_of)
  tx, _ = optim.make_optimizer(oc, group_of, total_steps=1000, steps_per_epoch=100)
  wrt = optim.trainable_filter(oc, group_of)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  ours_trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
  step_graphdef, state = nnx.split((model, optimizer))
  # As the train loop gives them: cut to the longest text, with each text's length.
  cut = tokens[..., :needed_context(tokens, model.cfg.clip)]
  lengths = pool_index(tokens, model.cfg.clip) + 1
  print(f'texts ({f.text_lengths}): {lengths.size} of {lengths.min()}-{lengths.max()} tokens '
        f'(mean {lengths.mean():.1f}); ours cut to {cut.shape[-1]} and grouped by length, '
        f'torch at {tokens.shape[-1]}.')
  train_step = jax.jit(make_train_step(step_graphdef, config, sharding.make_mesh(config.mesh),
                                       lengths, text_frozen=False,
                                       group_of=group_of),
                       donate_argnums=(0,))
  # Committed to the device, as the train loop's sharded arrays are: uncommitted inputs to the
  # first call and committed outputs into the next would compile the step twice.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, batch, text = jax.device_put(
      (state, {'video': video_uint8, 'label': labels}, cut), device)
  step_number = 0

  def ours_train():
    nonlocal state, step_number
    step_number += 1
    state, out = train_step(state, batch, text,
                            jax.device_put(np.int32(step_number), device))
    jax.block_until_ready((state, out))

  reference.train()
  torch_step, theirs_trainable = torch_train_step(
      reference, tokens, tuple(config.data.mean), tuple(config.data.std),
      config.train.label_smoothing, oc.lr, oc.new_lr_multiplier, oc.weight_decay,
      (oc.b1, oc.b2), oc.eps)
  print(f'trainable parameters: ours {ours_trainable:,}, torch {theirs_trainable:,}')
  if ours_trainable != theirs_trainable:
    raise SystemExit('The two sides train different parameter sets; the comparison is void.')
  labels_torch, video_uint8_torch = torch.from_numpy(labels).long(), torch.from_numpy(video_uint8)
  train_ours, train_torch = interleaved(ours_train,
                                        lambda: torch_step(video_uint8_torch, labels_torch),
                                        f.train_rounds, clock)
  print(f'train step, ours:  {spread(train_ours)}')
  print(f'train step, torch: {spread(train_torch)}')

  print(ratio_line('inference', inf_ours, inf_torch))
  print(ratio_line('train', train_ours, train_torch))
  print(f'load average at the end {load_average()}.')
  print(f'inference ours/torch speed: {statistics.median(inf_torch) / statistics.median(inf_ours):.2f}')
  print(f'train ours/torch speed: {statistics.median(train_torch) / statistics.median(train_ours):.2f}')
  print(f'vit forward / matmul peak: {rate(vit_flops, vit_ours) / rate(2 * n ** 3, mm_ours):.2f}')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_enum('arch', 'B32', list(ARCHS), 'B32 (the issue\'s), or tiny for a quick check.')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds of inference, the ViT and the matmul.')
  flags.DEFINE_integer('train_rounds', 3, 'Timed rounds of the train step.')
  flags.DEFINE_bool('single_thread', False, 'Pin the process to one CPU and torch to one thread '
                    '(both frameworks then do the same work on one core).')
  flags.DEFINE_enum('clock', 'wall', ['wall', 'cpu'], "'cpu': process CPU time, which on a "
                    'shared machine counts the work done rather than the share of the CPUs '
                    'obtained; meaningful with --single_thread.')
  flags.DEFINE_enum('text_lengths', 'mixed', ['mixed', 'full'], "The train step's texts: "
                    "'mixed', 8 to 77 tokens long (ours encodes each at its own length, the "
                    "reference at 77); 'full', every text 77 tokens long, so both sides do the "
                    'same text work and the ratio is the speed of the same computation.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
