"""A few train steps of a tiny model through `step.make_train_step`, the text tower frozen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from claver_jax import evaluate, optim, sharding
from claver_jax.models import families
from claver_jax.models.clip import pool_index
from claver_jax.step import make_train_step


def steps_on_cached_texts(model, config, tokens: np.ndarray, rng: np.random.Generator,
                          steps: int = 4):
  """Runs `steps` train steps on one batch of 8 uint8 clips of 4 frames of 16² (labels 0..2),
  with the text embeddings of `tokens` [A, C, S] cached as train_and_evaluate makes them
  (unnormalised). Returns (losses, model state before, after) as pure dicts."""
  family = families.of(model)
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=10, steps_per_epoch=10)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim, family.group_of))
  text = nnx.jit(lambda m, t: evaluate.encode_texts(m.encode_text, t))(model, tokens)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(make_train_step(graphdef, config, sharding.make_mesh(config.mesh),
                                 pool_index(tokens, model.cfg.clip) + 1, True, family.group_of))
  batch = {'video': rng.integers(0, 256, (8, 4, 16, 16, 3), dtype=np.uint8),
           'label': np.arange(8, dtype=np.int32) % 3}
  before = nnx.to_pure_dict(nnx.state(model))
  losses = []
  for i in range(steps):
    state, out = step(state, batch, text, jnp.asarray(i + 1, jnp.int32))
    losses.append(float(out['loss']))
  return losses, before, nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0]))


def unchanged(before, after) -> bool:
  """Every array of two (sub)trees equal."""
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
