"""The optimizer: parameter groups, frozen towers, weight-decay masks and the schedule.

Groups, by parameter path; the model's family says which paths are which
(`claver_jax.models.families`: CLAVER's new parts are temporal.*, X-CLIP's its messages, MIT and
prompt generator):
  image       the image tower             frozen when `freeze_image`
  image_head  CLAVER's ViT output head and class token (ln_post, proj, class_embedding): part of
              the image tower, but trained even when `freeze_image`, as the official `fix_image`
  text        the text tower              frozen when `freeze_text`; else learning rate x
                                          `text_lr_multiplier` (1)
  new         the family's new parts      learning rate x `new_lr_multiplier` (10 in both papers)
  base        everything else (CLAVER's logit_scale)
Weight decay as the official CLAVER and X-CLIP code (`set_weight_decay`): every trainable
parameter decays except 1-D ones (LayerNorm, biases, the class embedding, X-CLIP's alpha), biases
and positional embeddings (their `no_weight_decay_keywords`). So the temporal embedding and the
0-D logit scale decay.

The schedule is the official one, timm's CosineLRScheduler as both codes configure it
(`learning_rate_schedule`).

Frozen parameters are not differentiated at all (`trainable_filter` goes to `nnx.grad` and
`nnx.Optimizer(wrt=...)`), so a frozen image tower costs no backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from claver_jax.param_paths import path_str

NO_DECAY_KEYWORDS = ('positional_embedding',)    # The official no_weight_decay_keywords().


def default_config() -> ml_collections.ConfigDict:
  """The paper's AdamW settings for full supervision (few-shot uses lr=2e-6)."""
  c = ml_collections.ConfigDict()
  c.lr = 12e-6
  c.b1, c.b2, c.eps = 0.9, 0.98, 1e-8
  c.weight_decay = 0.001
  c.new_lr_multiplier = 10.0
  c.text_lr_multiplier = 1.0
  c.warmup_epochs = 5.0
  c.end_lr_ratio = 0.01          # Cosine per step to lr / 100 (every group's floor).
  c.freeze_image = False         # The official FIX_IMAGE default and the paper's Table 11 headline.
  c.freeze_text = False
  c.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  return c


GroupOf = Callable[[str], str]   # dotted parameter path -> one of families.GROUPS


def frozen_groups(config: ml_collections.ConfigDict) -> set[str]:
  """'image_head' is never among them: the official fix_image keeps it trainable."""
  return ({'image'} if config.freeze_image else set()) | ({'text'} if config.freeze_text else set())


def trainable_filter(config: ml_collections.ConfigDict,
                     group_of: GroupOf) -> nnx.filterlib.Filter:
  """An nnx filter for the parameters that train: every Param outside the frozen groups.
  `group_of` is the model's family's (families.of(model).group_of)."""
  frozen = frozen_groups(config)

  def trainable(path, value) -> bool:
    return isinstance(value, nnx.Param) and group_of(path_str(path)) not in frozen

  return trainable


def count_parameters(model: nnx.Module, config: ml_collections.ConfigDict,
                     group_of: GroupOf) -> tuple[int, int]:
  """-> (trainable parameters, parameters of the CLIP towers: the image and text groups)."""
  trainable = trainable_filter(config, group_of)
  counts = {'trainable': 0, 'towers': 0}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = int(np.prod(value.shape))
    counts['trainable'] += size if trainable(path, value) else 0
    counts['towers'] += size if group_of(path_str(path)) in ('image', 'image_head', 'text') else 0
  return counts['trainable'], counts['towers']


def decays(path: tuple | str, ndim: int) -> bool:
  """The official rule: no decay for 1-D parameters, biases and positional embeddings."""
  p = path if isinstance(path, str) else path_str(path)
  name = p.rsplit('.', 1)[-1]
  return ndim != 1 and name != 'bias' and not any(k in p for k in NO_DECAY_KEYWORDS)


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int, peak: float | None = None) -> optax.Schedule:
  """The official schedule (timm's CosineLRScheduler with t_initial = total_steps, warmup_t = the
  warm-up steps, warmup_lr_init = 0, lr_min = lr * end_lr_ratio, per step, no warm-up prefix):

    t < W:   peak * t / W
    t >= W:  lr_min + (peak - lr_min) * (1 + cos(pi * t / total_steps)) / 2

  The cosine runs over all steps from step 0, so at the end of the warm-up the rate is already
  below its peak (0.983 of it for 5 of 60 epochs, 0.855 for 5 of 20). `peak` is a group's rate
  (lr x its multiplier, default lr); lr_min is the same for every group, as in timm (the official
  10x group ends at lr / 100 too), and at most the group's peak. Steps count from 0 (optax's
  update count). The official loop sets the rate after each update, so its update t runs at the
  rate of t - 1 (the first two at 0): a one-step lag this schedule does not copy."""
  peak = config.lr if peak is None else peak
  floor = min(config.lr * config.end_lr_ratio, peak)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  total = max(total_steps, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    cosine = floor + 0.5 * (peak - floor) * (1 + jnp.cos(jnp.pi * jnp.minimum(t, total) / total))
    return jnp.where(t < warmup, peak * t / max(warmup, 1), cosine)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict, group_of: GroupOf, *, total_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the groups above (`group_of` as for trainable_filter), new parts at
  x new_lr_multiplier and the text tower at x text_lr_multiplier. Give it to
  `nnx.Optimizer(model, tx, wrt=trainable_filter(config, group_of))`.

  `total_steps` is the whole schedule the epochs define (a run may stop before its end).
  Returns the transformation and the base learning-rate schedule (for logging).
  """
  def schedule_at(multiplier: float) -> optax.Schedule:
    return learning_rate_schedule(config, total_steps=total_steps,
                                  steps_per_epoch=steps_per_epoch, peak=multiplier * config.lr)

  def mask(tree):  # Called on the sub-tree each group's AdamW sees (others are MaskedNodes).
    return jax.tree_util.tree_map_with_path(lambda p, x: decays(p, x.ndim), tree)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(schedule_at(multiplier), b1=config.b1, b2=config.b2,
                       eps=config.eps, weight_decay=config.weight_decay, mask=mask)

  def labels(tree):  # A callable, so it matches whatever tree (State or arrays) optax is given.
    return jax.tree_util.tree_map_with_path(
        lambda p, _: {'new': 'new', 'text': 'text'}.get(group_of(path_str(p)), 'base'), tree)

  tx = optax.multi_transform({'base': adamw(1.0), 'new': adamw(config.new_lr_multiplier),
                              'text': adamw(config.text_lr_multiplier)}, labels)
  if config.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule_at(1.0)
