"""Splash attention (the Pallas TPU kernel, interpreted on CPU) against the einsum oracle: alone,
in the whole model under a (2, 2, 2) mesh of 8 devices, and the cases it refuses or hands back."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import model_config
from model.errors import UserError
from model.layers import attention_mask, einsum_attention
from model.splash import block_size, splash_attention
from model.transformer import build_model, init_cache
from train.trainer import init_trainer
from train.mesh import global_batch, mesh_rules
from train.objectives import causal_lm_loss
from tests.helpers import random_batch, tiny_config

T = 128  # the kernel's smallest tile: sequences are multiples of 128


def segments(b: int, packed: bool) -> np.ndarray:
  """One document per row, or rows packed with two documents and trailing padding (segment 0)."""
  if not packed:
    return np.ones((b, T), np.int32)
  cuts = [(40 + 13 * i, 120 - 7 * i) for i in range(b)]
  return np.stack([np.repeat([1, 2, 0], [a, c - a, T - c]) for a, c in cuts]).astype(np.int32)


@pytest.mark.parametrize('heads,kv_heads,causal,packed,cap', [
    (4, 4, True, False, 0.0),   # causal MHA
    (4, 2, True, True, 0.0),    # GQA over packed documents with padding
    (4, 1, False, True, 5.0),   # MQA, bidirectional (encoder) within segments, soft-capped
], ids=['causal', 'packed_gqa', 'mqa_bidirectional_softcap'])
def test_splash_equals_einsum(heads, kv_heads, causal, packed, cap):
  """Outputs and gradients of q, k, v within 1e-5 (f32) of the oracle under the same mask."""
  rng = np.random.default_rng(0)
  b, dk = 2, 64
  q, k, v = (jnp.asarray(rng.normal(size=(b, T, n, dk)), jnp.float32)
             for n in (heads, kv_heads, kv_heads))
  seg = jnp.asarray(segments(b, packed))
  mask = attention_mask(seg, seg, causal)
  probe = jnp.asarray(rng.normal(size=(b, T, heads, dk)), jnp.float32)
  paths = {'einsum': lambda q, k, v: einsum_attention(q, k, v, mask, lambda p: p, cap=cap),
           'splash': lambda q, k, v: splash_attention(q, k, v, seg, causal, cap)}

  def out_and_grads(f):  # one compilation per path: the interpreted kernel compiles slowly
    def run(q, k, v):
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(probe)
    return jax.jit(run)(q, k, v)

  ref, ours = out_and_grads(paths['einsum']), out_and_grads(paths['splash'])
  for a, b_ in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)

def splash_config(attention: str, mesh: tuple[int, int, int]):
  c = tiny_config(attention=attention, n_heads=4, n_kv_heads=2, d_model=64, head_dim=16,
                  scan_layers=True, remat='full')
  c.train.batch_size, c.train.seq_len = 4, T
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def test_sharded_splash_model_equals_single_device_einsum():
  """The whole model (GQA, scanned and rematerialised layers, packed rows) with splash sharded
  over a (2, 2, 2) mesh of 8 devices (rows over data x fsdp, heads over tensor): loss and
  gradients equal the einsum oracle's on one device, from the same weights."""
  batch = random_batch(np.random.default_rng(1), 4, T, 64, docs_per_row=3)
  trainer = init_trainer(splash_config('splash', (2, 2, 2)), 64, devices=jax.devices()[:8])
  oracle = build_model(dataclasses.replace(trainer.model_cfg, attention='einsum'))

  def loss_and_grads(apply_fn, params, batch):
    loss_fn = causal_lm_loss(apply_fn)
    fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0))[0])
    return jax.device_get(jax.jit(fn)(params, batch))

  ref_loss, ref_grads = loss_and_grads(oracle.apply, jax.device_get(trainer.state.params), batch)
  with mesh_rules(trainer.mesh):
    loss, grads = loss_and_grads(trainer.model.apply, trainer.state.params,
                                 global_batch(batch, trainer.mesh))
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, jax.tree_util.keystr(path)


def test_decoding_with_a_cache_is_the_einsum_path():
  """Splash only runs full-sequence self-attention: a prefill through the KV cache (8 tokens, no
  multiple of 128) takes the oracle's path, so a splash model decodes exactly as the einsum one."""
  mc = model_config(tiny_config(attention='splash').model, 64, T)
  einsum = dataclasses.replace(mc, attention='einsum')
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)))
  shapes = nn.meta.unbox(jax.eval_shape(build_model(einsum).init, jax.random.PRNGKey(0), tokens))
  rng = np.random.default_rng(3)  # random weights without compiling init (slow on CPU)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), shapes)
  cache = init_cache(mc, jnp.zeros((2,), jnp.int32), 16)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  decode = lambda cfg: jax.jit(lambda p: build_model(cfg).apply(p, tokens, positions, cache,
                                                                method='decode')[0])(params)
  np.testing.assert_array_equal(decode(mc), decode(einsum))


@pytest.mark.parametrize('model,seq_len,match', [
    (dict(pos_encoding='relative'), T, 'relative'),   # T5's logit bias
    (dict(attn_dropout=0.1), T, 'attn_dropout'),
    ({}, 96, 'multiple of 128'),                      # no tile divides the rows
], ids=['relative_bias', 'attn_dropout', 'seq_len'])
def test_what_splash_cannot_do_is_a_user_error(model, seq_len, match):
  with pytest.raises(UserError, match=match):
    model_config(tiny_config(attention='splash', **model).model, 64, seq_len)
  with pytest.raises(UserError, match='multiple of 128'):
    block_size(200)
  assert model_config(tiny_config(attention='splash', attn_softcap=50.0).model, 64, T)
