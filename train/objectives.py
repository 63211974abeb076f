"""Training objectives. Each returns a loss SUM and metric sums; the weight (scored tokens: the
batch's `weights`, or the objective's own aux['weight'] as masked LM returns) is summed too, so
micro-batches and devices add up exactly: the step divides by the weight of the whole batch."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
# (params, batch, rng) -> (loss_sum, metric sums); metric sums are divided by the batch weight.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in f32. logits: [b, t, v], targets: [b, t] -> [b, t]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def scored_sums(logits: jax.Array, labels: jax.Array, w: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy and correct argmax predictions, each summed with weights `w` (labels' shape)."""
  correct = (logits.argmax(-1) == labels).astype(jnp.float32)
  return (token_nll(logits, labels) * w).sum(), {'accuracy': (correct * w).sum()}


def z_loss_sum(logits: jax.Array, w: jax.Array) -> jax.Array:
  """Sum of log(Z)^2 over the tokens, weighted by `w`: pulls each row's softmax normaliser
  towards 1, so the output logits cannot drift to large values (PaLM's auxiliary z-loss)."""
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return (jnp.square(log_z) * w).sum()


def batch_weight(batch: Batch) -> jax.Array:
  """Number of scored target tokens: the denominator of every token-level loss."""
  return batch['weights'].sum()


def causal_lm_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """Next-token prediction on packed rows; `weights` masks padding, document ends, and prompts (SFT)."""
  def loss(params, batch: Batch, rng: jax.Array):
    logits = apply_fn({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                      rngs={'dropout': rng})
    return scored_sums(logits, batch['targets'], batch['weights'])
  return loss


def seq2seq_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """Encoder-decoder (T5): the causal LM loss of the decoder rows (`inputs` = [BOS] + target,
  `targets` = target + [EOS]) given each row's `encoder_inputs`, `encoder_segment_ids` (0 = padding)
  and `encoder_positions`."""
  def loss(params, batch: Batch, rng: jax.Array):
    def decoder_apply(variables, tokens, positions, segment_ids, **kw):
      return apply_fn(variables, batch['encoder_inputs'], tokens,
                      encoder_positions=batch['encoder_positions'],
                      encoder_segment_ids=batch['encoder_segment_ids'], positions=positions,
                      segment_ids=segment_ids, **kw)
    return causal_lm_loss(decoder_apply)(params, batch, rng)
  return loss


def mask_tokens(rng: jax.Array, inputs: jax.Array, eligible: jax.Array, mask_id: int, vocab: int,
                rate: float = 0.15) -> tuple[jax.Array, jax.Array]:
  """BERT corruption: pick `rate` of the eligible tokens; of those 80% become `mask_id`, 10% a
  random token, 10% stay. Returns (corrupted inputs, picked [b, t] bool)."""
  pick_rng, how_rng, tok_rng = jax.random.split(rng, 3)
  picked = eligible & jax.random.bernoulli(pick_rng, rate, inputs.shape)
  how = jax.random.uniform(how_rng, inputs.shape)
  random_tokens = jax.random.randint(tok_rng, inputs.shape, 0, vocab, inputs.dtype)
  corrupted = jnp.where(how < 0.8, mask_id, jnp.where(how < 0.9, random_tokens, inputs))
  return jnp.where(picked, corrupted, inputs), picked


def masked_lm_loss(apply_fn: Callable[..., jax.Array], mask_id: int) -> LossFn:
  """Masked-LM on packed rows: predict the original `inputs` at the corrupted positions.

  Masks are drawn from the step's rng (a function of seed and step), so a resumed run masks
  exactly as the uninterrupted one. The loss is normalised by the number of picked tokens, which
  the objective returns as its `weight` (see `objective_weight`). `mask_id` is the pad id: padding
  never shares a segment with real tokens, so its embedding is free to mean [MASK].
  """
  def loss(params, batch: Batch, rng: jax.Array):
    mask_rng, dropout_rng = jax.random.split(rng)
    inputs = batch['inputs']
    vocab = params['embed']['embedding'].shape[0]
    corrupted, picked = mask_tokens(mask_rng, inputs, batch['weights'] > 0, mask_id, vocab)
    logits = apply_fn({'params': params}, corrupted, batch['positions'], batch['segment_ids'],
                      rngs={'dropout': dropout_rng})
    w = picked.astype(jnp.float32)
    loss_sum, metrics = scored_sums(logits, inputs, w)
    return loss_sum, {**metrics, 'weight': w.sum()}
  return loss


def classification_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """Cross-entropy of one class per row: a classifier's logits [b, classes] (model/heads.py
  ClassifierModel) against `labels` [b], each row weighted by `weights` [b] (0 on rows that only
  fill a batch); the weight is the number of examples, so loss and accuracy are per example."""
  def loss(params, batch: Batch, rng: jax.Array):
    logits = apply_fn({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                      rngs={'dropout': rng})
    loss_sum, metrics = scored_sums(logits, batch['labels'], batch['weights'])
    return loss_sum, {**metrics, 'weight': batch['weights'].sum()}
  return loss


def objective_weight(aux: dict[str, jax.Array], batch: Batch) -> jax.Array:
  """The loss denominator: the objective's own `weight` (masked LM) or the batch's target tokens.
  Removes it from `aux`, leaving only metric sums."""
  return aux.pop('weight') if 'weight' in aux else batch_weight(batch)


def objective_for(family: str, pad_id: int) -> Callable[[Callable[..., jax.Array]], LossFn]:
  """The pretraining objective of a model family: causal LM (decoder), masked LM (encoder) or
  seq2seq (encoder-decoder; span corruption is in its data, data/seq2seq.py)."""
  if family == 'encoder':
    return functools.partial(masked_lm_loss, mask_id=pad_id)
  if family == 'encoder_decoder':
    return seq2seq_loss
  return causal_lm_loss
