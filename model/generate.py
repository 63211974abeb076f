"""Autoregressive sampling by full recomputation over a sliding window (no KV cache).

Simple and obviously correct: every new token re-reads the last `max_len` tokens, like nanoGPT.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

from model.sampling import sample_logits


def generate_recompute(apply_fn: Callable[..., jax.Array], params: Any, prompt: list[int], *,
                       max_new_tokens: int, max_len: int, rng: jax.Array, num_samples: int = 1,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
  """Sample `num_samples` continuations of `prompt`; each stops at `eos_id` (not included)."""
  n = len(prompt)
  total = n + max_new_tokens
  window = min(max_len, total)
  buf = jnp.full((num_samples, total), pad_id, jnp.int32).at[:, :n].set(jnp.asarray(prompt, jnp.int32))

  @jax.jit
  def run(params, buf, rng):
    def body(i, carry):
      buf, done = carry
      start = jnp.maximum(i - window, 0)
      ctx = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)
      logits = apply_fn({'params': params}, ctx)
      last = jax.lax.dynamic_index_in_dim(logits, i - start - 1, axis=1, keepdims=False)
      tok = sample_logits(last, jax.random.fold_in(rng, i), temperature, top_k, top_p)
      if eos_id is not None:
        tok = jnp.where(done, pad_id, tok)
        done = done | (tok == eos_id)
      return buf.at[:, i].set(tok), done
    return jax.lax.fori_loop(n, total, body, (buf, jnp.zeros((num_samples,), bool)))[0]

  out = jax.device_get(run(params, buf, rng))
  results = []
  for row in out:
    new = [int(x) for x in row[n:]]
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    results.append(new)
  return results
