"""cuDNN flash attention on packed rows, three ways, against the f32 einsum oracle (GPU only).

  python benchmarks/cudnn_attention.py                  # GPT-2 small's shape: 16 x 1024, 12 heads of 64

model.attention=cudnn hands jax.nn.dot_product_attention a dense [b, 1, t, s] segment mask, which
cuDNN reads as a bias. Two alternatives: cuDNN's packed layout (per row, the length and offset of
each of at most M segments: jax._src.cudnn's q_seqlen/q_offsets, Hopper and later), and a plain
causal mask (right only when every row is one document). For each, the fwd+bwd time and the
relative error of the output and the three gradients on real (non-padding) positions.
"""
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from model import layers

flags.DEFINE_integer('batch', 16, 'Rows.')
flags.DEFINE_integer('seq_len', 1024, 'Tokens per row.')
flags.DEFINE_integer('heads', 12, 'Attention heads.')
flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
flags.DEFINE_integer('repeats', 20, 'Timed calls of each variant.')


def packed_segments(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """(lengths [b, M], offsets [b, M + 1]) of each row's contiguous segments, -1 past the last: the
  packed layout cuDNN takes. Padding (segment 0) is one more segment, as in attention_mask."""
  b, t = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  idx = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=t)[0])(starts)
  idx = idx.astype(jnp.int32)
  lengths = jnp.where(idx[:, :-1] < t, idx[:, 1:] - idx[:, :-1], -1).astype(jnp.int32)
  return lengths, jnp.where(idx < t, idx, -1).astype(jnp.int32)


def cudnn_packed(q, k, v, segment_ids, max_segments: int):
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  lengths, offsets = packed_segments(segment_ids, max_segments)
  return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                               kv_offsets=offsets, scale=1 / math.sqrt(q.shape[-1]),
                               mask_type=MaskType.CAUSAL, qkv_layout='BTNH')


def cudnn_dense_mask(q, k, v, segment_ids):
  mask = layers.attention_mask(segment_ids, segment_ids, causal=True)
  return layers.fused_attention(q, k, v, mask, 'cudnn', None, causal=True)


def cudnn_causal(q, k, v, segment_ids):
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn', is_causal=True)


def oracle(q, k, v, segment_ids):
  f32 = lambda x: x.astype(jnp.float32)
  mask = layers.attention_mask(segment_ids, segment_ids, causal=True)
  return layers.einsum_attention(f32(q), f32(k), f32(v), mask, lambda p: p)


def random_segments(b: int, t: int, rng: np.random.Generator) -> np.ndarray:
  """Row r holds 1 + r % 7 documents; every third row ends in padding."""
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    n = 1 + r % 7
    cuts = sorted(rng.choice(np.arange(16, t - 16), n - 1, replace=False)) if n > 1 else []
    bounds = [0, *cuts, t - (r % 3) * (t // 10)]
    for i in range(n):
      seg[r, bounds[i]:bounds[i + 1]] = i + 1
  return seg


def main(_):
  F = flags.FLAGS
  if jax.devices()[0].platform != 'gpu':
    raise SystemExit('benchmarks/cudnn_attention.py needs an NVIDIA GPU (cuDNN); this machine has '
                     f'{jax.devices()[0].platform}')
  b, t, h, d = F.batch, F.seq_len, F.heads, F.head_dim
  q, k, v, g = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16)
                for key in jax.random.split(jax.random.key(0), 4))
  packed = jnp.asarray(random_segments(b, t, np.random.default_rng(0)))
  single = jnp.ones((b, t), jnp.int32)

  def fwd_bwd(fn, seg):
    out, back = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *back(g.astype(out.dtype)))

  variants = [('dense mask', cudnn_dense_mask, packed), ('packed M=8', functools.partial(
      cudnn_packed, max_segments=8), packed), ('packed M=t', functools.partial(
      cudnn_packed, max_segments=t), packed), ('dense mask, 1 doc', cudnn_dense_mask, single),
      ('packed M=8, 1 doc', functools.partial(cudnn_packed, max_segments=8), single),
      ('causal only, 1 doc', cudnn_causal, single)]
  refs = {id(seg): jax.jit(lambda seg=seg: fwd_bwd(oracle, seg))() for seg in (packed, single)}
  print(f'{b} x {t} tokens, {h} heads of {d}, bf16; {jax.devices()[0].device_kind}')
  for name, fn, seg in variants:
    try:
      step = jax.jit(lambda fn=fn, seg=seg: fwd_bwd(fn, seg))
      got = step()
      real = (seg > 0)[:, :, None, None]
      errors = [float(jnp.linalg.norm(jnp.where(real, a.astype(jnp.float32) - r, 0))
                      / jnp.linalg.norm(jnp.where(real, r, 0))) for a, r in zip(got, refs[id(seg)])]
      jax.block_until_ready(step())
      start = time.perf_counter()
      for _ in range(F.repeats):
        out = step()
      jax.block_until_ready(out)
      ms = (time.perf_counter() - start) / F.repeats * 1e3
      print(f'{name:20s} fwd+bwd {ms:7.3f} ms   rel. error out/dq/dk/dv '
            + ' '.join(f'{e:.1e}' for e in errors))
    except Exception as e:  # a layout this cuDNN or GPU does not support: say so, go on
      print(f'{name:20s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}')


if __name__ == '__main__':
  app.run(main)
