"""Transformer families assembled from model/layers.py: decoder-only (GPT) and encoder-only (BERT)."""
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import (Array, Block, LayerCache, Linear, attention_mask, norm, param_init,
                          sinusoidal_table)

# Named remat policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,            # recompute everything
    'dots': jax.checkpoint_policies.checkpoint_dots,             # keep every matmul output
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
}


def block_class(cfg: ModelConfig) -> type[nn.Module]:
  if cfg.remat == 'none':
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for decoding, in fixed-size buffers of `length` slots.

  All rows write the same slot each step (`index`); prompts are left-padded, so row b's tokens
  occupy slots start[b]..index-1 and the slots before start[b] are padding that is masked out.
  `layers` matches the parameter layout: a tuple of per-layer (k, v) pairs, or one (k, v) pair
  stacked on a leading layer axis when scan_layers (each k, v: [b, length, kv_heads, head_dim]).
  """
  layers: Any
  index: Array  # [] int32: the slot the next token is written to
  start: Array  # [b] int32: first slot of each row's real tokens

  @property
  def length(self) -> int:
    return jax.tree.leaves(self.layers)[0].shape[-3]


def init_cache(cfg: ModelConfig, start: Array, length: int) -> KVCache:
  """An empty cache of `length` slots for rows whose tokens begin at slot `start` [b]."""
  shape = (start.shape[0], length, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.n_layers, *shape)
  pair = lambda: (jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
  layers = pair() if cfg.scan_layers else tuple(pair() for _ in range(cfg.n_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32), start.astype(jnp.int32))


class _ScanBlock(nn.Module):
  """Adapts a block to nn.scan's (carry, inputs) -> (carry, outputs) signature; the layer's cache
  is the scanned input and its updated cache the scanned output."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache: LayerCache | None,
               cache_index: Array | None) -> tuple[Array, LayerCache | None]:
    block = block_class(self.cfg)(self.cfg, self.deterministic, name='block')
    return block(x, mask, positions, cache, cache_index)


class BlockStack(nn.Module):
  """n_layers blocks, as a Python loop or one nn.scan (compile time independent of depth).

  Returns the hidden states and the updated per-layer caches (None when not decoding).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache: Any = None,
               cache_index: Array | None = None) -> tuple[Array, Any]:
    c = self.cfg
    if c.scan_layers:
      scan = nn.scan(_ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                     in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.n_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
      return scan(c, self.deterministic, name='layers')(x, mask, positions, cache, cache_index)
    cls = block_class(c)
    new_cache = []
    for i in range(c.n_layers):
      x, layer_cache = cls(c, self.deterministic, name=f'layers_{i}')(
          x, mask, positions, None if cache is None else cache[i], cache_index)
      new_cache.append(layer_cache)
    return x, None if cache is None else tuple(new_cache)


class Decoder(nn.Module):
  """Decoder-only LM. tokens, positions, segment_ids: [b, t] -> logits [b, t, v] in f32.

  `features` returns the final hidden states so reward and value heads reuse the backbone.
  """
  cfg: ModelConfig
  deterministic: bool = True
  causal: ClassVar[bool] = True

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                          embedding_init=param_init(0.02, ('vocab', 'embed')), name='embed')
    if c.pos_encoding == 'learned':
      self.pos_embed = nn.Embed(c.max_len, c.d_model, dtype=c.compute_dtype,
                                param_dtype=c.weight_dtype,
                                embedding_init=param_init(0.02, ('length', 'embed')), name='pos_embed')
    if c.type_vocab_size:
      self.type_embed = nn.Embed(c.type_vocab_size, c.d_model, dtype=c.compute_dtype,
                                 param_dtype=c.weight_dtype,
                                 embedding_init=param_init(0.02, ('length', 'embed')), name='type_embed')
    if c.embed_norm:
      self.embed_norm = norm(c, 'embed_norm')
    self.embed_drop = nn.Dropout(c.embed_dropout, deterministic=self.deterministic)
    self.blocks = BlockStack(c, self.deterministic, name='blocks')
    if c.norm_position == 'pre':
      self.final_norm = norm(c, 'final_norm')
    if not c.tie_embeddings:
      self.lm_head = Linear((c.vocab_size,), ('embed', 'vocab'), dtype=c.compute_dtype,
                            param_dtype=c.weight_dtype, name='lm_head')

  def embed_tokens(self, tokens: Array, positions: Array) -> Array:
    c = self.cfg
    x = self.embed(tokens)
    if c.pos_encoding == 'learned':
      x = x + self.pos_embed(positions)
    elif c.pos_encoding == 'sinusoidal':
      x = x + sinusoidal_table(c.max_len, c.d_model)[positions].astype(x.dtype)
    if c.type_vocab_size:  # single-segment inputs: every token has type 0 (BERT's sentence A)
      x = x + self.type_embed(jnp.zeros_like(tokens))
    if c.embed_norm:
      x = self.embed_norm(x)
    x = self.embed_drop(x)
    return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))

  def head_norm(self, x: Array) -> Array:
    return self.final_norm(x) if self.cfg.norm_position == 'pre' else x

  def features(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    """Final hidden states [b, t, d]; causal for the decoder, bidirectional within each segment
    for the encoder (padding, segment 0, is seen by no real token)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    mask = attention_mask(segment_ids, segment_ids, causal=self.causal)
    x, _ = self.blocks(self.embed_tokens(tokens, positions), mask, positions)
    return self.head_norm(x)

  def decode(self, tokens: Array, positions: Array, cache: KVCache, last_only: bool = False,
             ) -> tuple[Array, KVCache]:
    """Runs t new tokens [b, t] at `positions` through the same layers, reading and extending the
    cache: prefill is t = prompt length, a decode step t = 1. Returns logits [b, t or 1, v] and
    the cache advanced by t slots. `last_only` computes logits for the last token only."""
    t = tokens.shape[1]
    slots = jnp.arange(cache.length)
    q_real = (cache.index + jnp.arange(t))[None, :] >= cache.start[:, None]  # [b, t]
    k_real = slots[None, :] >= cache.start[:, None]                         # [b, length]
    mask = attention_mask(q_real.astype(jnp.int32), k_real.astype(jnp.int32), causal=True,
                          q_offset=cache.index)
    x, layers = self.blocks(self.embed_tokens(tokens, positions), mask, positions, cache.layers,
                            cache.index)
    x = self.head_norm(x[:, -1:] if last_only else x)
    return self.logits(x), cache.replace(layers=layers, index=cache.index + t)

  def logits(self, x: Array) -> Array:
    """Output layer in f32: tied to the token embedding or a separate head."""
    if self.cfg.tie_embeddings:
      table = self.embed.embedding.astype(x.dtype)
      out = jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(x).astype(jnp.float32)
    return nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_vocab'))

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    return self.logits(self.features(tokens, positions, segment_ids))


def mean_pool(hidden: Array, segment_ids: Array) -> Array:
  """Sentence embeddings [b, d]: the mean of the hidden states of real tokens (segment > 0)."""
  real = (segment_ids > 0).astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * real).sum(1) / jnp.maximum(real.sum(1), 1.0)


class Encoder(Decoder):
  """Encoder-only (BERT): the decoder's layers with bidirectional attention within each segment.
  Its logits are the masked-LM head; `features` with `mean_pool` gives sentence embeddings."""
  causal: ClassVar[bool] = False


def build_model(cfg: ModelConfig, deterministic: bool = True) -> nn.Module:
  """The model for `cfg.family`."""
  return {'decoder': Decoder, 'encoder': Encoder}[cfg.family](cfg, deterministic)
