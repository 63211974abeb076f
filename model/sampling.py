"""Turning logits into the next token: greedy, temperature, top-k, top-p (nucleus), min-p, behind
one function that also returns the token's log-probability (PPO needs the policy's log-probs)."""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick tokens. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off.

  Frozen and hashable: the generation engine compiles once per distinct setting.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0


def sample_logits(logits: jax.Array, rng: jax.Array, s: Sampling = Sampling()
                  ) -> tuple[jax.Array, jax.Array]:
  """logits: [b, v] -> (token ids [b] int32, log-probs [b] f32).

  The log-prob is that of the chosen token under softmax(logits / temperature) (temperature 1 when
  greedy), before top-k/top-p/min-p truncation: the policy a learner can recompute from logits.
  """
  logits = logits.astype(jnp.float32)
  scaled = logits / s.temperature if s.temperature else logits
  log_probs = jax.nn.log_softmax(scaled, axis=-1)
  if s.temperature == 0:
    tokens = logits.argmax(-1).astype(jnp.int32)
  else:
    tokens = jax.random.categorical(rng, truncate(scaled, s)).astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def truncate(logits: jax.Array, s: Sampling) -> jax.Array:
  """Set to -inf every logit outside the top-k, the top-p nucleus and the min-p band."""
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
    cutoff_index = jnp.minimum(jnp.sum(cum < s.top_p, axis=-1, keepdims=True), logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  if s.min_p > 0.0:
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
    floor = logits.max(-1, keepdims=True) + jnp.log(s.min_p)
    logits = jnp.where(logits < floor, -jnp.inf, logits)
  return logits
