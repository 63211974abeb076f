"""model.cudnn_segments off GPU: the packed layout handed to cuDNN describes exactly the segment
mask, and the switch between kernel and mask fallback keeps the mask's result. cuDNN itself cannot
run here: JAX's private packed entry point is emulated by the einsum oracle under the mask the
layout spells out (its documented q_seqlen / q_offsets semantics), the causal kernel by the
oracle, and the model is lowered for CUDA; benchmarks/cudnn_attention.py times and checks the real
kernels on a GPU."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model.layers
from model.config import model_config
from model.cudnn import cudnn_attention, packed_kernel, packed_segments
from model.errors import UserError
from model.layers import attention_mask, einsum_attention
from model.transformer import build_model
from tests.helpers import tiny_config


def packed_rows(b: int, t: int, rng: np.random.Generator, most: int) -> np.ndarray:
  """Row r: 1 + r % most documents, every other row ending in padding (segment 0)."""
  rows = []
  for r in range(b):
    n = 1 + r % most
    end = t - (r % 2) * (t // 4)
    cuts = sorted(rng.choice(np.arange(1, end), n - 1, replace=False)) if n > 1 else []
    bounds = [0, *cuts, end]
    ids = np.repeat(np.arange(1, n + 1), np.diff(bounds))
    rows.append(np.concatenate([ids, np.zeros(t - end, np.int64)]))
  return np.stack(rows).astype(np.int32)


def layout_mask(lengths: jax.Array, offsets: jax.Array, t: int) -> jax.Array:
  """[b, 1, t, t]: same run of the layout and causal; what cuDNN's packed causal kernel computes."""
  pos = jnp.arange(t)
  starts = offsets[:, :-1, None]
  inside = (pos >= starts) & (pos < starts + lengths[:, :, None]) & (lengths[:, :, None] > 0)
  run = (inside * jnp.arange(1, lengths.shape[1] + 1)[None, :, None]).sum(1)  # 0 = in no run
  return ((run[:, :, None] == run[:, None, :]) & (run[:, :, None] > 0)
          & (pos[:, None] >= pos[None, :]))[:, None]


def oracle(mask):
  return lambda q, k, v: einsum_attention(q, k, v, mask, lambda p: p)


@pytest.fixture
def fake_cudnn(monkeypatch) -> list[int]:
  """JAX's private cuDNN entry point replaced by its documented semantics (the einsum oracle under
  the layout's mask), so that model.cudnn.packed_kernel itself runs here; the list collects the
  key head count each call was given."""
  import jax._src.cudnn.fused_attention_stablehlo as fa
  heads = []

  def emulated(q, k, v, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
               kv_offsets=None, *, scale, mask_type, qkv_layout):
    assert bias is None and mask is None and qkv_layout == 'BTNH'
    assert mask_type == fa.MaskType.CAUSAL and scale == pytest.approx(q.shape[-1] ** -0.5)
    assert kv_seqlen is q_seqlen and kv_offsets is q_offsets  # self-attention: one layout
    heads.append(k.shape[2])
    return oracle(layout_mask(q_seqlen, q_offsets, q.shape[1]))(q, k, v)

  monkeypatch.setattr(fa, 'dot_product_attention', emulated)
  return heads


def causal_stand_in(q, k, v):
  ones = jnp.ones(q.shape[:2], jnp.int32)
  return oracle(attention_mask(ones, ones, causal=True))(q, k, v)


def nan_path(q, k, v, *layout):
  return jnp.full_like(q, jnp.nan)


def test_layout_matches_jax_docstring_example():
  """Rows of 3 and 2 one-token segments, M = 3: offsets [[0,1,2,-1],[0,1,-1,-1]], lengths 1 or -1."""
  lengths, offsets, overflow = packed_segments(jnp.asarray([[1, 2, 3], [1, 2, 2]]), 3)
  np.testing.assert_array_equal(offsets, [[0, 1, 2, -1], [0, 1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[1, 1, 1], [1, 2, -1]])
  assert not overflow


@pytest.mark.parametrize('most', [1, 3, 6])
def test_layout_spells_out_the_segment_mask(most):
  """Rows of up to `most` documents and padding: the layout's mask is attention_mask's exactly;
  overflow exactly when a row has more runs (padding counting as one) than M."""
  rng = np.random.default_rng(most)
  seg = packed_rows(8, 40, rng, most)
  runs = 1 + (seg[:, 1:] != seg[:, :-1]).sum(1)
  for m in (runs.max() - 1, runs.max(), runs.max() + 2):
    if m < 1:
      continue
    lengths, offsets, overflow = packed_segments(jnp.asarray(seg), int(m))
    assert bool(overflow) == (runs.max() > m)
    if not overflow:
      np.testing.assert_array_equal(layout_mask(lengths, offsets, 40),
                                    attention_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True))


