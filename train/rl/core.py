"""Pieces every RL objective shares: per-token log-probs and entropy, KL estimators and
controllers, masked statistics.

Alignment: a per-token array x [..., t] belongs to the tokens, x[..., i] to token i, computed from
the prefix 0..i-1 (the log-prob of token i, the value of the state token i is chosen in, token i's
reward). One response mask over the tokens then selects log-probs, values, rewards and advantages;
x[..., 0] is 0 (the first token is never an action).
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from model.heads import apply_rows

Array = jax.Array


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
  """log softmax(logits / temperature) at `targets`, in f32: logits [..., v], targets [...] ->
  [...]. The same distribution model/sampling.py samples from (before top-k/top-p truncation)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def token_entropy(logits: Array, temperature: float = 1.0) -> Array:
  """Entropy (nats) of softmax(logits / temperature): [..., v] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)


def shift_right(x: Array) -> Array:
  """Outputs at positions [..., t] -> aligned to the next token: out[..., i] = x[..., i - 1]."""
  return jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1)


def sequence_logprobs(apply_fn: Callable[..., Array], variables: Any, batch: dict[str, Array],
                      temperature: float = 1.0, **kwargs) -> tuple[Array, Array]:
  """(log-prob, entropy) of every token of batch['tokens'] [..., t] under the LM `variables`
  ({'params': base} is the reference, with adapters the policy), both aligned to the tokens."""
  logits = apply_rows(apply_fn, variables, batch['tokens'], batch['positions'],
                      batch['segment_ids'], **kwargs)
  logp = token_logprobs(logits[..., :-1, :], batch['tokens'][..., 1:], temperature)
  entropy = token_entropy(logits[..., :-1, :], temperature)
  pad = [(0, 0)] * (logp.ndim - 1) + [(1, 0)]
  return jnp.pad(logp, pad), jnp.pad(entropy, pad)


def token_values(apply_fn: Callable[..., Array], variables: Any, batch: dict[str, Array],
                 **kwargs) -> Array:
  """Critic values aligned to the tokens [..., t]: values[..., i] = V(prefix 0..i-1), the state
  in which token i was chosen. apply_fn is a model/heads.py ScalarModel's."""
  values = apply_rows(apply_fn, variables, batch['tokens'], batch['positions'],
                      batch['segment_ids'], **kwargs)
  return shift_right(values)


# ---- KL to the reference -----------------------------------------------------------------------

def kl_k1(logp: Array, ref_logp: Array) -> Array:
  """Per-token KL(policy || reference) estimate log p - log q on tokens sampled from the policy:
  unbiased, can be negative."""
  return logp - ref_logp


def kl_k3(logp: Array, ref_logp: Array) -> Array:
  """Schulman's k3 = (r - 1) - log r with r = q / p: unbiased, never negative, lower variance."""
  log_r = ref_logp - logp
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS = {'k1': kl_k1, 'k3': kl_k3}


@dataclasses.dataclass(frozen=True)
class FixedKL:
  """A constant KL coefficient β."""

  def update(self, beta: float, kl: float, n_steps: int) -> float:
    return beta


@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
  """Ziegler et al. (2019): β grows when the measured KL (nats per sequence) exceeds `target` and
  shrinks below it, by at most ±20% × n_steps / horizon per update, so KL tracks the target."""
  target: float
  horizon: float

  def update(self, beta: float, kl: float, n_steps: int) -> float:
    error = min(max(kl / self.target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / self.horizon)


# ---- masked statistics -------------------------------------------------------------------------

def masked_sum(x: Array, mask: Array) -> Array:
  return (x * mask).sum()


def masked_mean(x: Array, mask: Array) -> Array:
  return masked_sum(x, mask) / jnp.maximum(mask.sum(), 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """x scaled to unit variance over the masked entries, and centred unless `shift_mean` is False
  (rewards keep their sign); 0 outside the mask."""
  mask = mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return (out if shift_mean else out + mean) * mask
