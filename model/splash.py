"""Splash attention: JAX's Pallas TPU flash-attention kernel with block-sparse masks
(jax.experimental.pallas.ops.tpu.splash_attention) for full-sequence self-attention.

The kernel sees one sequence at a time: q [h, t, k], k and v [g, t, k], query head i reading kv
head i // (h / g), the grouping einsum_attention uses (GQA, MQA at g = 1). It takes the logits as
q·k, unscaled, so the queries are scaled by 1/sqrt(k) here; its soft-cap, cap·tanh(logits / cap),
then applies to the scaled logits as in einsum_attention. Packed documents are its segment ids
(the same-segment rule of attention_mask) and causality its static CausalMask, whose fully masked
blocks it skips. Tiles must be multiples of 128 positions, so the length must be one too.

It runs under jax.shard_map: rows over the batch axes and heads over the head axis of the mesh in
context (resolved through the logical-axis rules), each device running the kernel on its shard.
Off TPU (CPU, GPU) the kernel runs in Pallas' interpret mode: exact, slow, for tests.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from model.errors import UserError
from model.sharding import mesh_axes

Array = jax.Array
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; the kernel needs multiples of 128


def block_size(length: int) -> int:
  """The largest tile in BLOCKS that divides the sequence length."""
  for block in BLOCKS:
    if length % block == 0:
      return block
  raise UserError(f'model.attention=splash needs a sequence length that is a multiple of 128, got '
                  f'{length}; change train.seq_len or use model.attention=einsum')


def on_tpu() -> bool:
  """Whether the kernel compiles for TPU: the platform of the mesh in context (a TPU topology when
  compiling ahead of time from a CPU host), else of the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return (device.platform if device is not None else jax.default_backend()) == 'tpu'


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool,
                     cap: float = 0.0) -> Array:
  """q: [b, t, h, k]; k, v: [b, t, g, k]; segment_ids: [b, t] -> [b, t, h, k], equal to
  einsum_attention under attention_mask(segment_ids, segment_ids, causal) and soft-cap `cap`."""
  b, t, h, dk = q.shape
  blocks = splash.BlockSizes(*(block_size(t),) * 8)  # forward, dkv and dq tiles all alike
  interpret = not on_tpu()

  def local(q: Array, k: Array, v: Array, segments: Array) -> Array:
    mask = (splash.CausalMask if causal else splash.FullMask)((t, t))
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * q.shape[2]), block_sizes=blocks, head_shards=1,
        q_seq_shards=1, attn_logits_soft_cap=cap or None, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b, t, heads, k] -> [b, heads, t, k]
    run = lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s))
    return heads_first(jax.vmap(run)(heads_first(q), heads_first(k), heads_first(v), segments))

  q = (q * (1.0 / math.sqrt(dk))).astype(q.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segment_ids)

  rows, heads = mesh_axes('act_batch', b) or None, mesh_axes('act_heads', h) or None
  if (mesh_axes('act_kv_heads', k.shape[2]) or None) != heads:  # query head i must find kv head i // r locally
    heads = None
  spec = P(rows, None, heads, None)  # of q, k, v and the output
  # check_vma=False: the kernel's pallas_call declares no varying mesh axes for its outputs.
  return jax.shard_map(local, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                       check_vma=False)(q, k, v, segment_ids)
