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
Row r of epoch e depends only on (seed, e, r), and data/rows.RowIterator saves (epoch, row) in the
checkpoint, so a resumed run sees the batches the uninterrupted one would have. The tasks are in
data/seq2seq_tasks.py.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Callable

import numpy as np
from ml_collections import ConfigDict

from data import sources
from data.jsonl import json_objects, string_fields
from data.pipeline import run_tokenizer, tokenize_docs
from data.rows import EpochRows, LazyEpoch, RowsDataset, check_batch_shape, check_launch, eval_share
from data.seq2seq_tasks import Example, PairTask, SpanCorruption, SyntheticTask, Task
from data.span_corruption import SentinelTokenizer
from data.tokenizer import SavedTokenizer
from model.errors import UserError
from model.tokenizer import Tokenizer

TASKS = ('reverse', 'sort')
SOURCES = 'seq2seq:reverse | seq2seq:sort | seq2seq_jsonl:GLOB | a text source (span corruption)'


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


def encode_row(example: Example, lengths: tuple[int, int], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
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


class Seq2SeqRows(EpochRows):
  """Endless rows of one process: rows p, p+P, ... of every epoch of `task`."""

  def __init__(self, task: Task, source: str, seq_len: int, seed: int, tokenizer: Tokenizer,
               process_index: int, process_count: int):
    super().__init__(seed, process_index, process_count)
    self.task, self.source, self.seq_len, self.tokenizer = task, source, seq_len, tokenizer
    self.lengths = task.lengths(seq_len)

  def epoch(self, epoch: int) -> LazyEpoch:
    plan = self.task.epoch(epoch, self.seq_len)
    p, count = self.process_index, self.process_count
    return LazyEpoch(plan.n_rows // count, lambda i: plan.make(i * count + p))

  def row(self, plan: LazyEpoch, row: int) -> dict[str, np.ndarray]:
    return encode_row(plan.make(row), self.lengths, self.tokenizer)

  def made_from(self) -> dict:
    return {'seq_len': self.seq_len, 'source': self.source}


@dataclasses.dataclass(frozen=True)
class Seq2SeqDataset(RowsDataset):
  """A seq2seq task for one process (data/rows.TrainData; train/loop.pretrain)."""
  task: Task
  source: str

  def train_rows(self, batch_size: int, seq_len: int) -> Seq2SeqRows:
    rows = Seq2SeqRows(self.task, self.source, seq_len, self.seed, self.tokenizer, self.process_index,
                       self.process_count)
    if rows.epoch(0).n_rows < batch_size:
      raise UserError(f'data.source {self.source!r} has fewer training examples than one batch '
                      f'({batch_size * self.process_count}); use a smaller train.batch_size or more data')
    return rows

  def eval_examples(self, seq_len: int) -> list[Example]:
    """Every held-out example, the same on every process (for exact match)."""
    return self.task.held_out(seq_len)

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """This process's share of the held-out examples (every P-th) once, in order; every process
    gets the same number of batches, the last padded with weight-0 rows."""
    check_batch_shape(batch_size, seq_len)
    lengths, examples = self.task.lengths(seq_len), self.eval_examples(seq_len)
    blank = blank_row(lengths, self.tokenizer.pad_id)
    batches = []
    for index, weights in eval_share(len(examples), batch_size, self.process_index, self.process_count,
                                     max_batches):
      rows = [encode_row(examples[i], lengths, self.tokenizer) if w else blank for i, w in zip(index, weights)]
      batches.append({k: np.stack([r[k] for r in rows]) for k in blank})
    return batches


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
  return Seq2SeqDataset(tokenizer, info, seed, process_index, process_count, task, spec)


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
