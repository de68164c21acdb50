"""Kronecker attention: chunked equal to dense (values and gradients, every kind, odd T and L),
no [T·L, T·L] array in the chunked program, the `attention` setting and its 'auto' rule."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
from claver_jax.models import CLAVER, CLAVERConfig, CLIPConfig, families, kronecker_mask, load
from claver_jax.models.io import read_model_config, write_model_dir
from claver_jax.models.kronecker import (AUTO_CHUNKED_MIN_TOKENS, MASK_KINDS, kronecker_attention,
                                         resolve_implementation)
from claver_jax.models.temporal import TemporalTransformer
from claver_jax.run_config import base_config
from conftest import requires_libtpu

TOLERANCE = 1e-5   # max abs difference, fp32, outputs and gradients


def max_diff(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def qkv(b, s, h, d, seed=0):
  return tuple(jax.random.normal(jax.random.key(seed), (3, b, s, h, d)))


# ------------------------------------------------------------------------------- the attention op
@pytest.mark.parametrize('kind,t,l,chunk', [(kind, 3, 5, 1) for kind in MASK_KINDS] + [
    ('kmct', 5, 3, 1), ('kmt', 4, 3, 2), ('kmct', 4, 3, 2)])
@pytest.mark.slow
def test_chunked_attention_equals_dense(kind, t, l, chunk):
  q, k, v = qkv(2, t * l, 3, 8)
  weights = jax.random.normal(jax.random.key(1), q.shape)

  def value_and_grads(implementation):
    def loss(q, k, v):
      out = kronecker_attention(q, k, v, kind=kind, num_frames=t, implementation=implementation,
                                chunk_frames=chunk)
      return (out * weights).sum(), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, dense), dense_grads = value_and_grads('dense')
  (_, chunked), chunked_grads = value_and_grads('chunked')
  reference = jax.nn.dot_product_attention(q, k, v, mask=kronecker_mask(kind, t, l)[None, None])
  assert max_diff(dense, reference) <= TOLERANCE
  assert max_diff(chunked, dense) <= TOLERANCE
  assert max_diff(chunked_grads, dense_grads) <= TOLERANCE


@pytest.mark.parametrize('kind,t,l', [('kmct', 3, 7), ('kmt', 2, 70)])
@pytest.mark.slow
def test_splash_kernel_in_interpret_mode_equals_dense(kind, t, l):
  """The TPU kernel's Kronecker mask and padding (21 tokens in one 128 block; 140 in two, the
  second mostly padding), run by Pallas' interpreter on the CPU: outputs and gradients."""
  q, k, v = qkv(1, t * l, 2, 8)
  weights = jax.random.normal(jax.random.key(1), q.shape)

  def value_and_grads(**kw):
    loss = lambda q, k, v: (kronecker_attention(q, k, v, kind=kind, num_frames=t, **kw)
                            * weights).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  dense = value_and_grads(implementation='dense')
  splash = value_and_grads(implementation='chunked', kernel='splash')
  assert abs(float(splash[0] - dense[0])) <= 1e-4
  assert max_diff(splash[1], dense[1]) <= TOLERANCE


@requires_libtpu
@pytest.mark.parametrize('kind', ['kmt', 'kmct'])
@pytest.mark.slow
def test_splash_kernel_compiles_for_tpu_v5e_at_8_and_32_frames(kind):
  """Forward and backward at ViT-B/16's 197 tokens per frame (1576 and 6304 tokens, padded to
  1664 and 6400), batch split over a v5e 2x2 slice under its mesh: the Pallas kernels are in
  the program (3 custom calls: forward, dq, dk/dv) and nothing fell back."""
  from claver_jax import aot, sharding, topologies
  mesh = sharding.make_mesh(base_config().mesh, devices=topologies.tpu_devices('v5e:2x2'))
  for t in (8, 32):
    x = jax.ShapeDtypeStruct((4, t * 197, 12, 64), jnp.bfloat16)

    def make():
      loss = lambda q, k, v: kronecker_attention(q, k, v, kind=kind, num_frames=t).astype(
          jnp.float32).sum()
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)),
                     in_shardings=(sharding.batch_sharding(mesh),) * 3)

    step = aot.compile_step(make, mesh, x, x, x, name='attention')
    assert step.fallback is None
    assert step.kernels == [f'{kind} attention over {t} frames x 197 tokens (12 heads of 64, '
                            'bfloat16): splash']
    assert step.compiled.as_text().count('tpu_custom_call') == 3