@pytest.mark.parametrize('m,kv_heads', [(1, 2), (4, 1), (4, 2), (4, 4)])
def test_kernel_or_mask_same_output_and_gradients(m, kv_heads, fake_cudnn):
  """Within M the kernel path runs (the mask path is NaN here), beyond it the mask path (the
  kernel is NaN): outputs and gradients equal the oracle's either way, GQA and MQA included. The
  packed kernel gets one key head per query head where JAX's packed GQA offsets are wrong."""
  rng = np.random.default_rng(m)
  b, t, h, dk = 4, 24, 4, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, dk)), jnp.float32) for n in (h, kv_heads, kv_heads))
  probe = jnp.asarray(rng.normal(size=(b, t, h, dk)), jnp.float32)
  fits = np.ones((b, t), np.int32) if m == 1 else packed_rows(b, t, rng, m - 1)
  too_many = packed_rows(b, t, rng, m + 2)
  for seg, dense, kernel in ((fits, nan_path, None), (too_many, None, nan_path)):
    seg = jnp.asarray(seg)
    ref = oracle(attention_mask(seg, seg, causal=True))
    ours = functools.partial(cudnn_attention, segment_ids=seg, max_segments=m,
                             dense=dense or ref, packed=kernel or packed_kernel,
                             causal=kernel or causal_stand_in)
    run = lambda f: jax.jit(lambda q, k, v: (lambda o, vjp: (o, vjp(probe)))(*jax.vjp(f, q, k, v)))
    for a, r in zip(jax.tree.leaves(run(ours)(q, k, v)), jax.tree.leaves(run(ref)(q, k, v))):
      np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
  fixed = jax.__version_info__ >= (0, 11, 1)  # jax-ml/jax#39521, after 0.11.0
  assert set(fake_cudnn) == (set() if m == 1 else {kv_heads if fixed else h})


def test_model_hands_causal_self_attention_its_segments(monkeypatch, fake_cudnn):
  """A packed batch through a decoder with attention=cudnn, cudnn_segments=3 (cuDNN emulated)
  gives the einsum model's logits: the layers pass the row's segment ids and causality."""
  calls = []

  def stand_in(q, k, v, segment_ids, max_segments, dense):
    calls.append(max_segments)
    mask = attention_mask(segment_ids, segment_ids, causal=True)
    return cudnn_attention(q, k, v, segment_ids, max_segments, oracle(mask), causal=causal_stand_in)

  monkeypatch.setattr(model.layers, 'cudnn_attention', stand_in)
  mc = model_config(tiny_config().model, 40, 16)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 40, (4, 16)))
  seg = jnp.asarray(packed_rows(4, 16, rng, 2))
  ref = build_model(mc)
  params = ref.init(jax.random.PRNGKey(0), tokens)
  ours = build_model(dataclasses.replace(mc, attention='cudnn', cudnn_segments=3))
  np.testing.assert_allclose(ours.apply(params, tokens, segment_ids=seg),
                             ref.apply(params, tokens, segment_ids=seg), atol=1e-5)
  assert calls == [3] * mc.n_layers


@pytest.mark.parametrize('overrides', [dict(cudnn_segments=2), dict(attention='cudnn',
                                                                    cudnn_segments=-1)])
def test_cudnn_segments_refused_without_cudnn_or_negative(overrides):
  with pytest.raises(UserError, match='model.cudnn_segments'):
    model_config(tiny_config(**overrides).model, 40, 16)


@pytest.mark.parametrize('segments', [0, 1, 4])
def test_model_lowers_for_cuda_with_the_intended_kernels(segments, monkeypatch):
  """The decoder's gradient, lowered for CUDA from this CPU host (cuDNN's version and compute
  capability checks answered as on an H100 with cuDNN 9.10): the dense mask reaches cuDNN as a
  [b, 1, t, t] bias whose gradient the backward writes; with cudnn_segments the kernel that runs
  takes no bias, only (at M > 1) the [b, M] lengths and [b, M + 1] offsets, the masked kernel
  kept for batches with longer rows."""
  import jax._src.cudnn.fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(fa, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(fa, 'is_cuda_compute_capability_equal', lambda capability: capability == '9.0')
  c = tiny_config(attention='cudnn', cudnn_segments=segments, dtype='bfloat16', head_dim=64)
  model = build_model(model_config(c.model, 40, 128))
  tokens, seg = jnp.zeros((2, 128), jnp.int32), jnp.ones((2, 128), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  loss = lambda p: model.apply(p, tokens, segment_ids=seg).astype(jnp.float32).mean()
  hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call @__cudnn$fmha' in line]
  kinds = sorted({line.split('custom_call @__cudnn$')[1].split('(')[0] for line in calls})
  masked = ['fmhaScaleBiasSoftmax', 'fmhaScaleBiasSoftmaxBackward']
  assert kinds == (masked if not segments else sorted(masked + ['fmhaSoftmax', 'fmhaSoftmaxBackward']))
  bias = 'tensor<2x1x128x128xbf16>'
  assert all(bias in line for line in calls if 'Bias' in line)
  layout = ('tensor<2x4xi32>, tensor<2x4xi32>, tensor<2x5xi32>, tensor<2x5xi32>')
  unmasked = [line for line in calls if 'Bias' not in line]
  assert all(bias not in line and (layout in line) == (segments > 1) for line in unmasked)
