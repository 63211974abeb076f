"""cuDNN flash attention on packed rows without a dense mask (model.cudnn_segments = M > 0).

model.attention=cudnn alone hands jax.nn.dot_product_attention the [b, 1, t, s] segment mask,
which cuDNN reads as a bias: it is read in both passes, and before JAX 0.11.1 (the last for
Python 3.11 is 0.10) the backward also writes its gradient, the same size, which nothing uses.
Here causal self-attention gives cuDNN the row's documents instead:
  M = 1: plain causal attention (every row one document, the GPT-2 benchmark's batches);
  M > 1: cuDNN's packed layout, each row's length and offset of at most M contiguous segments
         (jax._src.cudnn's q_seqlen / q_offsets; Hopper or later).
Padding (segment 0) is one more segment, attending to itself as in attention_mask. A batch with a
row of more than M segments takes the dense mask instead (lax.cond), so the result is always the
mask's; only the speed depends on M. Both branches are compiled, and the backward's residuals
are their union (the kernel path also keeps a zero [b, 1, t, s] bias): benchmarks/cudnn_attention.py
times 'causal M=1' against cuDNN's causal kernel alone to show what that costs.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def packed_segments(segment_ids: Array, max_segments: int) -> tuple[Array, Array, Array]:
  """(lengths [b, M], offsets [b, M + 1], overflow []) of each row's contiguous runs of one
  segment id, -1 past the last run: cuDNN's packed layout. `overflow`: some row has more than M."""
  b, t = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  idx = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=t)[0])(starts)
  idx = idx.astype(jnp.int32)
  lengths = jnp.where(idx[:, :-1] < t, idx[:, 1:] - idx[:, :-1], -1)
  offsets = jnp.where(idx < t, idx, -1)
  return lengths, offsets, (starts.sum(axis=1) > max_segments).any()


# JAX before 0.11.1 strides packed key offsets by the query's head count: wrong keys under GQA/MQA,
# silently (jax-ml/jax#39521). Python 3.11 stops at JAX 0.10, so the keys get one head per query.
PACKED_GQA_FIXED = (0, 11, 1)


def packed_kernel(q: Array, k: Array, v: Array, lengths: Array, offsets: Array) -> Array:
  """cuDNN's causal flash attention within each row's segments (private JAX API, as axlearn)."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  groups = q.shape[2] // k.shape[2]
  if groups > 1 and jax.__version_info__ < PACKED_GQA_FIXED:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                               kv_offsets=offsets, scale=1 / math.sqrt(q.shape[-1]),
                               mask_type=MaskType.CAUSAL, qkv_layout='BTNH')


def causal_kernel(q: Array, k: Array, v: Array) -> Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array, max_segments: int,
                    dense: Callable[[Array, Array, Array], Array],
                    packed: Callable = packed_kernel, causal: Callable = causal_kernel) -> Array:
  """Causal self-attention, q: [b, t, h, k]; k, v: [b, t, g, k]; segment_ids: [b, t] -> [b, t, h, k],
  equal to `dense(q, k, v)`, attention under attention_mask(segment_ids, segment_ids, causal=True),
  which runs instead when a row has more than `max_segments` segments. The kernels are arguments
  so that tests can stand in for cuDNN off GPU."""
  lengths, offsets, overflow = packed_segments(segment_ids, max_segments)
  if max_segments == 1:
    fast = causal
  else:
    fast = lambda q, k, v: packed(q, k, v, lengths, offsets)
  return jax.lax.cond(overflow, dense, fast, q, k, v)