def test_kernel_follows_the_platform_the_program_is_for():
  from claver_jax.models import kronecker
  assert kronecker.chunked_kernel(jnp.bfloat16, 'gpu') == 'cudnn'
  assert kronecker.chunked_kernel(jnp.float32, 'gpu') == 'portable'     # cuDNN: bf16/fp16 only
  assert kronecker.chunked_kernel(jnp.float32, 'tpu') == 'splash'
  assert kronecker.chunked_kernel(jnp.bfloat16, 'cpu') == 'portable'
  assert kronecker.chunked_kernel(jnp.bfloat16) == 'portable'           # this CPU, no mesh
  with kronecker.portable_kernels_only():
    assert kronecker.chunked_kernel(jnp.bfloat16, 'tpu') == 'portable'


@requires_libtpu
def test_a_tpu_mesh_makes_the_program_a_tpu_program():
  """Compiling for a TPU slice from this CPU host: under its mesh the kernel is splash."""
  from claver_jax import sharding, topologies
  from claver_jax.models import kronecker
  mesh = sharding.make_mesh(base_config().mesh, devices=topologies.tpu_devices('v5e:2x2'))
  seen = []
  with jax.set_mesh(mesh):
    jax.jit(lambda x: seen.append(kronecker.chunked_kernel(x.dtype)) or x).lower(
        jax.ShapeDtypeStruct((4,), jnp.bfloat16))
  assert seen == ['splash']


@pytest.mark.slow
def test_a_fused_kernel_that_fails_to_compile_falls_back_at_compile_time(monkeypatch, caplog):
  """A kernel the compiler rejects (simulated: a custom call nothing implements, which traces
  and lowers but does not compile): the step is compiled again with the portable kernel, says
  why once, and computes the attention."""
  from claver_jax import aot, sharding
  from claver_jax.models import kronecker

  def uncompilable(q, k, v, kind, num_frames):
    return jax.ffi.ffi_call('claver_missing_kernel', jax.ShapeDtypeStruct(q.shape, q.dtype))(q)

  monkeypatch.setattr(kronecker, '_cudnn_attention', uncompilable)
  monkeypatch.setattr(kronecker, 'chunked_kernel', lambda dtype, platform=None: (
      'portable' if kronecker._portable_only[0] else 'cudnn'))
  mesh = sharding.make_mesh(base_config().mesh)
  q, k, v = qkv(2, 12, 2, 8)
  attend = lambda q, k, v: kronecker_attention(q, k, v, kind='kmt', num_frames=3,
                                               implementation='chunked')
  with caplog.at_level(logging.WARNING):
    step = aot.compile_step(lambda: jax.jit(attend), mesh, q, k, v, name='attention')
  assert step.fallback.startswith('cudnn: JaxRuntimeError') and 'claver_missing_kernel' in (
      step.fallback)
  assert 'failed to compile with the fused attention kernel' in caplog.text
  assert step.kernels == ['kmt attention over 3 frames x 4 tokens (2 heads of 8, float32): '
                          'portable chunked kernel']
  assert 'did not compile' in step.summary()[1]
  dense = kronecker_attention(q, k, v, kind='kmt', num_frames=3, implementation='dense')
  assert max_diff(step.compiled(q, k, v), dense) <= TOLERANCE


@pytest.mark.slow
def test_cudnn_form_is_never_differentiated(monkeypatch):
  """With a mask, the cuDNN form's gradient is the portable kernel's (no bias gradient): under
  differentiation cuDNN is never traced, outside it it is."""
  from claver_jax.models import kronecker
  calls, xla_attention = [], jax.nn.dot_product_attention

  def fake_cudnn(q, k, v, mask=None, implementation=None):   # stands in for cuDNN on this CPU
    calls.append(implementation)
    return xla_attention(q, k, v, mask=mask)

  monkeypatch.setattr(kronecker.jax.nn, 'dot_product_attention', fake_cudnn)
  q, k, v = qkv(2, 12, 2, 8)
  weights = jax.random.normal(jax.random.key(1), q.shape)
  for kind in ('kmt', 'kmct'):
    calls.clear()
    loss = lambda q, k, v: (kronecker._cudnn_attention(q, k, v, kind, 3) * weights).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert calls == []
    dense_loss = lambda q, k, v: (kronecker_attention(q, k, v, kind=kind, num_frames=3,
                                                      implementation='dense') * weights).sum()
    assert max_diff(grads, jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)) <= TOLERANCE
    out = kronecker._cudnn_attention(q, k, v, kind, 3)
    assert calls == ['cudnn']
    assert max_diff(out, kronecker_attention(q, k, v, kind=kind, num_frames=3,
                                             implementation='dense')) <= TOLERANCE


