"""Transformer families assembled from model/layers.py. Decoder-only (GPT) here."""
import jax
import jax.numpy as jnp
import flax.linen as nn

from model.config import ModelConfig
from model.layers import Array, Block, Linear, attention_mask, norm, param_init, sinusoidal_table

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


class _ScanBlock(nn.Module):
  """Adapts a block to nn.scan's (carry, inputs) -> (carry, outputs) signature."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array) -> tuple[Array, None]:
    return block_class(self.cfg)(self.cfg, self.deterministic, name='block')(x, mask, positions), None


class BlockStack(nn.Module):
  """n_layers blocks, as a Python loop or one nn.scan (compile time independent of depth)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array) -> Array:
    c = self.cfg
    if c.scan_layers:
      scan = nn.scan(_ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.n_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scan(c, self.deterministic, name='layers')(x, mask, positions)
      return x
    cls = block_class(c)
    for i in range(c.n_layers):
      x = cls(c, self.deterministic, name=f'layers_{i}')(x, mask, positions)
    return x


class Decoder(nn.Module):
  """Decoder-only LM. tokens, positions, segment_ids: [b, t] -> logits [b, t, v] in f32.

  `features` returns the final hidden states so reward and value heads reuse the backbone.
  """
  cfg: ModelConfig
  deterministic: bool = True

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                          embedding_init=param_init(0.02, ('vocab', 'embed')), name='embed')
    if c.pos_encoding == 'learned':
      self.pos_embed = nn.Embed(c.max_len, c.d_model, dtype=c.compute_dtype,
                                param_dtype=c.weight_dtype,
                                embedding_init=param_init(0.02, ('length', 'embed')), name='pos_embed')
    self.embed_drop = nn.Dropout(c.embed_dropout, deterministic=self.deterministic)
    self.blocks = BlockStack(c, self.deterministic, name='blocks')
    if c.norm_position == 'pre':
      self.final_norm = norm(c, 'final_norm')
    if not c.tie_embeddings:
      self.lm_head = Linear((c.vocab_size,), ('embed', 'vocab'), dtype=c.compute_dtype,
                            param_dtype=c.weight_dtype, name='lm_head')

  def features(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    c = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.embed(tokens)
    if c.pos_encoding == 'learned':
      x = x + self.pos_embed(positions)
    elif c.pos_encoding == 'sinusoidal':
      x = x + sinusoidal_table(c.max_len, c.d_model)[positions].astype(x.dtype)
    x = self.embed_drop(x)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    x = self.blocks(x, attention_mask(segment_ids, segment_ids, causal=True), positions)
    return self.final_norm(x) if c.norm_position == 'pre' else x

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


def build_model(cfg: ModelConfig, deterministic: bool = True) -> nn.Module:
  """The model for `cfg.family`; more families join here."""
  return Decoder(cfg, deterministic)
