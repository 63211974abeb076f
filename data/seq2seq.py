"""Sequence-to-sequence rows for the encoder-decoder (T5) family: one example per row.

Sources (`data.source`, settings in `data.seq2seq`):
  seq2seq:reverse, seq2seq:sort  random strings of min_len..max_len letters over n_symbols; the
                                 target is the string reversed or sorted. n_eval held-out strings
                                 are never drawn for training.
  seq2seq_jsonl:GLOB             one {"input": str, "target": str} per line; every k-th record is
                                 held out (k = 1 / data.eval_fraction)
  any data/sources.py source     span corruption (T5): noise_density of each piece's tokens, in
                                 spans of mean length mean_span, are replaced in the input by one
                                 sentinel id each and spelled out after it in the target

Rows, S = train.seq_len and T = seq_len (tasks) or the longest span-corruption target:
  encoder_inputs, encoder_segment_ids, encoder_positions  [S]  input + [EOS]; segment 1, 0 = padding
  inputs, targets, segment_ids, positions, weights         [T]  [BOS] + target -> target + [EOS]
Row r of epoch e depends only on (seed, e, r), and data/pipeline.TrainRowIterator saves (epoch,
row) in the checkpoint, so a resumed run sees the batches the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Callable, Sequence

import grain
import numpy as np
from ml_collections import ConfigDict

from data import sources
from data.jsonl import json_objects, string_fields
from data.pipeline import (TokenizedDocs, TrainRowIterator, check_batch_shape, check_launch,
                           cut_documents, run_tokenizer, tokenize_docs)
from data.tokenizer import SavedTokenizer
from model.errors import UserError

Example = tuple[np.ndarray, np.ndarray]  # input ids, target ids (no specials)
TASKS = ('reverse', 'sort')
SOURCES = 'seq2seq:reverse | seq2seq:sort | seq2seq_jsonl:GLOB | a text source (span corruption)'
EPOCH_ROWS = 1 << 16    # rows of a synthetic epoch (each row is drawn fresh; the size only names epochs)
TRAIN, EVAL = 0, 1      # rng streams: held-out examples never share a seed with training rows


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """One epoch's examples, made on demand: example(r) for r < n_rows."""
  n_rows: int
  example: Callable[[int], Example]


# ---- sources -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Random strings over `alphabet` and their reversal or sorting."""
  kind: str
  alphabet: str
  min_len: int
  max_len: int
  n_eval: int
  seed: int
  tokenizer: SavedTokenizer

  def draw(self, rng: np.random.Generator, exclude: frozenset[str] = frozenset()) -> str:
    """A random string of min_len..max_len letters that is not in `exclude`."""
    while True:
      letters = rng.integers(0, len(self.alphabet), rng.integers(self.min_len, self.max_len + 1))
      text = ''.join(self.alphabet[i] for i in letters)
      if text not in exclude:
        return text

  def example(self, text: str) -> Example:
    target = text[::-1] if self.kind == 'reverse' else ''.join(sorted(text))
    return self.tokenizer.encode_array(text), self.tokenizer.encode_array(target)

  @functools.cached_property
  def eval_strings(self) -> tuple[str, ...]:
    """The held-out strings, drawn from their own rng stream."""
    return tuple(self.draw(np.random.default_rng([self.seed, EVAL, i])) for i in range(self.n_eval))

  def lengths(self, seq_len: int) -> tuple[int, int]:
    if seq_len <= self.max_len:
      raise UserError(f'train.seq_len={seq_len} leaves no room for EOS after strings of '
                      f'data.seq2seq.max_len={self.max_len}; use seq_len >= {self.max_len + 1}')
    return seq_len, seq_len

  def epoch(self, epoch: int, seq_len: int) -> EpochPlan:
    held_out = frozenset(self.eval_strings)
    draw = lambda r: self.draw(np.random.default_rng([self.seed, TRAIN, epoch, r]), held_out)
    return EpochPlan(EPOCH_ROWS, lambda r: self.example(draw(r)))

  def held_out(self, seq_len: int) -> list[Example]:
    return [self.example(text) for text in self.eval_strings]


