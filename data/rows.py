"""What every training set here shares: endless, resumable train rows and an eval split that gives
every process as many batches.

A dataset the loop trains on is a `TrainData`; `RowsDataset` is the base of this package's. Its
train rows come from an `EpochRows`: epoch e (seeded by (seed, e)) is a plan of this process's
rows, made one at a time, and `RowIterator` holds the position (epoch, row): small, JSON-ready and
exact on resume, refused when saved for other data (a fingerprint).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Protocol

import grain
import numpy as np

from model.errors import UserError
from model.tokenizer import Tokenizer

Row = dict[str, np.ndarray]


class TrainData(Protocol):
  """A dataset the loop can train on (train/loop.pretrain, the sft stage)."""

  tokenizer: Tokenizer
  info: dict  # facts for the run's summary (counts, vocab_size, eval_bytes_per_token, ...)

  def train_iter(self, batch_size: int, seq_len: int) -> grain.DatasetIterator:
    """Endless batches of batch_size rows (per process); get_state()/set_state() resume exactly."""

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[Row]:
    """The eval split once (max_batches > 0: the first ones), as many batches on every process;
    padding rows have weight 0."""


@dataclasses.dataclass(frozen=True)
class LazyEpoch:
  """An epoch whose rows are made on demand: make(r) for r < n_rows."""
  n_rows: int
  make: Callable[[int], Any]


class EpochRows(grain.IterDataset):
  """Endless rows of one process, epoch after epoch. A subclass says what an epoch is (`epoch`:
  a plan with n_rows), how to make one of its rows (`row`) and what the rows are made from
  (`made_from`)."""

  def __init__(self, seed: int, process_index: int, process_count: int):
    super().__init__()
    self.seed, self.process_index, self.process_count = seed, process_index, process_count

  @abc.abstractmethod
  def epoch(self, epoch: int) -> Any:
    """This process's plan of epoch `epoch` (anything with n_rows)."""

  @abc.abstractmethod
  def row(self, plan: Any, row: int) -> Row:
    """Row `row` of an epoch's plan."""

  @abc.abstractmethod
  def made_from(self) -> dict:
    """What the rows are made from (sizes, seq_len, source): with the seed, what a saved
    position is only valid for."""

  def fingerprint(self) -> dict:
    """What a saved position is only valid for, and the process count it was saved under."""
    return {**self.made_from(), 'seed': self.seed, 'process_count': self.process_count}

  def __iter__(self) -> RowIterator:
    return RowIterator(self)

  def __str__(self) -> str:
    return f'{type(self).__name__}(seed={self.seed}, process {self.process_index} of {self.process_count})'


class RowIterator(grain.DatasetIterator):
  """Position (epoch, row) in an EpochRows; get_state/set_state carry it plus the fingerprint,
  which refuses a state from a different corpus, seq_len or seed."""

  def __init__(self, rows: EpochRows):
    super().__init__()
    self._rows = rows
    self._epoch, self._row = 0, 0
    self._plan = rows.epoch(0)

  def __next__(self) -> Row:
    while self._row >= self._plan.n_rows:
      self._epoch, self._row = self._epoch + 1, 0
      self._plan = self._rows.epoch(self._epoch)
    row = self._rows.row(self._plan, self._row)
    self._row += 1
    return row

  def get_state(self) -> dict:
    return {'epoch': self._epoch, 'row': self._row, **self._rows.fingerprint()}

  def set_state(self, state: dict) -> None:
    """Restores a position; a state from a different process count continues at the same share
    of the same epoch (exact only for the same count)."""
    for key, value in self._rows.fingerprint().items():
      if key != 'process_count' and state.get(key) != value:
        raise UserError(f"data iterator state has {key}={state.get(key)} but this run has {value}; "
                        "resume with the same data, seed and train.seq_len, or start a fresh workdir")
    self._row = int(state['row']) * int(state['process_count']) // self._rows.process_count
    if int(state['epoch']) != self._epoch:
      self._epoch = int(state['epoch'])
      self._plan = self._rows.epoch(self._epoch)


@dataclasses.dataclass(frozen=True)
class RowsDataset(abc.ABC):
  """One process's share of a dataset (TrainData): a subclass adds its splits, `train_rows` and
  `eval_batches`."""

  tokenizer: Tokenizer
  info: dict
  seed: int
  process_index: int
  process_count: int

  @abc.abstractmethod
  def train_rows(self, batch_size: int, seq_len: int) -> EpochRows:
    """The train rows for batches of batch_size × seq_len; a UserError when there are too few."""

  @abc.abstractmethod
  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[Row]:
    """See TrainData."""

  def train_dataset(self, batch_size: int, seq_len: int) -> grain.IterDataset:
    """Endless batches of batch_size rows (per process) as a grain IterDataset (add prefetch etc.)."""
    check_batch_shape(batch_size, seq_len)
    return self.train_rows(batch_size, seq_len).batch(batch_size, drop_remainder=True)

  def train_iter(self, batch_size: int, seq_len: int) -> grain.DatasetIterator:
    """Iterator over `train_dataset`; get_state()/set_state() resume it exactly."""
    return iter(self.train_dataset(batch_size, seq_len))


def eval_batch_count(n_rows: int, batch_size: int, process_count: int, max_batches: int = 0) -> int:
  """Eval batches per process: enough for all n_rows once across processes (the same count on
  each), at most max_batches when that is > 0."""
  n_batches = math.ceil(n_rows / (batch_size * process_count))
  return min(n_batches, max_batches) if max_batches > 0 else n_batches


def eval_share(n: int, batch_size: int, process_index: int = 0, process_count: int = 1,
               max_batches: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """(index [batch_size], weights [batch_size]) per eval batch of this process: its rows p, p+P, ...
  of n in order; the slots after them hold row 0 with weight 0."""
  n_batches = eval_batch_count(n, batch_size, process_count, max_batches)
  mine = np.arange(process_index, n, process_count)[:n_batches * batch_size]
  index = np.zeros(n_batches * batch_size, np.int64)
  weights = np.zeros(n_batches * batch_size, np.float32)
  index[:len(mine)], weights[:len(mine)] = mine, 1.0
  return [(index[b * batch_size:(b + 1) * batch_size], weights[b * batch_size:(b + 1) * batch_size])
          for b in range(n_batches)]


def check_launch(seed: int, process_index: int, process_count: int) -> None:
  if seed < 0:
    raise UserError(f"seed {seed} is negative; use a seed >= 0")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is not in 0..{process_count - 1}; check the launch")


def check_batch_shape(batch_size: int, seq_len: int) -> None:
  if batch_size < 1 or seq_len < 1:
    raise UserError(f"batch of {batch_size}×{seq_len} rows is empty; use a per-process batch size and seq_len >= 1")
