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
from jax.ad_checkpoint import checkpoint_name

from model.config import ModelConfig
from model.cudnn import cudnn_attention
from model.moe import MoeMlp
from model.sharding import param_init, zeros_init
from model.splash import splash_attention

Array = jax.Array
NEG_INF = -1e30  # large finite: fully masked rows stay finite in f32 softmax


class Linear(nn.Module):
  """x @ kernel (+ bias) contracting the last `n_in` axes of x; the kernel has its full shape and
  logical names from the start (nn.DenseGeneral reshapes a flat kernel, which breaks the names).

  With `lora_rank` > 0 a low-rank adapter adds (alpha / rank) · x @ lora_a @ lora_b. The adapter
  lives in the separate 'lora' variable collection, so the base weights ('params') stay frozen
  and untouched: applying without the 'lora' collection is the base model exactly (the reference
  policy in RLHF), and lora_b starts at zero so the adapted model starts equal to the base.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]           # logical names of the kernel: input axes then output axes
  n_in: int = 1
  stddev: float = 0.02
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[-self.n_in:]
    kernel = self.param('kernel', param_init(self.stddev, self.axes), (*in_shape, *self.features),
                        self.param_dtype)
    x = x.astype(self.dtype)
    y = contract(x, kernel.astype(self.dtype), self.n_in)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.axes[self.n_in:]), self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank and (self.is_initializing() or self.has_variable('lora', 'lora_a')):
      y = y + self.adapter(x, in_shape)
    return y

  def adapter(self, x: Array, in_shape: tuple[int, ...]) -> Array:
    r, n_in = self.lora_rank, self.n_in
    fan_in = math.prod(in_shape)
    a_init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / math.sqrt(fan_in)),
                                          (*self.axes[:n_in], None))
    b_init = zeros_init((None, *self.axes[n_in:]))
    a = self.variable('lora', 'lora_a', lambda: a_init(self.make_rng('params'), (*in_shape, r),
                                                       self.param_dtype)).value
    b = self.variable('lora', 'lora_b', lambda: b_init(self.make_rng('params'), (r, *self.features),
                                                       self.param_dtype)).value
    low = contract(x, a.astype(self.dtype), n_in)
    return contract(low, b.astype(self.dtype), 1) * (self.lora_alpha / r)


def contract(x: Array, w: Array, n: int) -> Array:
  """Contract the last n axes of x with the first n axes of w. The result is named 'proj' for
  the remat policies: dot-saving policies cannot see a matmul inside a custom VJP."""
  return checkpoint_name(_contract(x, w, n), 'proj')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(x: Array, w: Array, n: int) -> Array:
  """contract's matmul. Its gradient is written out (autodiff's math) for one reason: the weight
  gradient x^T·g sums over the token axes, and XLA's CPU dot wants those axes in the inner
  position of its left operand, so it materialises a transposed copy of that operand. Autodiff
  always puts the output gradient g on the left; when g is the wider one (the MLP's up
  projection, 4x wider than x) that copy is 4x larger and gets fused into the GELU backward,
  which then writes strided (12% of a step at nanoGPT's 6-layer shape). Putting the narrower
  operand on the left makes the copy the small one. Accelerators lay out dots freely.
  """
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _contract_fwd(x: Array, w: Array, n: int) -> tuple[Array, tuple[Array, Array]]:
  return _contract(x, w, n), (x, w)


def _contract_bwd(n: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = res
  lead = tuple(range(x.ndim - n))                     # token axes, shared by x and g
  w_out = tuple(range(n, w.ndim))
  dx = jax.lax.dot_general(g, w, ((tuple(range(len(lead), g.ndim)), w_out), ((), ())))
  if math.prod(x.shape[len(lead):]) <= math.prod(g.shape[len(lead):]):
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))             # [*in, *out]
  else:
    dw_t = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))           # [*out, *in]
    n_out = g.ndim - len(lead)
    dw = jnp.transpose(dw_t, (*range(n_out, dw_t.ndim), *range(n_out)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_contract.defvjp(_contract_fwd, _contract_bwd)


def linear(cfg: ModelConfig, features: tuple[int, ...], axes: tuple[str, ...], *, name: str,
           **kw: Any) -> Linear:
  """A projection of the model with the config's dtypes and bias, and a LoRA adapter when `name`
  (query, key, value, out, gate, up, down) is one of `cfg.lora_targets`.

  Every such projection maps a width to a width, so under µP its init std is scaled by
  cfg.init_scale (1/sqrt(width_mult): variance ∝ 1/fan-in, times the base width's tuned
  multiplier); its Adam learning rate by 1/width_mult is train/state.py's."""
  rank = cfg.lora_rank if name in cfg.lora_targets else 0
  stddev = kw.pop('stddev', 0.02) * cfg.init_scale
  return Linear(features, axes, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype, lora_rank=rank, lora_alpha=cfg.lora_alpha, name=name,
                stddev=stddev, **kw)


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


def relative_bucket(relative: Array, causal: bool, n_buckets: int, max_distance: int) -> Array:
  """T5's bucket of each relative position (key position - query position), as Hugging Face's
  T5Attention._relative_position_bucket: distances below half the buckets get one each, longer
  ones share log-spaced buckets up to `max_distance`. Bidirectional (encoder) splits the buckets
  between keys before and after the query; causal (decoder) only has keys before it."""
  if causal:
    bucket, distance = 0, jnp.maximum(-relative, 0)
  else:
    n_buckets //= 2
    bucket, distance = jnp.where(relative > 0, n_buckets, 0), jnp.abs(relative)
  exact = n_buckets // 2
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
               / math.log(max_distance / exact))
  far = jnp.minimum(exact + (log_ratio * (n_buckets - exact)).astype(relative.dtype), n_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, far)