@dataclasses.dataclass(frozen=True)
class PairTask:
  """Fixed (input, target) pairs, reshuffled every epoch."""
  train: list[Example]
  evals: list[Example]
  seed: int

  def lengths(self, seq_len: int) -> tuple[int, int]:
    return seq_len, seq_len

  def epoch(self, epoch: int, seq_len: int) -> EpochPlan:
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
    return EpochPlan(len(order), lambda r: self.train[order[r]])

  def held_out(self, seq_len: int) -> list[Example]:
    return self.evals


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
  """T5 pretraining on documents: pieces of a fixed length (cut at a fresh random offset every
  epoch, as data/pipeline.py cuts rows) corrupted by `corrupt` with each row's own rng."""
  train: TokenizedDocs
  evals: TokenizedDocs
  density: float
  mean_span: float
  sentinels: np.ndarray  # int32 ids; sentinel i marks the i-th noise span of a piece
  seed: int

  def input_length(self, n: int) -> int:
    """Encoder tokens of a corrupted piece of n tokens: kept ones, a sentinel per span, EOS."""
    noise, spans = span_counts(n, self.density, self.mean_span)
    return n - noise + spans + 1

  def piece_length(self, seq_len: int) -> int:
    """The longest piece whose corrupted input fits in seq_len tokens (input_length only grows
    with n)."""
    if self.input_length(2) > seq_len:
      raise UserError(f'train.seq_len={seq_len} is too short for span corruption; use at least 8')
    n = 2
    while self.input_length(n + 1) <= seq_len:
      n += 1
    spans = span_counts(n, self.density, self.mean_span)[1]
    if spans > len(self.sentinels):
      raise UserError(f'pieces of train.seq_len={seq_len} have {spans} noise spans but there are '
                      f'{len(self.sentinels)} sentinels; raise data.seq2seq.sentinels to {spans}')
    return n

  def lengths(self, seq_len: int) -> tuple[int, int]:
    return seq_len, sum(span_counts(self.piece_length(seq_len), self.density, self.mean_span)) + 1

  def epoch(self, epoch: int, seq_len: int) -> EpochPlan:
    n = self.piece_length(seq_len)
    rng = np.random.default_rng([self.seed, epoch])
    lengths = self.train.n_pairs - 1
    start, length = doc_pieces(self.train, n, np.where(lengths > n, rng.integers(0, n, len(lengths)), 0))
    order = rng.permutation(len(start))
    return EpochPlan(len(order), lambda r: self.corrupt(self.train, start[order[r]], length[order[r]],
                                                        [self.seed, TRAIN, epoch, r]))

  def held_out(self, seq_len: int) -> list[Example]:
    start, length = doc_pieces(self.evals, self.piece_length(seq_len), np.zeros(len(self.evals.n_pairs), np.int64))
    return [self.corrupt(self.evals, s, n, [self.seed, EVAL, i]) for i, (s, n) in enumerate(zip(start, length))]

  def corrupt(self, docs: TokenizedDocs, start: int, length: int, seed: list[int]) -> Example:
    tokens = docs.tokens[start:start + length]
    mask = noise_mask(length, self.density, self.mean_span, np.random.default_rng(seed))
    return corrupt_spans(tokens, mask, self.sentinels)


def doc_pieces(docs: TokenizedDocs, n: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start in docs.tokens, length) of the pieces of at least 2 tokens of every document's text
  (BOS and EOS left out) cut at offsets[d] + k·n."""
  doc, start, length = cut_documents(docs.n_pairs - 1, n, offsets)
  keep = length >= 2
  return docs.starts[doc[keep]] + 1 + start[keep], length[keep]


# ---- span corruption ---------------------------------------------------------------------------

def span_counts(n: int, density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a piece of n >= 2 tokens, as T5 rounds them: at least one
  noise and one kept token, at least one span."""
  noise = min(max(round(n * density), 1), n - 1)
  return noise, max(min(round(noise / mean_span), noise, n - noise), 1)


