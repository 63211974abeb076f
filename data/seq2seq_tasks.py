"""What the encoder-decoder trains on (data/seq2seq.py): each task says which examples (input
ids, target ids, no specials) make up an epoch and which are held out.

  SyntheticTask   random strings and their reversal or sorting, drawn fresh for every row
  PairTask        fixed (input, target) pairs, reshuffled every epoch
  SpanCorruption  T5 pretraining on documents (data/span_corruption.py)
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data.pipeline import TokenizedDocs, cut_documents
from data.rows import LazyEpoch
from data.span_corruption import corrupt_spans, noise_mask, span_counts
from data.tokenizer import SavedTokenizer
from model.errors import UserError

Example = tuple[np.ndarray, np.ndarray]  # input ids, target ids (no specials)
EPOCH_ROWS = 1 << 16    # rows of a synthetic epoch (each row is drawn fresh; the size only names epochs)
TRAIN, EVAL = 0, 1      # rng streams: held-out examples never share a seed with training rows


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

  def epoch(self, epoch: int, seq_len: int) -> LazyEpoch:
    held_out = frozenset(self.eval_strings)
    draw = lambda r: self.draw(np.random.default_rng([self.seed, TRAIN, epoch, r]), held_out)
    return LazyEpoch(EPOCH_ROWS, lambda r: self.example(draw(r)))

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

  def epoch(self, epoch: int, seq_len: int) -> LazyEpoch:
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
    return LazyEpoch(len(order), lambda r: self.train[order[r]])

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

  def epoch(self, epoch: int, seq_len: int) -> LazyEpoch:
    n = self.piece_length(seq_len)
    rng = np.random.default_rng([self.seed, epoch])
    lengths = self.train.n_pairs - 1
    start, length = doc_pieces(self.train, n, np.where(lengths > n, rng.integers(0, n, len(lengths)), 0))
    order = rng.permutation(len(start))
    return LazyEpoch(len(order), lambda r: self.corrupt(self.train, start[order[r]], length[order[r]],
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


Task = SyntheticTask | PairTask | SpanCorruption
