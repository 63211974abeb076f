"""Batched generation with a KV cache: one jit for the prefill, one jit for the whole decode loop.

Prompts are left-padded to a common width, so every row writes the same cache slot each step (a
cheap dynamic_update_slice) while its RoPE positions count from its own first token. Widths and
step counts are rounded up to powers of two, so varying prompt lengths reuse a few compilations,
and the number of steps actually run is a traced value: the loop stops early once every row hit a
stop token. The cache is a while_loop carry, so XLA updates it in place at every step.
An encoder-decoder runs its encoder once, in the prefill, and keeps the output in the cache.
"""
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.errors import UserError
from model.sampling import Sampling, sample_logits
from model.transformer import KVCache, init_cache


class Generation(NamedTuple):
  """Sampled continuations, padded to a common length with pad_id."""
  tokens: jax.Array    # [b, n] int32 new tokens; a row's stop token is included, pad_id after it
  logprobs: jax.Array  # [b, n] f32 log-prob of each token under the sampling policy; 0 after a stop
  lengths: jax.Array   # [b] int32 new tokens per row (stop token included)


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, rng: jax.Array, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             encoder_inputs: Sequence[Sequence[int]] | None = None) -> Generation:
  """Continue each prompt (token ids, lengths may differ) by up to `max_new_tokens` tokens.

  A row stops after emitting any of `stop_ids`; all rows stop at the model's context length
  (`cfg.max_len` tokens, prompt included). Same `rng` and inputs give the same output. Runs under
  the caller's mesh and logical axis rules, if any (params may be sharded as in training).
  An encoder-decoder takes one `encoder_inputs` row per prompt (its decoder prompt is [BOS]).
  """
  cfg = model.cfg
  check_family(cfg.family, encoder_inputs is not None)
  check_prompts(prompts, cfg.max_len)
  encoder = None if encoder_inputs is None else encoder_batch(encoder_inputs, len(prompts),
                                                              cfg.max_len, pad_id)
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} must be at least 1')
  longest = max(len(p) for p in prompts)
  width, steps = bucket(longest), bucket(max_new_tokens)
  # The first token comes from the prefill; each later one feeds its predecessor at the next
  # position, so the last token needs no slot: max_len - longest + 1 fit in the context.
  limit = min(max_new_tokens, cfg.max_len - longest + 1)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in zip(tokens, prompts):
    row[width - len(prompt):] = prompt
  start = jnp.asarray(width - np.array([len(p) for p in prompts]), jnp.int32)
  cache, first, first_logprob = prefill(params, jnp.asarray(tokens), start, rng, encoder,
                                        model=model, sampling=sampling, cache_length=width + steps)
  out = decode(params, cache, first, first_logprob, rng, jnp.int32(limit), model=model,
               sampling=sampling, stop_ids=tuple(stop_ids), pad_id=pad_id, steps=steps)
  return Generation(out.tokens[:, :limit], out.logprobs[:, :limit], out.lengths)


class HostRows(NamedTuple):
  """Generated continuations on the host, one entry per prompt, each cut at its own length."""
  tokens: list[np.ndarray]    # int32 new tokens; a row's stop token is included
  logprobs: list[np.ndarray]  # f32 log-prob of each of those tokens


def generate_rows(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int, rng: jax.Array, chunk_size: int = 0,
                  fold_chunk_start: bool = False, **kwargs: Any) -> HostRows:
  """`generate` over `prompts` in chunks of `chunk_size` (0 = one call), fetched once per chunk.

  Every chunk uses `rng`, or `fold_in(rng, i)` for the chunk starting at prompt i when
  `fold_chunk_start` (independent samples per chunk). `kwargs` go to `generate` (sampling,
  stop_ids, pad_id, encoder_inputs: one row per prompt, chunked alongside).
  """
  encoder_inputs = kwargs.pop('encoder_inputs', None)
  size = chunk_size or max(len(prompts), 1)
  tokens, logprobs = [], []
  for i in range(0, max(len(prompts), 1), size):  # no prompts: generate's one-line error
    if encoder_inputs is not None:
      kwargs['encoder_inputs'] = encoder_inputs[i:i + size]
    out = generate(model, params, prompts[i:i + size], max_new_tokens=max_new_tokens,
                   rng=jax.random.fold_in(rng, i) if fold_chunk_start else rng, **kwargs)
    t, lp, n = jax.device_get((out.tokens, out.logprobs, out.lengths))
    tokens += [row[:k] for row, k in zip(t, n)]
    logprobs += [row[:k] for row, k in zip(lp, n)]
  return HostRows(tokens, logprobs)


