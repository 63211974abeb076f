"""Training objectives. Each returns a loss SUM and its weight, so micro-batches and devices add up
exactly: the step divides by the weight of the whole batch (gradient accumulation == big batch)."""
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


def batch_weight(batch: Batch) -> jax.Array:
  """Number of scored target tokens: the denominator of every token-level loss."""
  return batch['weights'].sum()


def causal_lm_loss(apply_fn: Callable[..., jax.Array]) -> LossFn:
  """Next-token prediction on packed rows; `weights` masks padding, document ends, and prompts (SFT)."""
  def loss(params, batch: Batch, rng: jax.Array):
    logits = apply_fn({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                      rngs={'dropout': rng})
    w = batch['weights']
    nll = token_nll(logits, batch['targets'])
    correct = (logits.argmax(-1) == batch['targets']).astype(jnp.float32)
    return (nll * w).sum(), {'accuracy': (correct * w).sum()}
  return loss
