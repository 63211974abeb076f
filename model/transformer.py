"""Transformer families assembled from model/layers.py: decoder-only (GPT), encoder-only (BERT) and
encoder-decoder (T5), all on the one Decoder class and its BlockStack."""
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import (Array, Block, BlockCache, Linear, RelativeBias, attention_mask, norm,
                          param_init, sinusoidal_table, softcap)

_SAVE_PROJ = jax.checkpoint_policies.save_only_these_names('proj')
# Named remat policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,            # recompute everything
    # keep every matmul output / only weight matmuls ('proj': model.layers.contract's outputs)
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _SAVE_PROJ),
    'dots_no_batch': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _SAVE_PROJ),
}


@jax.custom_vjp
def tied_logits(x: Array, table: Array) -> Array:
  """x [b, t, d] times the embedding table [v, d] -> f32 logits [b, t, v], accumulated in f32.

  Autodiff would take the f32 output gradient into both backward matmuls, casting the table up:
  f32 GEMMs over the whole vocabulary, two thirds of the head's FLOPs (GPT-2 small compiled for
  an H100: both ran in f32 on [16384, 50304] gradients). Here the gradient is cast to x's dtype
  first, as it would be after a head computed in that dtype; in f32 this is autodiff's math."""
  return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x: Array, table: Array) -> tuple[Array, tuple[Array, Array]]:
  return tied_logits(x, table), (x, table)