class RelativeBias(nn.Module):
  """T5's relative position bias: a learned scalar per (bucket, head), computed once per stack and
  added to the self-attention logits of every layer. Positions [b, t] and [b, s] -> [b, h, t, s] f32."""
  cfg: ModelConfig
  causal: bool

  @nn.compact
  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    c = self.cfg
    table = self.param('embedding', param_init(0.02, (None, 'heads')),
                       (c.relative_buckets, c.n_heads), c.weight_dtype)
    buckets = relative_bucket(k_positions[:, None, :] - q_positions[:, :, None], self.causal,
                              c.relative_buckets, c.relative_max_distance)
    return jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 1)


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

def softcap(x: Array, cap: float) -> Array:
  """cap·tanh(x / cap) (Gemma 2): about x for |x| << cap, never beyond ±cap; 0 = off."""
  return cap * jnp.tanh(x / cap) if cap else x


def attention_logits(q: Array, k: Array, mask: Array, bias: Array | None = None,
                     cap: float = 0.0) -> Array:
  """Scaled, biased, soft-capped and masked f32 logits [b, g, r, t, s] (q grouped per kv head)."""
  b, t, h, dk = q.shape
  g = k.shape[2]
  q = q.reshape(b, t, g, h // g, dk)
  logits = jnp.einsum('btgrk,bsgk->bgrts', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(dk).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], g, h // g, t, bias.shape[-1])
  return jnp.where(mask[:, :, None], softcap(logits, cap), NEG_INF)


def einsum_attention(q: Array, k: Array, v: Array, mask: Array, dropout: Callable[[Array], Array],
                     bias: Array | None = None, cap: float = 0.0) -> Array:
  """Reference attention (the oracle): f32 logits and softmax, GQA by grouping query heads.

  q: [b, t, h, k]; k, v: [b, s, g, k]; mask: [b, 1, t, s]; bias: [1 or b, h, t, s] added to the
  scaled logits (relative positions); `cap` soft-caps them -> [b, t, h, k].
  """
  b, t, h, dk = q.shape
  logits = attention_logits(q, k, mask, bias, cap)
  probs = dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v)
  return out.reshape(b, t, h, dk)


def fused_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str,
                    bias: Array | None = None, causal: bool = False) -> Array:
  """jax.nn.dot_product_attention (XLA or cuDNN kernels); same contract as einsum_attention (the
  kernels take the bias in the compute dtype).

  `causal` promises that `mask` already hides every key after its query (aligned at the top left,
  i.e. no KV cache): cuDNN then skips the masked-out blocks instead of computing and discarding
  them. It never changes the result (mask AND causal = mask); XLA would only build a second mask.
  """
  bias = None if bias is None else bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation,
                                      is_causal=causal and implementation == 'cudnn')


LayerCache = tuple[Array, Array]  # one layer's keys and values, each [b, s, g, k]
# A decoding layer's cache: its self-attention (k, v); a cross stack's layer holds (self (k, v),
# cross (k, v) or None before the prefill projects the encoder output).
BlockCache = LayerCache | tuple[LayerCache, LayerCache | None]


