"""Transformer building blocks shared by every model family.

Einsum letters: b batch, t query length, s key length, d embed, h query heads, g kv heads,
r query heads per kv head (h = g·r), k head dim, f mlp hidden, v vocab.
Every parameter carries logical axis names; train/mesh.py maps them onto the device mesh.
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig

Array = jax.Array
Init = Callable[..., Array]
NEG_INF = -1e30  # large finite: fully masked rows stay finite in f32 softmax


def param_init(stddev: float, axes: tuple[str, ...]) -> Init:
  """GPT-2 style normal init, annotated with logical axes."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros_init(axes: tuple[str, ...]) -> Init:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Linear(nn.Module):
  """x @ kernel (+ bias) contracting the last `n_in` axes of x; the kernel has its full shape and
  logical names from the start (nn.DenseGeneral reshapes a flat kernel, which breaks the names)."""
  features: tuple[int, ...]
  axes: tuple[str, ...]           # logical names of the kernel: input axes then output axes
  n_in: int = 1
  stddev: float = 0.02
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[-self.n_in:]
    kernel = self.param('kernel', param_init(self.stddev, self.axes), (*in_shape, *self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.axes[self.n_in:]), self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# ---- positions ---------------------------------------------------------------------------------

def sinusoidal_table(max_len: int, d: int) -> Array:
  """[max_len, d] table of Vaswani et al. (sin on even dims, cos on odd dims)."""
  pos = jnp.arange(max_len, dtype=jnp.float32)[:, None]
  inv = jnp.exp(-math.log(10000.0) * jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  table = jnp.zeros((max_len, d), jnp.float32)
  table = table.at[:, 0::2].set(jnp.sin(pos * inv))
  return table.at[:, 1::2].set(jnp.cos(pos * inv[: d // 2]))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half convention (as Hugging Face llama). x: [b, t, heads, k]."""
  k = x.shape[-1]
  inv = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angle = positions[..., None].astype(jnp.float32) * inv  # [b, t, k/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# ---- masks -------------------------------------------------------------------------------------

def attention_mask(q_segments: Array, k_segments: Array, causal: bool,
                   q_offset: Array | int = 0) -> Array:
  """[b, 1, t, s] bool: same segment (packed documents never see each other), and s <= t if causal.

  Padding has segment 0 and attends only to padding, so no row is empty. `q_offset` is the key slot
  of the first query: with a KV cache the t new queries sit at slots q_offset..q_offset+t-1.
  """
  mask = q_segments[:, :, None] == k_segments[:, None, :]
  if causal:
    t, s = q_segments.shape[1], k_segments.shape[1]
    mask &= (jnp.arange(t) + q_offset)[:, None] >= jnp.arange(s)[None, :]
  return mask[:, None]


# ---- attention ---------------------------------------------------------------------------------

def einsum_attention(q: Array, k: Array, v: Array, mask: Array, dropout: Callable[[Array], Array],
                     ) -> Array:
  """Reference attention (the oracle): f32 logits and softmax, GQA by grouping query heads.

  q: [b, t, h, k]; k, v: [b, s, g, k]; mask: [b, 1, t, s] -> [b, t, h, k].
  """
  b, t, h, dk = q.shape
  g = k.shape[2]
  q = q.reshape(b, t, g, h // g, dk)
  logits = jnp.einsum('btgrk,bsgk->bgrts', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(dk).astype(jnp.float32)
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  probs = dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v)
  return out.reshape(b, t, h, dk)


def fused_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str) -> Array:
  """jax.nn.dot_product_attention (XLA or cuDNN kernels); same contract as einsum_attention."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


LayerCache = tuple[Array, Array]  # one layer's keys and values, each [b, s, g, k]


class Attention(nn.Module):
  """Multi-head attention with MHA/GQA/MQA, RoPE, and self- or cross-attention inputs.

  With `cache` (decoding), the new keys and values are written at slot `cache_index` and the queries
  attend over the whole cache (`mask` hides empty and padded slots); the updated cache is returned.
  Prefill and decode are this same call with t = prompt length or t = 1.
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array | None,
               kv_input: Array | None = None, cache: LayerCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, LayerCache | None]:
    c = self.cfg
    dense = functools.partial(Linear, use_bias=c.use_bias, dtype=c.compute_dtype,
                              param_dtype=c.weight_dtype)
    kv_input = x if kv_input is None else kv_input
    q = dense((c.n_heads, c.head_dim), ('embed', 'heads', 'head_dim'), name='query')(x)
    k = dense((c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), name='key')(kv_input)
    v = dense((c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), name='value')(kv_input)
    if c.pos_encoding == 'rope' and positions is not None:
      q = apply_rope(q, positions, c.rope_theta)
      k = apply_rope(k, positions, c.rope_theta)
    if cache is not None:
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                   cache_index, axis=1)
      k, v = cache = (write(cache[0], k), write(cache[1], v))
    q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('act_batch', 'act_length', 'act_kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('act_batch', 'act_length', 'act_kv_heads', 'head_dim'))
    if c.attention == 'einsum':
      drop = nn.Dropout(c.attn_dropout, deterministic=self.deterministic)
      out = einsum_attention(q, k, v, mask, drop)
    else:
      out = fused_attention(q, k, v, mask, c.attention)
    out = nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_heads', 'head_dim'))
    out = dense((c.d_model,), ('heads', 'head_dim', 'embed'), n_in=2,
                stddev=0.02 / math.sqrt(2 * c.n_layers), name='out')(out)
    return out, cache


# ---- feed-forward ------------------------------------------------------------------------------

class Mlp(nn.Module):
  """Position-wise feed-forward: ReLU, GELU (tanh approximation as GPT-2, exact erf as BERT), SwiGLU."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.cfg
    dense = functools.partial(Linear, use_bias=c.use_bias, dtype=c.compute_dtype,
                              param_dtype=c.weight_dtype)
    up = functools.partial(dense, (c.d_ff,), ('embed', 'mlp'))
    if c.mlp == 'swiglu':
      h = nn.silu(up(name='gate')(x)) * up(name='up')(x)
    else:
      act = {'relu': nn.relu, 'gelu': functools.partial(nn.gelu, approximate=True),
             'gelu_exact': functools.partial(nn.gelu, approximate=False)}[c.mlp]
      h = act(up(name='up')(x))
    h = nn.with_logical_constraint(h, ('act_batch', 'act_length', 'act_mlp'))
    return dense((c.d_model,), ('mlp', 'embed'), stddev=0.02 / math.sqrt(2 * c.n_layers),
                 name='down')(h)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """RMSNorm or LayerNorm; statistics in f32 whatever the compute dtype."""
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',))
  kw: dict[str, Any] = dict(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype, scale_init=scale, name=name)
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(**kw)
  return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=zeros_init(('embed',)), **kw)


class Block(nn.Module):
  """One residual block: attention then MLP, each with norm and dropout, pre- or post-norm.

  Returns the new hidden states and the layer's updated KV cache (None when not decoding).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array | None,
               cache: LayerCache | None = None, cache_index: Array | None = None,
               ) -> tuple[Array, LayerCache | None]:
    c = self.cfg
    drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
    attn = functools.partial(Attention(c, self.deterministic, name='attn'), cache=cache,
                             cache_index=cache_index)
    mlp = Mlp(c, name='mlp')
    if c.norm_position == 'pre':
      y, cache = attn(norm(c, 'attn_norm')(x), mask, positions)
      x = x + drop(y)
      x = x + drop(mlp(norm(c, 'mlp_norm')(x)))
    else:
      y, cache = attn(x, mask, positions)
      x = norm(c, 'attn_norm')(x + drop(y))
      x = norm(c, 'mlp_norm')(x + drop(mlp(x)))
    return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed')), cache
