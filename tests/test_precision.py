"""Precision of what ranks the classes: the final projections and the logits are computed in
full fp32 (precision HIGHEST, which TPUs and GPUs otherwise lower), and the logit scale is
clamped at ln 100 as CLIP's is, in the logits and in training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from claver_jax.models import families
from claver_jax.models.clip import MAX_LOGIT_SCALE, clamp_logit_scale, l2_normalize


def tiny_model(name: str):
  config = tiny_config.get_config()
  config.model.name = name
  cfg = families.model_config(config)
  return families.get(name).module_class(cfg, rngs=nnx.Rngs(0)), cfg


def logit_scale_param(model):
  return model.logit_scale if hasattr(model, 'logit_scale') else model.clip.logit_scale


@pytest.mark.parametrize('name', ['claver', 'xclip'])
@pytest.mark.slow
def test_logit_scale_is_clamped_at_ln_100_in_the_logits_and_after_an_update(name):
  model, cfg = tiny_model(name)
  video = jax.random.normal(jax.random.key(0), (2, cfg.num_frames, 16, 16, 3))
  text = jax.random.normal(jax.random.key(1), (1, 3, cfg.clip.embed_dim))
  features = nnx.jit(lambda m, v: m.video_features(v))(model, video)
  class_logits = nnx.jit(lambda m, f, t: m.class_logits(f, t))
  logit_scale_param(model)[...] = jnp.asarray(math.log(100.0))
  at_limit = class_logits(model, features, text)
  logit_scale_param(model)[...] = jnp.asarray(10.0)             # e^10 = 22026 without a clamp
  np.testing.assert_allclose(class_logits(model, features, text), at_limit, rtol=1e-6)
  assert float(jnp.abs(at_limit).max()) <= 100.0 + 1e-4
  clamp_logit_scale(model)
  assert float(logit_scale_param(model)[...]) == pytest.approx(MAX_LOGIT_SCALE)
  logit_scale_param(model)[...] = jnp.asarray(-1.0)
  clamp_logit_scale(model)
  assert float(logit_scale_param(model)[...]) == 0.0


def dot_generals(jaxpr):
  """Every dot_general equation of a closed jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from dot_generals(inner)


def test_final_projections_and_logits_are_full_fp32_products():
  """In the program: the image and text projections and the logits ask for HIGHEST precision
  (each a dot_general of fp32 operands), and nothing else does."""
  model, cfg = tiny_model('claver')
  video = jax.ShapeDtypeStruct((2, cfg.num_frames, 16, 16, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((3, 8), jnp.int32)
  graphdef, state = nnx.split(model)
  logits = lambda s, v, t: nnx.merge(graphdef, s).logits(v, t)
  dots = list(dot_generals(jax.make_jaxpr(logits)(state, video, tokens).jaxpr))
  highest = [eqn for eqn in dots if eqn.params['precision'] == (jax.lax.Precision.HIGHEST,) * 2]
  assert len(highest) == 3 < len(dots)           # visual proj, text projection, logits
  assert all(v.aval.dtype == jnp.float32 for eqn in highest for v in eqn.invars)


def test_logits_are_the_scaled_cosines():
  model, cfg = tiny_model('claver')
  video = jax.random.normal(jax.random.key(0), (2, cfg.num_frames, 16, 16, 3))
  text = jax.random.normal(jax.random.key(1), (1, 3, cfg.clip.embed_dim))
  features = nnx.jit(lambda m, v: m.video_features(v))(model, video)
  expected = np.exp(float(model.clip.logit_scale[...])) * np.einsum(
      'be,ce->bc', np.asarray(features), np.asarray(l2_normalize(text[0])))
  np.testing.assert_allclose(model.class_logits(features, text)[0], expected, rtol=1e-5)
