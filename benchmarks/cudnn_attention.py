"""cuDNN flash attention on packed rows: the dense segment mask against model.cudnn_segments (GPU only).

  python benchmarks/cudnn_attention.py                  # GPT-2 small's shape: 16 x 1024, 12 heads of 64

model.attention=cudnn alone hands jax.nn.dot_product_attention a dense [b, 1, t, s] segment mask,
which cuDNN reads as a bias (and, before JAX 0.11.1, writes its unused gradient: the installed JAX
decides which is timed). model.cudnn_segments=M tells cuDNN each row's documents instead
(model/cudnn.py): plain causal at M = 1, the packed layout (per row the length and offset of at
most M segments, Hopper and later) at M > 1, the mask for a batch with a longer row. Rows of 1-7
documents with padding, and rows of one document; for each variant the fwd+bwd time and the
relative error of the output and the three gradients on real (non-padding) positions against the
f32 einsum oracle.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from model import cudnn, layers

flags.DEFINE_integer('batch', 16, 'Rows.')
flags.DEFINE_integer('seq_len', 1024, 'Tokens per row.')
flags.DEFINE_integer('heads', 12, 'Attention heads.')
flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
flags.DEFINE_integer('repeats', 20, 'Timed calls of each variant.')


def cudnn_segments(q, k, v, segment_ids, max_segments: int):
  """model.cudnn_segments=M: plain causal (M = 1) or the packed layout, the mask past M segments."""
  masked = lambda q, k, v: cudnn_dense_mask(q, k, v, segment_ids)
  return cudnn.cudnn_attention(q, k, v, segment_ids, max_segments, masked)


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

  segments = lambda m: functools.partial(cudnn_segments, max_segments=m)
  variants = [('dense mask', cudnn_dense_mask, packed), ('packed M=8', segments(8), packed),
              ('packed M=t', segments(t), packed), ('dense mask, 1 doc', cudnn_dense_mask, single),
              ('causal M=1, 1 doc', segments(1), single), ('packed M=8, 1 doc', segments(8), single),
              ('causal only, 1 doc', cudnn_causal, single)]
  refs = {id(seg): jax.jit(lambda seg=seg: fwd_bwd(oracle, seg))() for seg in (packed, single)}
  print(f'{b} x {t} tokens, {h} heads of {d}, bf16; {jax.devices()[0].device_kind}, jax {jax.__version__}')
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