def test_a_fused_kernel_that_rejects_its_inputs_falls_back_loudly_once(caplog):
  from claver_jax.models import kronecker
  q, k, v = qkv(1, 12, 2, 8)
  kronecker.clear_kernel_report()
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      out = kronecker_attention(q, k, v, kind='kmt', num_frames=3, implementation='chunked',
                                kernel='cudnn')                 # fp32 on a CPU: no cuDNN
  assert caplog.text.count('The cudnn attention kernel rejected these inputs') == 1
  assert 'using the portable chunked kernel' in caplog.text
  [line] = kronecker.kernel_report()
  assert line.startswith('kmt attention over 3 frames x 4 tokens (2 heads of 8, float32): '
                         'portable chunked kernel (cudnn rejected it: ')
  dense = kronecker_attention(q, k, v, kind='kmt', num_frames=3, implementation='dense')
  assert max_diff(out, dense) <= TOLERANCE


# ------------------------------------------------------------------------ the temporal transformer
def reference_head(model: TemporalTransformer, tokens):
  """The head as first written: every block over [B, T·L, D] under the host mask."""
  b, t, l, d = tokens.shape
  x = tokens + model.temporal_embedding[...][None, :, None, :]
  if model.kind == 'cls_only':
    x, mask = x[:, :, 0], None
  else:
    x, mask = x.reshape(b, t * l, d), kronecker_mask(model.kind, t, l)[None, None]
  for block in model.blocks:
    x = block(x, mask=mask)
  if model.kind == 'cls_only':
    return x
  x = x.reshape(b, t, l, d)
  return x.mean(axis=2) if model.kind == 'pipeline' else x[:, :, 0]   # §3.2: pipeline pools all


@pytest.mark.parametrize('kind', ['kmt', 'kmct', 'joint', 'pipeline', 'cls_only'])
@pytest.mark.slow
def test_temporal_head_chunked_equals_dense_and_the_masked_reference(kind):
  t, l, width = 3, 5, 16
  tokens = jax.random.normal(jax.random.key(2), (2, t, l, width))
  weights = jax.random.normal(jax.random.key(3), (2, t, width))
  results = {}
  for attention in ('dense', 'chunked', 'reference'):
    model = TemporalTransformer(kind, t, width, 1, 2, attention=attention.replace(
        'reference', 'dense'), rngs=nnx.Rngs(0))
    forward = reference_head if attention == 'reference' else type(model).__call__

    def loss(model, tokens):
      out = forward(model, tokens)
      return (out * weights).sum(), out

    grad_fn = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, out), (param_grads, token_grads) = nnx.jit(grad_fn)(model, tokens)
    results[attention] = out, nnx.to_pure_dict(param_grads), token_grads
  for attention in ('dense', 'chunked'):
    assert max_diff(results[attention][0], results['reference'][0]) <= TOLERANCE
    assert max_diff(results[attention][1], results['reference'][1]) <= TOLERANCE
    assert max_diff(results[attention][2], results['reference'][2]) <= TOLERANCE


def array_sizes(program_text: str) -> list[int]:
  """Element counts of every array shape written in an HLO / StableHLO text."""
  sizes = []
  for dims in re.findall(r'(?:f32|f16|bf16|s32|u32|pred|i1|i32)\[([0-9,]*)\]', program_text):
    sizes.append(int(np.prod([int(x) for x in dims.split(',') if x])))
  for dims in re.findall(r'tensor<((?:\d+x)+)(?:f32|bf16|f16|i1|i32|ui32)>', program_text):
    sizes.append(int(np.prod([int(x) for x in dims.split('x') if x])))
  return sizes


