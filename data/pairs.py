"""Preference pairs for the reward and DPO stages (`rlhf.data`), and a resumable iterator over
their pair batches (train/rl/preference.py `pair_batch`).

  synthetic  prompts from the chain, two responses sampled from the base policy per prompt (the
             caller's `sample`), labelled by Bradley-Terry noise on the gold score: a pair's gold
             margin is kept, so accuracy can be measured against the truth, not the noisy label
  hh:GLOB    Anthropic HH {"chosen", "rejected"} dialogues rendered with the chat template; a row
             ends with its last reply's end marker, the shared dialogue before that reply is the prompt

Pairs are split by data/sources.holdout_mask (every k-th pair held out), so the reward and DPO
stages of one seed train and evaluate on the same pairs.
"""
import dataclasses
from typing import Callable

import numpy as np

from data import formats
from data.preferences import ChainTask, prefers_first
from data.rows import EpochRows, LazyEpoch, RowIterator, eval_share
from data.sft import render, resolve_template
from data.sources import holdout_mask
from model.errors import UserError
from model.tokenizer import Tokenizer

Sample = Callable[[np.ndarray, int], list[np.ndarray]]  # (prompts [n, p], seed) -> n responses


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Whole sequences (prompt then response); chosen[i] and rejected[i] share prompt_lengths[i]."""
  chosen: list[np.ndarray]
  rejected: list[np.ndarray]
  prompt_lengths: np.ndarray  # [n]
  gold_margin: np.ndarray | None = None  # [n] gold(chosen) - gold(rejected) (synthetic only)

  def select(self, keep: np.ndarray) -> 'Pairs':
    rows = np.flatnonzero(keep)
    margin = None if self.gold_margin is None else self.gold_margin[rows]
    return Pairs([self.chosen[i] for i in rows], [self.rejected[i] for i in rows],
                 self.prompt_lengths[rows], margin)


def split_pairs(pairs: Pairs, n_eval: int) -> tuple[Pairs, Pairs]:
  """(train, held-out): `n_eval` pairs spread evenly through the set are held out."""
  if not 0 < n_eval < len(pairs.chosen):
    raise UserError(f'rlhf.eval_pairs={n_eval} must be between 1 and the {len(pairs.chosen)} pairs '
                    'read; lower it or raise rlhf.pairs')
  held = holdout_mask(len(pairs.chosen), n_eval / len(pairs.chosen))
  return pairs.select(~held), pairs.select(held)


def synthetic_pairs(task: ChainTask, sample: Sample, n: int, prompt_len: int,
                    label_temperature: float, seed: int) -> Pairs:
  """`n` prompts, two sampled responses each, the pair ordered by a noisy gold label."""
  rng = np.random.default_rng([seed, 7])
  prompts = task.prompts(rng, n, prompt_len)
  a, b = sample(prompts, 2 * seed), sample(prompts, 2 * seed + 1)
  gold_a, gold_b = task.measure(prompts, a)['gold'], task.measure(prompts, b)['gold']
  first = prefers_first(gold_a, gold_b, label_temperature, rng)
  join = lambda p, r: np.concatenate([p, r]).astype(np.int32)
  chosen = [join(p, x if f else y) for p, x, y, f in zip(prompts, a, b, first)]
  rejected = [join(p, y if f else x) for p, x, y, f in zip(prompts, a, b, first)]
  margin = np.where(first, gold_a - gold_b, gold_b - gold_a)
  return Pairs(chosen, rejected, np.full(n, prompts.shape[1]), margin)


def hh_pairs(pattern: str, tokenizer: Tokenizer, template: str, width: int, limit: int) -> Pairs:
  """The first `limit` HH pairs whose rows fit in `width` tokens and share their prompt."""
  template = resolve_template(tokenizer, template)
  chosen, rejected, prompt_lengths = [], [], []
  for pair in formats.read_hh_pairs(pattern, 'rlhf.data'):
    rows = [render(tokenizer, messages, template) for messages in pair]
    ends = [int(np.flatnonzero(r.trainable).max()) + 1 if r.trainable.any() else 0 for r in rows]
    start = rows[0].reply_start
    shared = rows[1].reply_start == start and np.array_equal(rows[0].ids[:start], rows[1].ids[:start])
    if not shared or min(ends) <= start or max(ends) > width:
      continue
    chosen.append(rows[0].ids[:ends[0]])
    rejected.append(rows[1].ids[:ends[1]])
    prompt_lengths.append(start)
    if len(chosen) == limit:
      break
  if not chosen:
    raise UserError(f'rlhf.data=hh:{pattern} has no pair whose rows fit train.seq_len={width}; '
                    'raise train.seq_len')
  return Pairs(chosen, rejected, np.array(prompt_lengths))


def prompts_of(pairs: Pairs) -> list[np.ndarray]:
  """The prompt of each pair (for sampling the policy on the pairs' dialogues)."""
  return [row[:n] for row, n in zip(pairs.chosen, pairs.prompt_lengths)]


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every pair once, in order; the last batch is filled with weight-0 copies of pair 0."""
  batches = []
  for index, real in eval_share(len(arrays['weights']), batch_size):
    batch = {k: v[index] for k, v in arrays.items()}
    batch['weights'] = batch['weights'] * real
    batches.append(batch)
  return batches


class PairBatches(EpochRows):
  """Batches of pairs, each epoch a fresh (seed, epoch) permutation cut into global batches of
  P·b (the tail that fills none is left out); process p takes rows [p·b, (p+1)·b) of each. A
  "row" here is one such batch."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
               process_index: int, process_count: int):
    super().__init__(seed, process_index, process_count)
    self.arrays, self.batch_size = arrays, batch_size
    self.n = len(arrays['weights'])

  def epoch(self, epoch: int) -> LazyEpoch:
    size = self.batch_size * self.process_count
    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    mine = order[:self.n // size * size].reshape(-1, self.process_count, self.batch_size)[:, self.process_index]
    return LazyEpoch(len(mine), mine.__getitem__)

  def row(self, plan: LazyEpoch, row: int) -> dict[str, np.ndarray]:
    rows = plan.make(row)
    return {k: v[rows] for k, v in self.arrays.items()}

  def made_from(self) -> dict:
    return {'n_pairs': self.n, 'batch_size': self.batch_size}


class PairIterator(RowIterator):
  """Endless batches of pairs (PairBatches); state (epoch, batch), exact on resume."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    n = len(arrays['weights'])
    if n < batch_size * process_count:
      raise UserError(f'{n} training pairs are fewer than one batch of '
                      f'{batch_size * process_count}; lower train.batch_size or raise rlhf.pairs')
    super().__init__(PairBatches(arrays, batch_size, seed, process_index, process_count))