def segment_lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` items cut into `parts` non-empty runs at random: the runs' lengths."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(n: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
  """T5's random_spans_noise_mask, bool [n]: kept and noise spans alternate, kept first."""
  noise, spans = span_counts(n, density, mean_span)
  runs = np.stack([segment_lengths(n - noise, spans, rng), segment_lengths(noise, spans, rng)], 1)
  return np.repeat(np.tile([False, True], spans), runs.ravel())


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> Example:
  """Input: the kept tokens with noise span i replaced by sentinels[i]; target: each sentinel
  followed by the tokens it replaced."""
  first = mask & ~np.concatenate([[False], mask[:-1]])  # the first token of each noise span
  ids = sentinels[np.maximum(np.cumsum(first) - 1, 0)]
  inputs = np.where(first, ids, tokens)[~mask | first]
  targets = np.insert(tokens[mask], np.flatnonzero(first[mask]), sentinels[:first.sum()])
  return inputs.astype(np.int32), targets.astype(np.int32)


class SentinelTokenizer(SavedTokenizer):
  """`base` with `n` ids reserved above its vocabulary for sentinels (T5's <extra_id_i> is the
  i-th id from the top). Sentinels decode to nothing; the run saves the base tokenizer."""

  def __init__(self, base: SavedTokenizer, n: int):
    self.base, self.spec = base, base.spec
    self.pad_id, self.bos_id, self.eos_id = base.pad_id, base.bos_id, base.eos_id
    self.vocab_size = base.vocab_size + n
    self.sentinels = np.arange(self.vocab_size - 1, base.vocab_size - 1, -1, dtype=np.int32)

  def encode_array(self, text: str) -> np.ndarray:
    return self.base.encode_array(text)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    return self.base.decode(ids[ids < self.base.vocab_size])

  def save(self, directory: str) -> None:
    self.base.save(directory)

  def _fields(self) -> dict:
    return self.base._fields()


# ---- rows --------------------------------------------------------------------------------------

def encoder_tokens(inputs: np.ndarray, eos_id: int, length: int) -> np.ndarray:
  """The encoder's view of an input: its first length - 1 tokens and EOS."""
  return np.append(inputs[:length - 1], eos_id).astype(np.int32)


def blank_row(lengths: tuple[int, int], pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only (weight 0): what fills the last eval batch."""
  s, t = lengths
  return {'encoder_inputs': np.full(s, pad_id, np.int32), 'encoder_segment_ids': np.zeros(s, np.int32),
          'encoder_positions': np.zeros(s, np.int32), 'inputs': np.full(t, pad_id, np.int32),
          'targets': np.full(t, pad_id, np.int32), 'segment_ids': np.zeros(t, np.int32),
          'positions': np.zeros(t, np.int32), 'weights': np.zeros(t, np.float32)}


def encode_row(example: Example, lengths: tuple[int, int], tokenizer: SavedTokenizer) -> dict[str, np.ndarray]:
  """One example as a row (see the module docstring); too long inputs and targets are cut."""
  row = blank_row(lengths, tokenizer.pad_id)
  source = encoder_tokens(example[0], tokenizer.eos_id, lengths[0])
  target = example[1][:lengths[1] - 1]
  s, t = len(source), len(target) + 1
  row['encoder_inputs'][:s], row['encoder_segment_ids'][:s] = source, 1
  row['encoder_positions'][:s] = np.arange(s)
  row['inputs'][:t], row['targets'][:t] = np.append(tokenizer.bos_id, target), np.append(target, tokenizer.eos_id)
  row['segment_ids'][:t], row['positions'][:t], row['weights'][:t] = 1, np.arange(t), 1.0
  return row


Task = SyntheticTask | PairTask | SpanCorruption


class Seq2SeqRows(grain.IterDataset):
  """Endless rows of one process: rows p, p+P, ... of every epoch of `task`."""

  def __init__(self, task: Task, source: str, seq_len: int, seed: int, tokenizer: SavedTokenizer,
               process_index: int, process_count: int):
    super().__init__()
    self.task, self.source, self.seq_len, self.seed, self.tokenizer = task, source, seq_len, seed, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.lengths = task.lengths(seq_len)

  def epoch(self, epoch: int) -> EpochPlan:
    plan = self.task.epoch(epoch, self.seq_len)
    p, count = self.process_index, self.process_count
    return EpochPlan(plan.n_rows // count, lambda i: plan.example(i * count + p))

  def row(self, plan: EpochPlan, row: int) -> dict[str, np.ndarray]:
    return encode_row(plan.example(row), self.lengths, self.tokenizer)

  def fingerprint(self) -> dict:
    return {'seq_len': self.seq_len, 'seed': self.seed, 'source': self.source,
            'process_count': self.process_count}

  def __iter__(self) -> TrainRowIterator:
    return TrainRowIterator(self)

  def __str__(self) -> str:
    return f'Seq2SeqRows({self.source}, seq_len={self.seq_len}, seed={self.seed})'


@dataclasses.dataclass(frozen=True)
class Seq2SeqDataset:
  """A seq2seq task for one process, with data/pipeline.Dataset's interface (train/loop.pretrain)."""
  tokenizer: SavedTokenizer
  info: dict
  task: Task
  source: str
  seed: int
  process_index: int = 0
  process_count: int = 1

  def train_dataset(self, batch_size: int, seq_len: int) -> grain.IterDataset:
    check_batch_shape(batch_size, seq_len)
    rows = Seq2SeqRows(self.task, self.source, seq_len, self.seed, self.tokenizer, self.process_index,
                       self.process_count)
    if rows.epoch(0).n_rows < batch_size:
      raise UserError(f'data.source {self.source!r} has fewer training examples than one batch '
                      f'({batch_size * self.process_count}); use a smaller train.batch_size or more data')
    return rows.batch(batch_size, drop_remainder=True)

  def train_iter(self, batch_size: int, seq_len: int) -> grain.DatasetIterator:
    return iter(self.train_dataset(batch_size, seq_len))

  def eval_examples(self, seq_len: int) -> list[Example]:
    """Every held-out example, the same on every process (for exact match)."""
    return self.task.held_out(seq_len)

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """This process's share of the held-out examples (every P-th) once, in order; every process
    gets the same number of batches, the last padded with weight-0 rows."""
    check_batch_shape(batch_size, seq_len)
    lengths, examples = self.task.lengths(seq_len), self.eval_examples(seq_len)
    n_batches = math.ceil(len(examples) / (batch_size * self.process_count))
    if max_batches > 0:
      n_batches = min(n_batches, max_batches)
    rows = [encode_row(x, lengths, self.tokenizer) for x in examples[self.process_index::self.process_count]]
    rows += [blank_row(lengths, self.tokenizer.pad_id)] * max(0, n_batches * batch_size - len(rows))
    return [{k: np.stack([r[k] for r in rows[b * batch_size:(b + 1) * batch_size]]) for k in rows[0]}
            for b in range(n_batches)]


# ---- building ----------------------------------------------------------------------------------

def build_seq2seq_dataset(cfg_data: ConfigDict, seed: int, tokenizer_dir: str | None = None,
                          process_index: int = 0, process_count: int = 1) -> Seq2SeqDataset:
  """The encoder-decoder's data for `data.source`; the tokenizer is the saved one in
  tokenizer_dir when present (a resumed run), else built on the train texts and saved there."""
  check_launch(seed, process_index, process_count)
  q, spec = cfg_data.seq2seq, cfg_data.source
  kind, _, rest = spec.partition(':')
  tokenizer_for = lambda texts: run_tokenizer(cfg_data.tokenizer, texts, tokenizer_dir, process_index)
  if kind == 'seq2seq':
    task, tokenizer = synthetic_task(rest, q, seed, tokenizer_for)
    info = {'n_eval_examples': q.n_eval}
  elif kind == 'seq2seq_jsonl':
    task, tokenizer = jsonl_task(rest, cfg_data.eval_fraction, seed, tokenizer_for)
    info = {'n_train_examples': len(task.train), 'n_eval_examples': len(task.evals)}
  else:
    source = sources.load_source(cfg_data)
    task, tokenizer = span_task(source, q, seed, tokenizer_for)
    info = {**source.info, 'noise_density': q.noise_density, 'mean_noise_span': q.mean_span}
  info.update(tokenizer=tokenizer.spec, vocab_size=tokenizer.vocab_size)
  return Seq2SeqDataset(tokenizer, info, task, spec, seed, process_index, process_count)


def synthetic_task(name: str, q: ConfigDict, seed: int, tokenizer_for: Callable[[list[str]], SavedTokenizer],
                   ) -> tuple[SyntheticTask, SavedTokenizer]:
  if name not in TASKS:
    raise UserError(f"data.source 'seq2seq:{name}' is not a task; use one of {SOURCES}")
  if not 2 <= q.n_symbols <= 26:
    raise UserError(f'data.seq2seq.n_symbols={q.n_symbols} must be 2 to 26 (letters a, b, ...)')
  if not 1 <= q.min_len <= q.max_len:
    raise UserError(f'data.seq2seq.min_len={q.min_len} and max_len={q.max_len} need 1 <= min_len <= max_len')
  if q.n_eval < 1:
    raise UserError(f'data.seq2seq.n_eval={q.n_eval} must be at least 1')
  alphabet = string.ascii_lowercase[:q.n_symbols]
  tokenizer = tokenizer_for([alphabet])
  return SyntheticTask(name, alphabet, q.min_len, q.max_len, q.n_eval, seed, tokenizer), tokenizer


def jsonl_task(pattern: str, eval_fraction: float, seed: int,
               tokenizer_for: Callable[[list[str]], SavedTokenizer]) -> tuple[PairTask, SavedTokenizer]:
  """{"input", "target"} records; every k-th one held out."""
  pairs = [string_fields(record, where, 'input', 'target')
           for path in sources.match_files(pattern, f'seq2seq_jsonl:{pattern}')
           for where, record in json_objects(path)]
  held_out = sources.holdout_mask(len(pairs), eval_fraction)
  train = [p for p, h in zip(pairs, held_out) if not h]
  evals = [p for p, h in zip(pairs, held_out) if h]
  if not train or not evals:
    raise UserError(f"data.source 'seq2seq_jsonl:{pattern}' has {len(train)} train and {len(evals)} "
                    'held-out records; add records or change data.eval_fraction')
  tokenizer = tokenizer_for([text for pair in train for text in pair])
  encode = lambda records: [(tokenizer.encode_array(x), tokenizer.encode_array(y)) for x, y in records]
  return PairTask(encode(train), encode(evals), seed), tokenizer


def span_task(source: sources.Source, q: ConfigDict, seed: int,
              tokenizer_for: Callable[[list[str]], SavedTokenizer]) -> tuple[SpanCorruption, SavedTokenizer]:
  if not 0 < q.noise_density < 1 or q.mean_span < 1 or q.sentinels < 1:
    raise UserError(f'span corruption needs 0 < data.seq2seq.noise_density < 1 (got {q.noise_density}), '
                    f'mean_span >= 1 (got {q.mean_span}) and sentinels >= 1 (got {q.sentinels})')
  base = tokenizer_for(source.train_docs)
  tokenizer = SentinelTokenizer(base, q.sentinels)
  task = SpanCorruption(tokenize_docs(base, source.train_docs), tokenize_docs(base, source.eval_docs),
                        q.noise_density, q.mean_span, tokenizer.sentinels, seed)
  return task, tokenizer
