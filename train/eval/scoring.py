"""One batched, jitted scorer every eval task and the lm-eval adapter share: the log-likelihood of
a continuation given a context, and of whole documents in disjoint context windows.

Requests are token ids. A row is (context + continuation)[-(max_len + 1):][:-1] as in lm-eval's
`hf` backend: contexts that do not fit are cut from the left (and counted in `truncated`). Rows are
scored longest first in batches of a few bucketed widths (few compilations), right-padded, so a
causal model needs no mask; the batch is split over the mesh's (data, fsdp) axes like training's.
Requests that share their whole context (a multiple-choice item's choices, each shorter than it)
are scored from one KV cache of the context instead (`score_shared`): the context runs once, each
choice a few positions.
"""
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.errors import UserError
from model.generate import bucket
from model.transformer import init_cache
from train.mesh import BATCH_AXES, LOGICAL_RULES, batch_sharding, mesh_rules

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
MAX_GROUP = 64  # continuations scored from one cached context per call


def continuation_scores(logits: jax.Array, targets: jax.Array, mask: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Per row of logits [b, s, vocab]: the sum of log p(target) over masked positions, and whether
  every masked target is the argmax (greedy)."""
  logits = logits.astype(jnp.float32)
  # the target's logit less the log-normaliser: no second [b, s, vocab] array beside the logits
  token_logp = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(logits, axis=-1))
  greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
  return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1), jnp.all(greedy, axis=-1)


@functools.partial(jax.jit, static_argnames='model')
def score_rows(variables: Any, inputs: jax.Array, index: jax.Array, targets: jax.Array,
               mask: jax.Array, model: nn.Module) -> tuple[jax.Array, jax.Array]:
  """Rows scored whole. inputs: [b, t]; index, targets, mask: [b, s], the s <= t positions of
  each row that are scored. Only those positions reach the output layer: a multiple-choice
  continuation is a few tokens of a long row, and the [b, t, vocab] logits cost more than the
  layers below them on a CPU."""
  def logits_at(m: nn.Module, tokens: jax.Array, where: jax.Array) -> jax.Array:
    hidden = jnp.take_along_axis(m.features(tokens), where[..., None], axis=1)
    return m.logits(hidden)

  return continuation_scores(model.apply(variables, inputs, index, method=logits_at), targets, mask)


@functools.partial(jax.jit, static_argnames=('model', 'cache_length'))
def score_shared(variables: Any, contexts: jax.Array, start: jax.Array, owner: jax.Array,
                 continuations: jax.Array, mask: jax.Array, *, model: nn.Module, cache_length: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Continuations that share a context, the context run once: contexts [c, w] left-padded (real
  tokens from slot start [c]) fill a KV cache, each continuation [n, s] (right-padded, mask [n, s])
  then reads its context's cache (owner [n]). A multiple-choice item's choices cost one context
  and a few tokens each instead of a whole row each."""
  cache = init_cache(model.cfg, start, cache_length)
  positions = jnp.maximum(jnp.arange(contexts.shape[1])[None, :] - start[:, None], 0)
  first, cache = model.apply(variables, contexts, positions, cache, last_only=True, method='decode')
  axis = 1 if model.cfg.scan_layers else 0  # layers stacked in front under scan
  cache = cache.replace(layers=jax.tree.map(lambda a: jnp.take(a, owner, axis=axis), cache.layers),
                        start=cache.start[owner])
  steps = jnp.arange(continuations.shape[1])[None, :]
  positions = jnp.minimum((cache.index - cache.start)[:, None] + steps, model.cfg.max_len - 1)
  rest, _ = model.apply(variables, continuations, positions, cache, method='decode')
  # the context's last logits predict a continuation's first token, its k-th token the (k+1)-th
  logits = jnp.concatenate([first[owner], rest[:, :-1]], axis=1)
  return continuation_scores(logits, continuations, mask)


def shard_params(model: nn.Module, params: Any, mesh: jax.sharding.Mesh) -> Any:
  """`params` placed on `mesh` by the model's logical axis names, as training shards them."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, LOGICAL_RULES)
  return jax.tree.map(jax.device_put, params, shardings['params'])


@dataclasses.dataclass
class Scorer:
  """Scores requests with `model` (deterministic) and its `variables` ({'params': ..., and 'lora'
  under adapters}) on `mesh`. `batch_size` rows per call (rounded to the mesh's batch split), at
  most `max_tokens` tokens per call so long windows do not blow up the [b, t, vocab] logits (4096
tokens of a 49k vocabulary: 0.8 GB)."""
  model: nn.Module
  variables: Any
  mesh: jax.sharding.Mesh
  batch_size: int = 16
  max_tokens: int = 4096
  truncated: int = 0  # requests whose context was cut from the left so far

  @property
  def max_len(self) -> int:
    return self.model.cfg.max_len

  def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation, whether it is the greedy continuation) per request."""
    rows = [self._row(i, ctx, cont) for i, (ctx, cont) in enumerate(requests)]
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
      # not truncated (the context is the request's own), and the context is the bigger part: a
      # rolling window (one prefix token, a whole window of continuation) gains nothing from a cache
      if len(cont) <= len(ctx) and len(ctx) + len(cont) <= self.max_len + 1:
        groups.setdefault(tuple(int(t) for t in ctx), []).append(i)
    # at most MAX_GROUP continuations per cached context: a context shared by thousands of requests
    # would otherwise put them all in one call
    shared = [g[k:k + MAX_GROUP] for g in groups.values() if len(g) > 1 for k in range(0, len(g), MAX_GROUP)]
    self._score_shared(shared, requests, out)
    done = {i for g in shared for i in g}
    order = sorted((i for i in range(len(rows)) if i not in done), key=lambda i: -len(rows[i][0]))
    for chunk in self._chunks(order, rows):
      width = self._width(len(rows[chunk[0]][0]))
      span = min(bucket(max(rows[i][1] for i in chunk)), width)  # scored positions per row
      n = self._rows_per_call(width, len(chunk))
      inputs = np.zeros((n, width), np.int32)
      index, targets = np.zeros((2, n, span), np.int32)
      mask = np.zeros((n, span), bool)
      for r, i in enumerate(chunk):
        seq, n_cont = rows[i]
        end = len(seq) - 1  # input positions; the continuation's targets are the last n_cont
        inputs[r, :end] = seq[:-1]
        index[r] = np.maximum(np.arange(end - span, end), 0)
        targets[r] = np.asarray(seq)[index[r] + 1]
        mask[r, span - n_cont:] = True
      sharding = batch_sharding(self.mesh)
      with mesh_rules(self.mesh):
        logp, greedy = score_rows(self.variables, *jax.device_put((inputs, index, targets, mask), sharding),
                                  model=self.model)
      logp, greedy = jax.device_get((logp, greedy))
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def loglikelihood_rolling(self, documents: Sequence[Sequence[int]], prefix_id: int
                            ) -> list[float]:
    """Log-likelihood of each whole document: disjoint windows of the model's context, the first
    one after `prefix_id` (lm-eval's rolling windows with context_len=1)."""
    requests, owner = [], []
    for d, doc in enumerate(documents):
      for window in rolling_windows(list(doc), prefix_id, self.max_len):
        requests.append(window)
        owner.append(d)
    totals = [0.0] * len(documents)
    for d, (logp, _) in zip(owner, self.loglikelihood(requests)):
      totals[d] += logp
    return totals

  def _score_shared(self, groups: list[list[int]], requests: Sequence[Request],
                    out: list[tuple[float, bool]]) -> None:
    """Scores groups of requests with one context each (longest contexts first): `batch_size`
    contexts per call (fewer when their continuations would pass max_tokens), every group padded
    to the largest group's power-of-two size so calls of one task share their shapes."""
    groups = sorted(groups, key=lambda g: -len(requests[g[0]][0]))
    split = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
    sharding = batch_sharding(self.mesh)
    i = 0
    while i < len(groups):
      width = min(width_bucket(len(requests[groups[i][0]][0])), self.max_len)
      n_ctx = self._rows_per_call(width, len(groups) - i)
      while True:
        chunk = groups[i:i + n_ctx]
        per = 1 << (max(map(len, chunk)) - 1).bit_length()  # continuation rows per context, a power of two
        span = bucket(max(len(requests[r][1]) for g in chunk for r in g))
        if n_ctx * per * span <= self.max_tokens or n_ctx == split:
          break
        n_ctx = max(split, n_ctx // 2 // split * split)
      contexts = np.zeros((n_ctx, width), np.int32)
      start = np.full((n_ctx,), width - 1, np.int32)  # unused rows: one pad token
      conts = np.zeros((n_ctx * per, span), np.int32)
      owner = np.repeat(np.arange(n_ctx, dtype=np.int32), per)
      mask = np.zeros((n_ctx * per, span), bool)
      for c, g in enumerate(chunk):
        ctx = requests[g[0]][0]
        contexts[c, width - len(ctx):], start[c] = ctx, width - len(ctx)
        for k, r in enumerate(g):
          cont = requests[r][1]
          conts[c * per + k, :len(cont)], mask[c * per + k, :len(cont)] = cont, True
      with mesh_rules(self.mesh):
        logp, greedy = score_shared(self.variables, *jax.device_put((contexts, start, owner, conts, mask), sharding),
                                    model=self.model, cache_length=width + span)
      logp, greedy = jax.device_get((logp, greedy))
      for c, g in enumerate(chunk):
        for k, r in enumerate(g):
          out[r] = (float(logp[c * per + k]), bool(greedy[c * per + k]))
      i += len(chunk)

  def _row(self, i: int, context: Sequence[int], continuation: Sequence[int]
           ) -> tuple[list[int], int]:
    """(the at most max_len + 1 tokens scored, continuation tokens among them)."""
    if not len(continuation):
      raise UserError(f'request {i} has an empty continuation; every choice needs at least one token')
    if not len(context):
      raise UserError(f'request {i} has an empty context; start it with BOS (or the EOS token)')
    seq = [int(t) for t in (*context, *continuation)]
    if len(seq) > self.max_len + 1:
      self.truncated += 1
      seq = seq[-(self.max_len + 1):]
    return seq, min(len(continuation), len(seq) - 1)

  def _width(self, n_tokens: int) -> int:
    """The padded input width of a row of n_tokens (its inputs are all but the last token)."""
    return min(width_bucket(n_tokens - 1), self.max_len)

  def _rows_per_call(self, width: int, remaining: int) -> int:
    """batch_size rows (at most max_tokens tokens), fewer for the last `remaining` requests: the
    next power of two, so a short tail pays for a few compilations, not for padding rows."""
    split = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
    n = max(1, min(self.batch_size, self.max_tokens // width, 1 << (remaining - 1).bit_length()))
    return -(-n // split) * split

  def _chunks(self, order: list[int], rows: list[tuple[list[int], int]]) -> Iterator[list[int]]:
    """Consecutive requests (longest first) that share one call's width and row count."""
    i = 0
    while i < len(order):
      n = self._rows_per_call(self._width(len(rows[order[i]][0])), len(order) - i)
      yield order[i:i + n]
      i += n


def width_bucket(n: int) -> int:
  """n rounded up on a grid of four widths per doubling (16, 20, 24, 28, 32, 40, ...): under 25%
  padding (scoring is compute-bound: padded tokens cost as much as real ones) for four
  compilations per doubling of the row length."""
  if n <= 16:
    return 16
  step = 1 << ((n - 1).bit_length() - 3)
  return -(-n // step) * step


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> Iterator[Request]:
  """(context, continuation) windows that predict every token of `tokens` once, each at most
  max_len + 1 tokens long: lm-eval's get_rolling_token_windows(context_len=1) made disjoint."""
  if not tokens:
    return
  first = min(max_len, len(tokens))
  yield [prefix_id], tokens[:first]
  done = first
  while done < len(tokens):
    n = min(len(tokens) - done, max_len)
    end = done + n
    yield tokens[max(end - max_len - 1, 0):end - n], tokens[end - n:end]
    done = end