class Attention(nn.Module):
  """Multi-head attention with MHA/GQA/MQA, RoPE, and self- or cross-attention inputs.

  With `cache` (decoding), the new keys and values are written at slot `cache_index` and the queries
  attend over the whole cache (`mask` hides empty and padded slots). Prefill and decode are this
  same call with t = prompt length or t = 1. `kv` gives keys and values projected before (a
  decoder's cross-attention over the encoder output, projected once at prefill). `bias`
  [1 or b, h, t, s] is added to the logits (T5's relative positions). `segment_ids` [b, t] are
  the segments `mask` was built from, given for full-sequence self-attention: model.attention=
  splash runs its kernel on them, and is the einsum oracle without them (decoding with a cache,
  cross-attention). Returns the output and the keys and values attended over (the updated cache
  when decoding).
  """
  cfg: ModelConfig
  deterministic: bool = True
  causal: bool = False  # self-attention whose mask is causal: a kernel hint (see fused_attention)

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array | None,
               kv_input: Array | None = None, cache: LayerCache | None = None,
               cache_index: Array | None = None, bias: Array | None = None,
               kv: LayerCache | None = None, segment_ids: Array | None = None
               ) -> tuple[Array, LayerCache]:
    c = self.cfg
    dense = functools.partial(linear, c)
    q = dense((c.n_heads, c.head_dim), ('embed', 'heads', 'head_dim'), name='query')(x)
    if kv is None:
      kv_input = x if kv_input is None else kv_input
      k = dense((c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), name='key')(kv_input)
      v = dense((c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'), name='value')(kv_input)
    else:
      k, v = kv
    if c.qk_norm:  # per head over head_dim; cross-attention keys given in `kv` are normed already
      q = head_norm(c, 'query_norm')(q)
      k = k if kv is not None else head_norm(c, 'key_norm')(k)
    if c.pos_encoding == 'rope' and positions is not None:
      q = apply_rope(q, positions, c.rope_theta)
      k = apply_rope(k, positions, c.rope_theta)
    if cache is not None:
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                   cache_index, axis=1)
      k, v = (write(cache[0], k), write(cache[1], v))
    q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('act_batch', 'act_length', 'act_kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('act_batch', 'act_length', 'act_kv_heads', 'head_dim'))
    if self.is_mutable_collection('intermediates'):  # run statistics (train/stats.py) only
      self.sow('intermediates', 'logit_max', attention_logits(q, k, mask, bias, c.attn_softcap).max())
    if c.attention == 'splash' and segment_ids is not None and cache is None:
      out = splash_attention(q, k, v, segment_ids, self.causal, c.attn_softcap)
    elif (c.attention == 'cudnn' and c.cudnn_segments and segment_ids is not None and cache is None
          and self.causal and bias is None):
      masked = functools.partial(fused_attention, mask=mask, implementation=c.attention, causal=True)
      out = cudnn_attention(q, k, v, segment_ids, c.cudnn_segments, masked)
    elif c.attention in ('einsum', 'splash'):
      drop = nn.Dropout(c.attn_dropout, deterministic=self.deterministic)
      out = einsum_attention(q, k, v, mask, drop, bias, c.attn_softcap)
    else:
      out = fused_attention(q, k, v, mask, c.attention, bias, self.causal and cache is None)
    out = nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_heads', 'head_dim'))
    out = dense((c.d_model,), ('heads', 'head_dim', 'embed'), n_in=2,
                stddev=0.02 / math.sqrt(2 * c.n_layers), name='out')(out)
    return out, (k, v)


# ---- feed-forward ------------------------------------------------------------------------------

class Mlp(nn.Module):
  """Position-wise feed-forward: ReLU, GELU (tanh approximation as GPT-2, exact erf as BERT), SwiGLU."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.cfg
    dense = functools.partial(linear, c)
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


def head_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """QK-norm: RMSNorm over each head's head_dim with a learned scale (OLMo 2, Gemma 3), keeping
  attention logits bounded however large the projections grow."""
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ('head_dim',))
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                    scale_init=scale, name=name)


class Block(nn.Module):
  """One residual block: self-attention, then (when `cross`: the encoder-decoder's decoder)
  attention over the encoder output `encoded` [b, s, d] under `cross_mask` [b, 1, t, s], then MLP;
  each sublayer with norm and dropout, pre- or post-norm. `bias` goes to the self-attention logits.

  Returns the new hidden states and the layer's updated cache (None when not decoding); a
  decoding cross layer projects `encoded` to keys and values once, when its cache has none yet.
  `segment_ids` [b, t] (full-sequence passes only) go to the self-attention (see Attention).
  """
  cfg: ModelConfig
  deterministic: bool = True
  cross: bool = False
  causal: bool = False  # the self-attention mask is causal (decoder stacks)

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array | None,
               cache: BlockCache | None = None, cache_index: Array | None = None,
               bias: Array | None = None, encoded: Array | None = None,
               cross_mask: Array | None = None, segment_ids: Array | None = None
               ) -> tuple[Array, BlockCache | None]:
    c = self.cfg
    drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
    pre = c.norm_position == 'pre'

    def sublayer_input(name: str, h: Array) -> Array:  # pre-norm: the sublayer reads norm(h)
      return norm(c, name)(h) if pre else h

    def residual(name: str, h: Array, y: Array) -> Array:  # post-norm: norm(h + y)
      return h + drop(y) if pre else norm(c, name)(h + drop(y))

    decoding = cache is not None
    self_cache, cross_kv = cache if decoding and self.cross else (cache, None)
    y, self_cache = Attention(c, self.deterministic, self.causal, name='attn')(
        sublayer_input('attn_norm', x), mask, positions, cache=self_cache, cache_index=cache_index,
        bias=bias, segment_ids=segment_ids)
    x = residual('attn_norm', x, y)
    if self.cross:
      y, cross_kv = Attention(c, self.deterministic, name='cross_attn')(
          sublayer_input('cross_norm', x), cross_mask, None, kv_input=encoded, kv=cross_kv)
      x = residual('cross_norm', x, y)
    mlp = MoeMlp(c, name='mlp') if c.mlp == 'moe' else Mlp(c, name='mlp')
    x = residual('mlp_norm', x, mlp(sublayer_input('mlp_norm', x)))
    if decoding:
      cache = (self_cache, cross_kv) if self.cross else self_cache
    if self.is_mutable_collection('intermediates'):  # run statistics (train/stats.py) only
      self.sow('intermediates', 'act_rms', jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
    return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed')), cache