def _tied_logits_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, table = res
  g = g.astype(x.dtype)
  dx = jnp.einsum('btv,vd->btd', g, table, preferred_element_type=jnp.float32)
  dtable = jnp.einsum('btv,btd->vd', g, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dtable.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def block_class(cfg: ModelConfig) -> type[nn.Module]:
  if cfg.remat == 'none':
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


@flax.struct.dataclass
class Encoded:
  """An encoder's output, computed once per input and read by every decoder layer's cross-attention."""
  hidden: Array       # [b, s, d]
  segment_ids: Array  # [b, s]; decoder tokens attend to encoder tokens of their own segment


def cross_inputs(encoded: Encoded | None, q_segments: Array) -> tuple[Array | None, Array | None]:
  """(encoder states, cross-attention mask [b, 1, t, s]) for decoder queries of `q_segments`
  [b, t]; (None, None) for the families without an encoder."""
  if encoded is None:
    return None, None
  return encoded.hidden, attention_mask(q_segments, encoded.segment_ids, causal=False)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for decoding, in fixed-size buffers of `length` slots.

  All rows write the same slot each step (`index`); prompts are left-padded, so row b's tokens
  occupy slots start[b]..index-1 and the slots before start[b] are padding that is masked out.
  `layers` matches the parameter layout: a tuple of per-layer (k, v) pairs, or one (k, v) pair
  stacked on a leading layer axis when scan_layers (each k, v: [b, length, kv_heads, head_dim]).
  An encoder-decoder's cache also carries the encoder output, and each layer's entry is
  ((k, v), cross (k, v)): the cross-attention keys and values over the encoder output [b, s, g, k],
  None until the prefill projects them, then read by every decode step.
  """
  layers: Any
  index: Array  # [] int32: the slot the next token is written to
  start: Array  # [b] int32: first slot of each row's real tokens
  encoded: Encoded | None = None

  @property
  def length(self) -> int:
    return jax.tree.leaves(self.layers)[0].shape[-3]


def init_cache(cfg: ModelConfig, start: Array, length: int, encoded: Encoded | None = None
               ) -> KVCache:
  """An empty cache of `length` slots for rows whose tokens begin at slot `start` [b] (and, for an
  encoder-decoder, the rows' encoder output)."""
  shape = (start.shape[0], length, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.decoder_layers, *shape)
  cross = cfg.family == 'encoder_decoder'
  pair = lambda: (jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
  entry = lambda: (pair(), None) if cross else pair()
  layers = entry() if cfg.scan_layers else tuple(entry() for _ in range(cfg.decoder_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32), start.astype(jnp.int32), encoded)


class _ScanBlock(nn.Module):
  """Adapts a block to nn.scan's (carry, inputs) -> (carry, outputs) signature; the layer's cache
  is the scanned input and its updated cache the scanned output."""
  cfg: ModelConfig
  deterministic: bool
  cross: bool
  causal: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache: BlockCache | None,
               cache_index: Array | None, bias: Array | None, encoded: Array | None,
               cross_mask: Array | None, segment_ids: Array | None
               ) -> tuple[Array, BlockCache | None]:
    block = block_class(self.cfg)(self.cfg, self.deterministic, self.cross, self.causal,
                                  name='block')
    return block(x, mask, positions, cache, cache_index, bias, encoded, cross_mask, segment_ids)


class BlockStack(nn.Module):
  """The layers of one stack, as a Python loop or one nn.scan (compile time independent of depth).

  With relative positions the stack computes T5's bias once from the query `positions` and the
  `key_positions` (the same in training; the cache slots' positions when decoding) and adds it in
  every layer. A `cross` stack (the encoder-decoder's decoder, cfg.decoder_layers deep) also
  attends to `encoded` under `cross_mask`. `segment_ids` (full-sequence passes) reach every
  self-attention, for model.attention=splash. Returns the hidden states and the updated per-layer
  caches (None when not decoding).
  """
  cfg: ModelConfig
  deterministic: bool = True
  causal: bool = True
  cross: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache: Any = None,
               cache_index: Array | None = None, key_positions: Array | None = None,
               encoded: Array | None = None, cross_mask: Array | None = None,
               segment_ids: Array | None = None) -> tuple[Array, Any]:
    c = self.cfg
    depth = c.decoder_layers if self.cross else c.n_layers
    bias = None
    if c.pos_encoding == 'relative':
      keys = positions if key_positions is None else key_positions
      bias = RelativeBias(c, self.causal, name='relative_bias')(positions, keys)
    if c.scan_layers:
      scan = nn.scan(_ScanBlock, variable_axes={'params': 0, 'lora': 0, 'intermediates': 0, 'moe': 0},
                     split_rngs={'params': True, 'dropout': True},
                     in_axes=(nn.broadcast, nn.broadcast, 0) + (nn.broadcast,) * 5, length=depth,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
      return scan(c, self.deterministic, self.cross, self.causal, name='layers')(
          x, mask, positions, cache, cache_index, bias, encoded, cross_mask, segment_ids)
    cls = block_class(c)
    new_cache = []
    for i in range(depth):
      x, layer_cache = cls(c, self.deterministic, self.cross, self.causal, name=f'layers_{i}')(
          x, mask, positions, None if cache is None else cache[i], cache_index, bias, encoded,
          cross_mask, segment_ids)
      new_cache.append(layer_cache)
    return x, None if cache is None else tuple(new_cache)


class Decoder(nn.Module):
  """Decoder-only LM. tokens, positions, segment_ids: [b, t] -> logits [b, t, v] in f32.

  `features` returns the final hidden states so reward and value heads reuse the backbone.
  """
  cfg: ModelConfig
  deterministic: bool = True
  causal: ClassVar[bool] = True
  cross: ClassVar[bool] = False  # the layers also attend to an encoder output (EncoderDecoder)

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
    self.blocks = BlockStack(c, self.deterministic, self.causal, self.cross, name='blocks')
    if c.norm_position == 'pre':
      self.final_norm = norm(c, 'final_norm')
    if not c.tie_embeddings:
      self.lm_head = Linear((c.vocab_size,), ('embed', 'vocab'), dtype=c.compute_dtype,
                            param_dtype=c.weight_dtype, name='lm_head')

  def embed_tokens(self, tokens: Array, positions: Array) -> Array:
    c = self.cfg
    # The table is gathered whole before the lookup (as FSDP gathers every weight before use):
    # gathering rows of a table sharded over vocab (tensor) and embed (fsdp) into activations
    # sharded over batch makes XLA's SPMD partitioner rematerialise it involuntarily.
    table = nn.with_logical_constraint(self.embed.embedding.astype(c.compute_dtype), (None, None))
    x = jnp.take(table, tokens, axis=0)
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
               segment_ids: Array | None = None, encoded: Encoded | None = None) -> Array:
    """Final hidden states [b, t, d]; causal for the decoder, bidirectional within each segment
    for the encoder (padding, segment 0, is seen by no real token). `encoded` is what an
    encoder-decoder's decoder cross-attends to."""
    return self.head_norm(self.run_stack(self.blocks, tokens, positions, segment_ids, encoded))

  def run_stack(self, stack: BlockStack, tokens: Array, positions: Array | None,
                segment_ids: Array | None, encoded: Encoded | None = None) -> Array:
    """Embeds `tokens` [b, t] and runs them through `stack`, attending within segments (causally
    if the stack is); positions default to 0..t-1 and segments to one per row."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    mask = attention_mask(segment_ids, segment_ids, causal=stack.causal)
    hidden, cross_mask = cross_inputs(encoded, segment_ids)
    x, _ = stack(self.embed_tokens(tokens, positions), mask, positions, encoded=hidden,
                 cross_mask=cross_mask, segment_ids=segment_ids)
    return x

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
    hidden, cross_mask = cross_inputs(cache.encoded, q_real.astype(jnp.int32))
    x, layers = self.blocks(self.embed_tokens(tokens, positions), mask, positions, cache.layers,
                            cache.index, key_positions=slots[None, :] - cache.start[:, None],
                            encoded=hidden, cross_mask=cross_mask)
    x = self.head_norm(x[:, -1:] if last_only else x)
    return self.logits(x), cache.replace(layers=layers, index=cache.index + t)

  def logits(self, x: Array) -> Array:
    """Output layer in f32: tied to the token embedding or a separate head; scaled by µP's
    output multiplier over its width multiplier (1 under SP), then soft-capped when
    model.logit_softcap > 0."""
    if self.cfg.tie_embeddings:
      out = tied_logits(x, self.embed.embedding.astype(x.dtype))
    else:
      out = self.lm_head(x).astype(jnp.float32)
    if self.cfg.logit_mult != 1.0:  # µP's readout multiplier: logits stay O(1) as width grows
      out = out * self.cfg.logit_mult
    out = softcap(out, self.cfg.logit_softcap)
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


class EncoderDecoder(Decoder):
  """Encoder-decoder (T5). The decoder is Decoder's own causal stack ('blocks', 'final_norm') whose
  layers also cross-attend to the encoder output; the encoder is a bidirectional stack ('encoder',
  'encoder_norm') over the same token embedding, which is also the output layer when tied.

  `encode` runs once per input; `decode` (inherited) extends the decoder's KV cache and reads the
  encoder output stored in the cache (init_cache(..., encoded)).
  """
  cross: ClassVar[bool] = True

  def setup(self):
    super().setup()
    c = self.cfg
    self.encoder = BlockStack(c, self.deterministic, causal=False, name='encoder')
    if c.norm_position == 'pre':
      self.encoder_norm = norm(c, 'encoder_norm')

  def encode(self, tokens: Array, positions: Array | None = None,
             segment_ids: Array | None = None) -> Encoded:
    """The encoder output for `tokens` [b, s]; segment 0 (padding) is seen by no real token."""
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    x = self.run_stack(self.encoder, tokens, positions, segment_ids)
    return Encoded(self.encoder_norm(x) if self.cfg.norm_position == 'pre' else x, segment_ids)

  def features(self, encoder_inputs: Array, decoder_inputs: Array | None = None, *,
               encoder_positions: Array | None = None, encoder_segment_ids: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None) -> Array:
    """Decoder hidden states [b, t, d] for decoder inputs [b, t] given encoder inputs [b, s].
    Decoder inputs default to the encoder inputs, so init(rng, tokens) builds every parameter as
    for the other families."""
    encoded = self.encode(encoder_inputs, encoder_positions, encoder_segment_ids)
    tokens = encoder_inputs if decoder_inputs is None else decoder_inputs
    return super().features(tokens, positions, segment_ids, encoded)

  def __call__(self, encoder_inputs: Array, decoder_inputs: Array | None = None, *,
               encoder_positions: Array | None = None, encoder_segment_ids: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None) -> Array:
    """Logits [b, t, v] in f32 of the next decoder token (teacher forcing)."""
    return self.logits(self.features(
        encoder_inputs, decoder_inputs, encoder_positions=encoder_positions,
        encoder_segment_ids=encoder_segment_ids, positions=positions, segment_ids=segment_ids))


def build_model(cfg: ModelConfig, deterministic: bool = True) -> nn.Module:
  """The model for `cfg.family`."""
  families = {'decoder': Decoder, 'encoder': Encoder, 'encoder_decoder': EncoderDecoder}
  return families[cfg.family](cfg, deterministic)
