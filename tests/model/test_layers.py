"""Attention paths agree, masks hold, positional encodings match their formulas."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import model_config
from model.layers import (apply_rope, attention_mask, contract, einsum_attention, fused_attention,
                          sinusoidal_table)
from model.transformer import build_model, tied_logits
from tests.helpers import random_batch, tiny_config


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (4, 1)])
def test_einsum_and_dot_product_attention_agree(heads, kv_heads):
  rng = np.random.default_rng(0)
  b, t, k = 2, 12, 8
  q = jnp.asarray(rng.normal(size=(b, t, heads, k)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, t, kv_heads, k)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kv_heads, k)), jnp.float32)
  seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], b, 0))
  mask = attention_mask(seg, seg, causal=True)
  ref = lambda q, kk, v: einsum_attention(q, kk, v, mask, lambda p: p)
  xla = lambda q, kk, v: fused_attention(q, kk, v, mask, 'xla')
  np.testing.assert_allclose(ref(q, kk, v), xla(q, kk, v), atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) ** 2).sum()
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, kk, v)
  g_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, kk, v)
  for a, b_ in zip(g_ref, g_xla):
    np.testing.assert_allclose(a, b_, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('x_shape,w_shape,n', [
    ((2, 5, 8), (8, 32), 1),        # up projection: x narrower than g (x on the left)
    ((2, 5, 32), (32, 8), 1),       # down projection: g narrower (g on the left, then transposed)
    ((2, 5, 8), (8, 4, 3), 1),      # into heads: out axes (heads, head_dim)
    ((2, 5, 4, 3), (4, 3, 8), 2),   # out of heads: two contracted axes
])
def test_contract_gradient_equals_autodiff(x_shape, w_shape, n):
  """contract's hand-written VJP (operand order chosen for XLA CPU layouts) is autodiff's math."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  plain = lambda x, w: jax.lax.dot_general(
      x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
  probe = jnp.asarray(rng.normal(size=plain(x, w).shape), jnp.float32)
  loss = lambda f: jax.jit(jax.grad(lambda x, w: (jnp.sin(f(x, w)) * probe).sum(), argnums=(0, 1)))
  np.testing.assert_allclose(contract(x, w, n), plain(x, w), rtol=1e-6)
  for ours, ref in zip(loss(lambda x, w: contract(x, w, n))(x, w), loss(plain)(x, w)):
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_whole_model_attention_switch_same_logits():
  c = tiny_config()
  mc = model_config(c.model, 40, 16)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 40, (2, 16)))
  ref = build_model(mc)
  params = ref.init(jax.random.PRNGKey(0), tokens)
  fused = build_model(dataclasses.replace(mc, attention='xla'))
  np.testing.assert_allclose(ref.apply(params, tokens), fused.apply(params, tokens), atol=1e-5)


@pytest.mark.parametrize('pos', ['rope', 'learned', 'sinusoidal', 'none'])
def test_causality(pos):
  """Changing token t changes no logit before t, and does change logits at t."""
  mc = model_config(tiny_config(pos_encoding=pos).model, 40, 16)
  model = build_model(mc)
  tokens = np.random.default_rng(2).integers(0, 40, (1, 16))
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))
  changed = tokens.copy()
  changed[0, 9] = (changed[0, 9] + 1) % 40
  a, b = model.apply(params, jnp.asarray(tokens)), model.apply(params, jnp.asarray(changed))
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-4


def test_packed_rows_equal_separate_documents():
  """Two documents packed in one row (segment ids, restarting positions) give each document's
  logits exactly as when it is run alone."""
  mc = model_config(tiny_config().model, 40, 16)
  model = build_model(mc)
  rng = np.random.default_rng(3)
  d1, d2 = rng.integers(0, 40, 6), rng.integers(0, 40, 10)
  row = jnp.asarray(np.concatenate([d1, d2])[None])
  seg = jnp.asarray([[1] * 6 + [2] * 10])
  pos = jnp.asarray([list(range(6)) + list(range(10))])
  params = model.init(jax.random.PRNGKey(0), row)
  packed = model.apply(params, row, pos, seg)
  alone1 = model.apply(params, jnp.asarray(d1[None]))
  alone2 = model.apply(params, jnp.asarray(d2[None]))
  np.testing.assert_allclose(packed[:, :6], alone1, atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], alone2, atol=1e-5)


def test_rope_matches_complex_rotation():
  """Rotate-half RoPE equals multiplying (x_i, x_{i+k/2}) as a complex number by e^{i·pos·θ_i}."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.arange(5)[None] * 3
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0))
  theta = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[..., None, None] * theta)
  np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_sinusoidal_table_formula():
  table = np.asarray(sinusoidal_table(7, 6))
  for p in range(7):
    for i in range(3):
      angle = p / 10000 ** (2 * i / 6)
      assert math.isclose(table[p, 2 * i], math.sin(angle), abs_tol=1e-6)
      assert math.isclose(table[p, 2 * i + 1], math.cos(angle), abs_tol=1e-6)


def test_padding_rows_stay_finite():
  """A row that is all padding (segment 0) must not produce NaNs (fully masked softmax)."""
  mc = model_config(tiny_config().model, 40, 16)
  model = build_model(mc)
  batch = random_batch(np.random.default_rng(5), 2, 16, 40)
  batch['segment_ids'][1] = 0
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch['inputs']))
  out = model.apply(params, batch['inputs'], batch['positions'], batch['segment_ids'])
  assert np.isfinite(np.asarray(out)).all()


def test_tied_logits_gradient_is_autodiffs_in_f32_and_runs_in_bf16_under_bf16():
  """f32: output and gradients are the plain einsum's. bf16: every matmul of the backward takes
  bf16 operands (autodiff would run both in f32 over the vocabulary) and the gradients stay
  within bf16 rounding of the f32 ones."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(2, 6, 40)), jnp.float32)
  plain = lambda x, t: jnp.einsum('btd,vd->btv', x, t, preferred_element_type=jnp.float32)
  grads = lambda f, *a: jax.grad(lambda x, t: (f(x, t) * probe).sum(), argnums=(0, 1))(*a)
  np.testing.assert_allclose(tied_logits(x, table), plain(x, table), rtol=1e-6)
  for ours, ref in zip(grads(tied_logits, x, table), grads(plain, x, table)):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  xb, tb = x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
  operands = lambda f: [line.rsplit(' : (', 1)[1].split(') ->')[0] for line in jax.jit(
      lambda x, t: grads(f, x, t)).lower(xb, tb).as_text().splitlines() if 'dot_general' in line]
  assert operands(plain) and all('f32' in o for o in operands(plain))  # what autodiff does
  assert len(operands(tied_logits)) == 2 and all('f32' not in o for o in operands(tied_logits))
  for ours, ref in zip(grads(tied_logits, xb, tb), grads(plain, x, table)):
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=0.05, atol=0.05)
