"""The train step: (state, batch, text, step) -> (state, {'loss', 'finite'}), compiled by the
train loop, and its pieces (the loss, the random draws, micro-batches, text-length buckets) and
the finiteness checks the loop runs on its results.

Loss: each step draws `config.text.sets_per_step` (K) of the A description sets, with
replacement, as the official loop's torch.randint does; the loss is the soft cross-entropy over
the C classes for each drawn set, averaged over the K draws. K >= A (the paper presets: as many
draws per update as the official 8-GPU run made) encodes each of the A sets once, weighted by how
often it was drawn: the same loss and gradient as encoding every draw. With a frozen text tower
all A·C texts are encoded once and cached (projected, not normalised); otherwise the drawn sets
are encoded inside the step, once per step whatever `config.train.grad_accum_steps`. Models are
used only through their family's interface (claver_jax.models.families).

Scale: the text attention is causal and pools at the end-of-text token, so a text encoded at
any context that holds it gives the same embedding. Texts are cut to the longest one (rounded up
to 8 tokens); in the step, they are sorted by length and encoded in groups at their own context
(`encode_texts_by_length`). Each group is split over the devices, forward and backward
(`evaluate.encode_texts_sharded`). Gradient accumulation is a lax.scan over micro-batches that
each span every device (`micro_batches`).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from claver_jax import optim, sharding
from claver_jax.data.mixup import mixup_cutmix, smooth_one_hot
from claver_jax.data.transforms import normalize
from claver_jax.evaluate import encode_texts_sharded
from claver_jax.models import kronecker
from claver_jax.models.clip import clamp_logit_scale


class NonFiniteLossError(RuntimeError):
  """The loss, the gradient or the parameters became NaN or inf; the last good checkpoint is
  kept."""


@jax.jit
def _all_finite(state: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def all_finite(state: Any) -> bool:
  """True when every floating-point array of `state` is finite (checked before each save)."""
  return bool(jax.device_get(_all_finite(state)))


def check_finite(unchecked: list[tuple[int, jax.Array]], last_good: Callable[[], str],
                 flags: list[Any] | None = None) -> None:
  """Raises at the first step of `unchecked` [(step, its on-device 'finite' flag)] whose loss or
  gradient was not finite, and empties it (a host sync: call it only where the loop syncs
  anyway). `flags`: their values, if already fetched; `last_good()` names what is kept."""
  flags = jax.device_get([f for _, f in unchecked]) if flags is None else flags
  bad = next((s for (s, _), ok in zip(unchecked, flags) if not ok), None)
  unchecked.clear()
  if bad is not None:
    raise NonFiniteLossError(
        f'The training loss or gradient is not finite at step {bad}. Stopping: nothing from '
        f'step {bad} on is saved or exported, and {last_good()}. Lower config.optim.lr, check '
        'the data, or enable config.optim.grad_clip_norm.')


def check_parameters(state: Any, step: int, last_good: Callable[[], str]) -> None:
  """Raises when an array of `state` is not finite after `step` (before a save or an export)."""
  if not all_finite(state):
    raise NonFiniteLossError(f'The parameters are not finite after step {step}; nothing saved '
                             f'or exported, and {last_good()}. Lower config.optim.lr or enable '
                             'config.optim.grad_clip_norm.')


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
  """logits [..., B, C], targets [B, C] (rows sum to 1) -> mean over everything but C; with
  `weights` [K] (summing to 1) for logits [K, B, C], the K sets' means weighted by them."""
  per_set = -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean(-1)
  return per_set.mean() if weights is None else (weights * per_set).sum()


def length_buckets(lengths: np.ndarray, sets: int, multiple: int = 8, *,
                   repeats: bool = False) -> tuple[tuple[int, int], ...]:
  """Static groups (count, context) to encode the texts of any `sets` rows of `lengths` int
  [A, C] (the context each text needs) by length (`repeats`: rows drawn with replacement):
  sorted by length, the texts of any such choice fill the groups in order, each at most as long
  as its group's context (a multiple of `multiple`). A group's count is the fewest texts of that
  length or shorter that `sets` rows can hold, less the groups before it."""
  total, longest = sets * lengths.shape[1], int(lengths.max())
  buckets, placed = [], 0
  for context in range(multiple, longest + multiple, multiple):
    short = np.sort((lengths <= context).sum(1))
    fewest = sets * int(short[0]) if repeats else int(short[:sets].sum())
    fits = total if context >= longest else fewest
    if fits > placed:
      buckets.append((fits - placed, context))
      placed = fits
  return tuple(buckets)


def encode_texts_by_length(model: nnx.Module, tokens: jax.Array, lengths: jax.Array,
                           buckets: tuple[tuple[int, int], ...],
                           mesh: jax.sharding.Mesh) -> jax.Array:
  """tokens int32 [N, S], lengths int [N] (the context each needs) -> [N, E] (projected, not
  normalised), on every device. Inside jit: the texts sorted by length, each group of
  `length_buckets` encoded at its own context by `encode_texts_sharded`. The text attention is
  causal, so this is exact."""
  order = jnp.argsort(lengths, stable=True)
  ranked = jax.lax.with_sharding_constraint(tokens[order], sharding.replicated(mesh))
  parts, start = [], 0
  for count, context in buckets:
    parts.append(encode_texts_sharded(model, ranked[start:start + count, :context], mesh))
    start += count
  return jnp.concatenate(parts)[jnp.argsort(order)]