@pytest.mark.parametrize('kind', ['kmt', 'kmct'])
@pytest.mark.slow
def test_no_clip_sized_square_array_in_the_chunked_program(kind):
  """Forward and backward of a head whose largest legitimate array ([T·L, 4·width]) is smaller
  than (T·L)²: the chunked program holds no array that large, the dense one does."""
  t, l, width = 6, 7, 8
  s = t * l
  assert s * 4 * width < s * s
  tokens = jax.ShapeDtypeStruct((1, t, l, width), jnp.float32)
  for attention in ('dense', 'chunked'):
    graphdef, state = nnx.split(TemporalTransformer(kind, t, width, 1, 2, attention=attention,
                                                    rngs=nnx.Rngs(0)))
    grad = jax.jit(jax.grad(lambda state, x: nnx.merge(graphdef, state)(x).sum(), argnums=(0, 1)))
    lowered = grad.lower(state, tokens)
    largest = max(array_sizes(lowered.as_text()) + array_sizes(lowered.compile().as_text()))
    if attention == 'dense':
      assert largest >= s * s
    else:
      assert largest < s * s, f'an array of {largest} elements >= (T·L)² = {s * s}'


# ------------------------------------------------------------------------ the setting, 'auto'
def test_auto_is_chunked_from_the_threshold_on():
  assert resolve_implementation('auto', 1, AUTO_CHUNKED_MIN_TOKENS - 1) == 'dense'
  assert resolve_implementation('auto', 1, AUTO_CHUNKED_MIN_TOKENS) == 'chunked'
  assert resolve_implementation('auto', 8, 197) == 'chunked'            # ViT-B/16, 8 frames
  assert resolve_implementation('auto', 8, 50) == 'dense'               # ViT-B/32, 8 frames
  assert resolve_implementation('dense', 32, 197) == 'dense'
  assert resolve_implementation('chunked', 2, 2) == 'chunked'
  with pytest.raises(ValueError, match="'dense', 'chunked', 'auto'"):
    resolve_implementation('flash', 8, 197)


TINY = CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                  vision_heads=2, vision_mlp_dim=64, context_length=8, vocab_size=50,
                  text_width=16, text_layers=1, text_heads=1, text_mlp_dim=32)


@pytest.mark.slow
def test_attention_is_recorded_in_model_directories(tmp_path):
  cfg = CLAVERConfig(clip=TINY, num_frames=3, temporal='kmct', temporal_layers=1,
                     attention='chunked')
  model = CLAVER(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  write_model_dir(tmp_path / 'model', kind='claver', config=cfg, params=params,
                  normalization=(CLIP_MEAN, CLIP_STD))
  assert read_model_config(tmp_path / 'model')[1].attention == 'chunked'
  loaded = load(tmp_path / 'model')
  assert loaded.cfg == cfg and loaded.temporal.attention == 'chunked'
  assert load(tmp_path / 'model', attention='dense').temporal.attention == 'dense'

  # A directory written before the setting existed loads, as 'auto'.
  meta_file = tmp_path / 'model' / 'config.json'
  meta = json.loads(meta_file.read_text())
  del meta['config']['attention']
  meta_file.write_text(json.dumps(meta))
  old = load(tmp_path / 'model')
  assert old.cfg.attention == 'auto' and old.temporal.attention == 'auto'
  video = jax.random.normal(jax.random.key(0), (1, 3, 16, 16, 3))
  encode = nnx.jit(lambda model, video: model.encode_video(video))
  assert max_diff(encode(old, video), encode(model, video)) <= TOLERANCE


def test_run_config_sets_the_attention():
  config = base_config()
  assert config.model.attention == 'auto'
  config.model.update(arch='B32', temporal='kmct', attention='chunked')
  config.data.update(num_frames=8, image_size=224)
  assert families.model_config(config).attention == 'chunked'
  with pytest.raises(ValueError, match='attention='):
    CLAVERConfig(clip=TINY, attention='flash')


def test_flops_count_the_chunked_attention_as_dense():
  """XLA's cost analysis counts a loop's body once; the report counts the attention dense."""
  from claver_jax.flops import report
  cfg = CLAVERConfig(clip=TINY, num_frames=3, temporal='kmct', temporal_layers=1)
  assert report(dataclasses.replace(cfg, attention='chunked')) == report(cfg)