def check_family(family: str, has_encoder_inputs: bool) -> None:
  """Only the families with a causal decoder generate; encoder inputs go with an encoder-decoder."""
  if family == 'encoder':
    raise UserError('model.family=encoder (masked LM) cannot generate text; use a decoder or an '
                    'encoder_decoder model')
  if has_encoder_inputs != (family == 'encoder_decoder'):
    raise UserError(f'model.family={family} ' + ('needs encoder_inputs (one row per prompt)'
                    if family == 'encoder_decoder' else 'takes no encoder_inputs'))


def check_prompts(prompts: Sequence[Sequence[int]], max_len: int) -> None:
  """Every prompt needs at least one token and must leave room for one new token."""
  if not len(prompts):
    raise UserError('no prompts given; pass a list of token-id lists')
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise UserError(f'prompt {i} is empty; start it with at least one token (e.g. BOS)')
    if len(prompt) >= max_len:
      raise UserError(f'prompt {i} is {len(prompt)} tokens but the model context is {max_len}; '
                      f'shorten it to at most {max_len - 1} tokens')


def encoder_batch(rows: Sequence[Sequence[int]], n_prompts: int, max_len: int, pad_id: int,
                  ) -> tuple[jax.Array, jax.Array]:
  """Encoder inputs right-padded to a bucketed width (at most max_len), and their segment ids
  (1 on tokens, 0 on padding)."""
  if len(rows) != n_prompts:
    raise UserError(f'{len(rows)} encoder inputs for {n_prompts} prompts; give one per prompt')
  for i, row in enumerate(rows):
    if not 0 < len(row) <= max_len:
      raise UserError(f'encoder input {i} has {len(row)} tokens; the model takes 1 to {max_len}')
  width = min(bucket(max(map(len, rows))), max_len)
  tokens = np.full((len(rows), width), pad_id, np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for tok, seg, row in zip(tokens, segments, rows):
    tok[:len(row)], seg[:len(row)] = row, 1
  return jnp.asarray(tokens), jnp.asarray(segments)


def bucket(n: int) -> int:
  """The next power of two (at least 8): sizes that recur, so compilations are reused."""
  return max(8, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'cache_length'))
def prefill(params: Any, tokens: jax.Array, start: jax.Array, rng: jax.Array,
            encoder: tuple[jax.Array, jax.Array] | None = None, *, model: nn.Module,
            sampling: Sampling, cache_length: int) -> tuple[KVCache, jax.Array, jax.Array]:
  """Run the left-padded prompts [b, w] into a fresh cache and sample the first new token; an
  encoder-decoder first encodes `encoder` (tokens, segment ids) into the cache."""
  encoded = None
  if encoder is not None:
    encoded = model.apply({'params': params}, encoder[0], segment_ids=encoder[1], method='encode')
  cache = init_cache(model.cfg, start, cache_length, encoded)
  positions = jnp.maximum(jnp.arange(tokens.shape[1])[None, :] - start[:, None], 0)
  logits, cache = model.apply({'params': params}, tokens, positions, cache, last_only=True,
                              method='decode')
  token, logprob = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), sampling)
  return cache, token, logprob


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'stop_ids', 'pad_id', 'steps'))
def decode(params: Any, cache: KVCache, first: jax.Array, first_logprob: jax.Array, rng: jax.Array,
           limit: jax.Array, *, model: nn.Module, sampling: Sampling, stop_ids: tuple[int, ...],
           pad_id: int, steps: int) -> Generation:
  """Feed back one token per step until `limit` tokens or every row has stopped (lax.while_loop)."""
  b = first.shape[0]
  is_stop = lambda tok: functools.reduce(jnp.logical_or, [tok == s for s in stop_ids],
                                         jnp.zeros((b,), bool))
  tokens = jnp.full((b, steps), pad_id, jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((b, steps), jnp.float32).at[:, 0].set(first_logprob)
  init = (jnp.int32(1), cache, first, is_stop(first), jnp.ones((b,), jnp.int32), tokens, logprobs)

  def cond(state):
    i, _, _, done, *_ = state
    return (i < limit) & ~done.all()

  def body(state):
    i, cache, token, done, lengths, tokens, logprobs = state
    positions = (cache.index - cache.start)[:, None]
    logits, cache = model.apply({'params': params}, token[:, None], positions, cache,
                                method='decode')
    token, logprob = sample_logits(logits[:, -1], jax.random.fold_in(rng, i), sampling)
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, i].set(token)
    logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logprob))
    lengths = lengths + (~done).astype(jnp.int32)
    return i + 1, cache, token, done | is_stop(token), lengths, tokens, logprobs

  _, _, _, _, lengths, tokens, logprobs = jax.lax.while_loop(cond, body, init)
  return Generation(tokens, logprobs, lengths)