def micro_batches(tree: Any, count: int, mesh: jax.sharding.Mesh) -> Any:
  """Leaves [B, ...] split over the devices -> [count, B / count, ...]: micro-batch m takes the
  m-th 1/count of every device's rows (a strided split of the global batch), so each micro-batch
  is spread over every device and no data moves."""
  devices = mesh.size
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.AXES))

  def split(x):
    per_device = x.reshape(devices, count, x.shape[0] // (devices * count), *x.shape[1:])
    stacked = per_device.swapaxes(0, 1).reshape(count, x.shape[0] // count, *x.shape[1:])
    return jax.lax.with_sharding_constraint(stacked, spec)

  return jax.tree.map(split, tree)


def step_keys(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The train step's random keys: (mixup/cutmix, description sets)."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), step)))


def draw_sets(key: jax.Array, draws: int, num_sets: int) -> jax.Array:
  """int [draws]: description sets drawn with replacement, as the official loop's
  torch.randint(0, A, (K,))."""
  return jax.random.randint(key, (draws,), 0, num_sets)


def make_train_step(graphdef, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    text_lengths: np.ndarray, text_frozen: bool, group_of: optim.GroupOf):
  """(state, batch, text, step) -> (state, {'loss', 'finite'}). `text` is [A, C, E] cached
  embeddings (projected, not normalised) when the text tower is frozen, else [A, C, S] tokens;
  `text_lengths` int [A, C] is the context each text needs (its pooling position + 1).
  `group_of` is the model family's parameter groups. 'finite' is False when the loss or the
  gradient's global norm is not finite; 'substituted' (when the batch has it) counts the batch's
  substituted clips.

  One step: normalise and mix the global batch; draw K of the A description sets (with
  replacement); encode the drawn sets' texts once (all A·C, each set weighted by its draws, when
  K >= A; else the K·C drawn), by length and split over the devices (`encode_texts_by_length`); run
  `grad_accum_steps` micro-batches (lax.scan, each spread over every device), accumulating the
  gradients of the parameters and of the text embeddings; take the latter back through the text
  tower once; update. The model is used through its family's `encode_text`, `video_features`
  and `class_logits`.
  """
  tc, dc = config.train, config.data
  num_sets, num_classes = text_lengths.shape
  draws = config.text.sets_per_step
  every_set = draws >= num_sets          # Encode each set once, weighted by its draws.
  sets = num_sets if every_set else draws
  buckets = length_buckets(text_lengths, sets, repeats=not every_set)
  accum = tc.grad_accum_steps
  wrt = optim.trainable_filter(config.optim, group_of)

  def train_step(state, batch, text, step):
    chex.assert_shape(batch['video'], (tc.batch_size, dc.num_frames, dc.image_size,
                                       dc.image_size, 3))
    chex.assert_shape(batch['label'], (tc.batch_size,))
    chex.assert_shape(text, (num_sets, num_classes, None))
    chex.assert_type([batch['video'], batch['label']], [jnp.uint8, jnp.int32])
    model, optimizer = nnx.merge(graphdef, state)
    mix_rng, set_rng = step_keys(config.seed, step)
    video = normalize(batch['video'], tuple(dc.mean), tuple(dc.std))
    if tc.mixup_alpha > 0 or tc.cutmix_alpha > 0:
      video, targets = mixup_cutmix(mix_rng, video, batch['label'], num_classes,
                                    mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha,
                                    switch_prob=tc.mixup_switch_prob,
                                    label_smoothing=tc.label_smoothing)
    else:
      targets = smooth_one_hot(batch['label'], num_classes, tc.label_smoothing)
    drawn = draw_sets(set_rng, draws, num_sets)
    if every_set:
      set_ids, weights = jnp.arange(num_sets), jnp.bincount(drawn, length=num_sets) / draws
    else:
      set_ids, weights = drawn, jnp.full((draws,), 1 / draws)
    chosen = jax.lax.with_sharding_constraint(text[set_ids], sharding.replicated(mesh))
    graph, params, rest = nnx.split(model, wrt, ...)

    def text_embeddings(params):                                           # -> [K, C, E]
      tokens = chosen.reshape(sets * num_classes, -1)
      lengths = jnp.asarray(text_lengths)[set_ids].reshape(-1)
      embeddings = encode_texts_by_length(nnx.merge(graph, params, rest), tokens, lengths,
                                          buckets, mesh)
      return embeddings.reshape(sets, num_classes, -1)

    if text_frozen:
      text_emb, text_backward = chosen, None
    else:
      text_emb, text_backward = jax.vjp(text_embeddings, params)

    def micro_loss(params, text_emb, video, targets):
      model = nnx.merge(graph, params, rest)
      logits = model.class_logits(model.video_features(video), text_emb)   # [K, B, C]
      return soft_cross_entropy(logits, targets, weights)

    grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1))
    if accum == 1:     # No loop: XLA's CPU backend runs a loop's body about 3x slower.
      loss, (grads, text_grad) = grad_fn(params, text_emb, video, targets)
    else:
      def micro_step(carry, micro):
        loss, grads, text_grad = carry
        l, (g, t) = grad_fn(params, text_emb, *micro)
        return (loss + l, jax.tree.map(jnp.add, grads, g), text_grad + t), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(text_emb))
      (loss, grads, text_grad), _ = jax.lax.scan(micro_step, zeros,
                                                 micro_batches((video, targets), accum, mesh),
                                                 unroll=kronecker.loops_unrolled())
    if text_backward is not None:
      grads = jax.tree.map(jnp.add, grads, text_backward(text_grad)[0])
    loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    # Checked on device; the loop reads it where it reads the loss (no extra host sync).
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    optimizer.update(model, grads)
    clamp_logit_scale(model)                 # As CLIP: the logits stay within 100 x cosine.
    out = {'loss': loss, 'finite': finite}
    if 'substituted' in batch:
      out['substituted'] = batch['substituted'].sum()
    return nnx.state((model, optimizer)), out

  return train_step
