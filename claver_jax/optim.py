"""The optimizer: parameter groups, frozen towers, weight-decay masks and the schedule.

Groups, by parameter path; the model's family says which paths are which
(`claver_jax.models.families`: CLAVER's new parts are temporal.*, X-CLIP's its messages, MIT and
prompt generator):
  image    the image tower               frozen when `freeze_image` (CLAVER's default)
  text     the text tower                frozen when `freeze_text`; else learning rate x
                                         `text_lr_multiplier` (1)
  new      the family's new parts        learning rate x `new_lr_multiplier` (10 in both papers)
  base     everything else (CLAVER's logit_scale)
No weight decay on biases, on 0-/1-D parameters (LayerNorm, class embedding, logit scale, X-CLIP's
alpha) and on positional and temporal embeddings.

Frozen parameters are not differentiated at all (`trainable_filter` goes to `nnx.grad` and
`nnx.Optimizer(wrt=...)`), so a frozen image tower costs no backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from claver_jax.models.io import path_str

NO_DECAY_NAMES = ('positional_embedding', 'temporal_embedding', 'class_embedding')


def default_config() -> ml_collections.ConfigDict:
  """The paper's AdamW settings for full supervision (few-shot uses lr=2e-6)."""
  c = ml_collections.ConfigDict()
  c.lr = 12e-6
  c.b1, c.b2, c.eps = 0.9, 0.98, 1e-8
  c.weight_decay = 0.001
  c.new_lr_multiplier = 10.0
  c.text_lr_multiplier = 1.0
  c.warmup_epochs = 5.0
  c.end_lr_ratio = 0.01          # Cosine decay per step to lr / 100.
  c.freeze_image = True
  c.freeze_text = False
  c.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  return c


GroupOf = Callable[[str], str]   # dotted parameter path -> 'image' | 'text' | 'new' | 'base'


def frozen_groups(config: ml_collections.ConfigDict) -> set[str]:
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
  """-> (trainable parameters, parameters of the CLIP towers: the 'image' and 'text' groups)."""
  trainable = trainable_filter(config, group_of)
  counts = {'trainable': 0, 'towers': 0}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = int(np.prod(value.shape))
    counts['trainable'] += size if trainable(path, value) else 0
    counts['towers'] += size if group_of(path_str(path)) in ('image', 'text') else 0
  return counts['trainable'], counts['towers']


def decays(path: tuple | str, ndim: int) -> bool:
  p = path if isinstance(path, str) else path_str(path)
  name = p.rsplit('.', 1)[-1]
  return ndim >= 2 and name != 'bias' and not any(n in p for n in NO_DECAY_NAMES)


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_epochs`, then cosine per step down to lr * end_lr_ratio."""
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.end_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict, group_of: GroupOf, *, total_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the groups above (`group_of` as for trainable_filter), new parts at
  x new_lr_multiplier and the text tower at x text_lr_multiplier. Give it to
  `nnx.Optimizer(model, tx, wrt=trainable_filter(config, group_of))`.

  Returns the transformation and the base learning-rate schedule (for logging).
  """
  schedule = learning_rate_schedule(config, total_steps=total_steps,
                                    steps_per_epoch=steps_per_epoch)
  def mask(tree):  # Called on the sub-tree each group's AdamW sees (others are MaskedNodes).
    return jax.tree_util.tree_map_with_path(lambda p, x: decays(p, x.ndim), tree)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(lambda step: multiplier * schedule(step), b1=config.b1, b2=config.b2,
                       eps=config.eps, weight_decay=config.weight_decay, mask=mask)

  def labels(tree):  # A callable, so it matches whatever tree (State or arrays) optax is given.
    return jax.tree_util.tree_map_with_path(
        lambda p, _: {'new': 'new', 'text': 'text'}.get(group_of(path_str(p)), 'base'), tree)

  tx = optax.multi_transform({'base': adamw(1.0), 'new': adamw(config.new_lr_multiplier),
                              'text': adamw(config.text_lr_multiplier)}, labels)
  if config.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
