"""Documents -> packed, sharded, resumable batches of token rows.

Every document is tokenized once into [BOS] + tokens + [EOS] (an imported model's tokenizer: see
`tokenize_docs`); its (input, target) pairs are (tokens[i], tokens[i+1]). A row holds seq_len
pairs from one or more documents:

  inputs, targets  int32 [B, T]  pad_id where empty
  segment_ids      int32 [B, T]  1, 2, 3... per document piece in the row; 0 = padding
  positions        int32 [B, T]  position within the piece, from 0
  weights          float32 [B, T] 1 on real pairs, 0 on padding and on targets the documents mark
                                 untrainable (SFT: prompts and role headers, see data/sft.py)

Each epoch (numpy, seeded by (seed, epoch)): documents longer than a row are cut into pieces of
seq_len pairs starting at a fresh random offset (so a one-file corpus gives new windows every
epoch); every piece restarts positions at 0 and never attends to the piece before it, like
nanoGPT's random windows. All pieces are shuffled and packed first-fit into rows; process p of P
takes rows p, p+P, ... The iterator is data/rows.RowIterator, whose state (epoch, row) is small,
JSON-ready and exact on resume.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from data import sources, stream
from data.rows import EpochRows, RowsDataset, check_batch_shape, check_launch, eval_batch_count
from data.tokenizer import TOKENIZER_FILE, SavedTokenizer, build_tokenizer, document_frame, load_tokenizer
from model.errors import UserError
from model.tokenizer import Tokenizer

OPEN_ROWS = 64  # rows first-fit packing keeps open; more = less padding, slower planning


@dataclasses.dataclass(frozen=True)
class TokenizedDocs:
  """All documents of a split as one array, each [BOS] + tokens + [EOS]."""

  tokens: np.ndarray   # int32 [N]
  starts: np.ndarray   # int64 [D] offset of each document in tokens
  n_pairs: np.ndarray  # int64 [D] (input, target) pairs of each document = its length - 1
  trainable: np.ndarray | None = None  # bool [N]: token i is a scored target; None = every token


@dataclasses.dataclass(frozen=True)
class Pieces:
  """Spans of document pairs, grouped by row: row r holds pieces bounds[r]:bounds[r+1] in order."""

  start: np.ndarray   # int64 offset in TokenizedDocs.tokens of the piece's first input
  length: np.ndarray  # int64 pairs in the piece, 1..seq_len
  bounds: np.ndarray  # int64 [rows + 1]

  @property
  def n_rows(self) -> int:
    return len(self.bounds) - 1


def tokenize_docs(tokenizer: Tokenizer, docs: Sequence[str]) -> TokenizedDocs:
  """One pass of the tokenizer over every document (vectorised where the tokenizer is). An imported
  model's tokenizer (model/convert/tokenizer.py, for fine-tuning on text) frames documents as its
  model was trained: BOS only if it adds one (SmolLM2 does not), no special token it lacks."""
  bos, eos = document_frame(tokenizer)
  encoded = [tokenizer.encode_array(doc) for doc in docs]
  lengths = np.array([len(ids) + len(bos) + len(eos) for ids in encoded], np.int64)
  tokens = np.concatenate([part for ids in encoded for part in (bos, ids, eos)] or [np.zeros(0, np.int32)])
  return TokenizedDocs(tokens, np.cumsum(lengths) - lengths, lengths - 1)


def cut_documents(n_pairs: np.ndarray, seq_len: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(doc, start, length) of every piece: document d is cut at offsets[d] + k * seq_len.

  offsets[d] in [0, seq_len) and must be 0 where a document fits in a row. Pieces are ordered by
  document, then position.
  """
  head = offsets > 0  # a short first piece precedes the full ones
  counts = -(-(n_pairs - offsets) // seq_len) + head
  doc = np.repeat(np.arange(len(n_pairs)), counts)
  k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) - head[doc]
  start = np.maximum(offsets[doc] + k * seq_len, 0)
  end = np.minimum(offsets[doc] + (k + 1) * seq_len, n_pairs[doc])
  return doc, start, end - start


def first_fit(lengths: np.ndarray, seq_len: int, open_rows: int = OPEN_ROWS) -> np.ndarray:
  """Row of each piece: the first of the last `open_rows` rows with room, else a new row."""
  rows = np.empty(len(lengths), np.int64)
  row_ids: list[int] = []
  room: list[int] = []
  n_rows = 0
  for i, n in enumerate(lengths.tolist()):
    if n == seq_len:  # a full piece is a row of its own: skip the search
      rows[i] = n_rows
      n_rows += 1
      continue
    j = next((j for j, r in enumerate(room) if r >= n), -1)
    if j < 0:
      row_ids.append(n_rows)
      room.append(seq_len)
      n_rows += 1
      if len(room) > open_rows:
        del row_ids[0], room[0]
      j = len(room) - 1
    rows[i] = row_ids[j]
    room[j] -= n
    if room[j] == 0:
      del row_ids[j], room[j]
  return rows


def shard_rows(docs: TokenizedDocs, doc: np.ndarray, start: np.ndarray, length: np.ndarray,
               rows: np.ndarray, n_rows: int, process_index: int, process_count: int) -> Pieces:
  """The pieces of rows p, p+P, ... below n_rows (this process's share), grouped by row."""
  mine = (rows % process_count == process_index) & (rows < n_rows)
  order = np.argsort(rows, kind='stable')
  order = order[mine[order]]
  local_rows = rows[order] // process_count
  n_local = len(range(process_index, n_rows, process_count))
  bounds = np.searchsorted(local_rows, np.arange(n_local + 1))
  return Pieces(docs.starts[doc[order]] + start[order], length[order], bounds)


def assemble(docs: TokenizedDocs, pieces: Pieces, rows: range, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch dict for `rows` of `pieces` (a slice of consecutive rows), [len(rows), seq_len]."""
  lo, hi = pieces.bounds[rows.start], pieces.bounds[rows.stop]
  start, length = pieces.start[lo:hi], pieces.length[lo:hi]
  row = np.repeat(np.arange(len(rows)), np.diff(pieces.bounds[rows.start:rows.stop + 1]))
  first_in_row = pieces.bounds[rows.start:rows.stop][row] - lo  # index of the row's first piece
  before = np.cumsum(length) - length
  column = before - before[first_in_row]
  segment = np.arange(hi - lo) - first_in_row + 1
  position = np.arange(length.sum()) - np.repeat(before, length)
  source = np.repeat(start, length) + position
  target = np.repeat(row * seq_len + column, length) + position
  shape = (len(rows), seq_len)
  batch = {'inputs': np.full(shape, pad_id, np.int32), 'targets': np.full(shape, pad_id, np.int32),
           'segment_ids': np.zeros(shape, np.int32), 'positions': np.zeros(shape, np.int32),
           'weights': np.zeros(shape, np.float32)}
  batch['inputs'].flat[target] = docs.tokens[source]
  batch['targets'].flat[target] = docs.tokens[source + 1]
  batch['segment_ids'].flat[target] = np.repeat(segment, length)
  batch['positions'].flat[target] = position
  batch['weights'].flat[target] = 1.0 if docs.trainable is None else docs.trainable[source + 1]
  return batch


class TrainRows(EpochRows):
  """Endless packed rows of one process, reshuffled every epoch (see the module docstring)."""

  def __init__(self, docs: TokenizedDocs, seq_len: int, seed: int, pad_id: int,
               process_index: int, process_count: int):
    super().__init__(seed, process_index, process_count)
    self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id

  def epoch(self, epoch: int) -> Pieces:
    """This process's rows of `epoch`: random cut offsets, shuffled pieces, first-fit packing."""
    rng = np.random.default_rng([self.seed, epoch])
    n_pairs = self.docs.n_pairs
    offsets = np.where(n_pairs > self.seq_len, rng.integers(0, self.seq_len, len(n_pairs)), 0)
    doc, start, length = cut_documents(n_pairs, self.seq_len, offsets)
    shuffle = rng.permutation(len(doc))
    doc, start, length = doc[shuffle], start[shuffle], length[shuffle]
    rows = first_fit(length, self.seq_len)
    n_rows = int(rows.max()) + 1
    n_rows -= n_rows % self.process_count  # every process gets as many rows
    return shard_rows(self.docs, doc, start, length, rows, n_rows, self.process_index, self.process_count)

  def row(self, pieces: Pieces, row: int) -> dict[str, np.ndarray]:
    """Row `row` of an epoch's pieces, [seq_len] per key."""
    batch = assemble(self.docs, pieces, range(row, row + 1), self.seq_len, self.pad_id)
    return {key: value[0] for key, value in batch.items()}

  def made_from(self) -> dict:
    return {'seq_len': self.seq_len, 'n_tokens': len(self.docs.tokens)}


@dataclasses.dataclass(frozen=True)
class Dataset(RowsDataset):
  """Tokenized splits of one source for one process, and the batches made from them."""

  train_tokens: TokenizedDocs
  eval_tokens: TokenizedDocs

  def train_rows(self, batch_size: int, seq_len: int) -> TrainRows:
    global_batch = batch_size * self.process_count
    n_pairs = int(self.train_tokens.n_pairs.sum())
    if n_pairs < global_batch * seq_len:
      raise UserError(f"train split has {n_pairs} tokens, fewer than one batch ({global_batch}×{seq_len}); "
                      "use a smaller train.batch_size/train.seq_len or more data")
    return TrainRows(self.train_tokens, seq_len, self.seed, self.tokenizer.pad_id, self.process_index,
                     self.process_count)

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """The whole eval split once, in order (long documents cut into consecutive rows). Every process
    gets the same number of batches; padding rows have weight 0. max_batches > 0 keeps the first ones."""
    check_batch_shape(batch_size, seq_len)
    n_pairs = self.eval_tokens.n_pairs
    doc, start, length = cut_documents(n_pairs, seq_len, np.zeros_like(n_pairs))
    rows = first_fit(length, seq_len)
    n_rows = int(rows.max()) + 1
    pieces = shard_rows(self.eval_tokens, doc, start, length, rows, n_rows, self.process_index, self.process_count)
    n_batches = eval_batch_count(n_rows, batch_size, self.process_count, max_batches)
    empty_rows = max(0, n_batches * batch_size - pieces.n_rows)
    padded = dataclasses.replace(pieces, bounds=np.pad(pieces.bounds, (0, empty_rows), mode='edge'))
    return [assemble(self.eval_tokens, padded, range(b * batch_size, (b + 1) * batch_size), seq_len,
                     self.tokenizer.pad_id) for b in range(n_batches)]


def build_dataset(cfg_data: ConfigDict, seed: int, tokenizer_dir: str | None = None,
                  process_index: int = 0, process_count: int = 1) -> Dataset | stream.StoreDataset:
  """Loads the source, gets the tokenizer (the saved one in tokenizer_dir if present, else builds
  it on the train documents and saves it there) and tokenizes both splits. A token store
  (tokens:/mixture:) is streamed instead (data/stream.py): nothing but its manifest is read here."""
  check_launch(seed, process_index, process_count)
  if stream.is_store_source(cfg_data.source):
    return stream.build_store_dataset(cfg_data, seed, tokenizer_dir, process_index, process_count)
  source = sources.load_source(cfg_data)
  tokenizer = run_tokenizer(cfg_data.tokenizer, source.train_docs, tokenizer_dir, process_index)
  dataset = tokenized_dataset(source, tokenizer, seed, process_index, process_count)
  dataset.info['tokenizer'] = tokenizer.spec
  return dataset


def tokenized_dataset(source: sources.Source, tokenizer: Tokenizer, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Dataset:
  """Both splits of `source` tokenized, with the counts eval reports need (bits per byte)."""
  train, evals = tokenize_docs(tokenizer, source.train_docs), tokenize_docs(tokenizer, source.eval_docs)
  info = {**source.info, 'vocab_size': tokenizer.vocab_size,
          'train_target_tokens': int(train.n_pairs.sum()), 'eval_target_tokens': int(evals.n_pairs.sum()),
          'eval_bytes': sum(len(doc.encode('utf-8')) for doc in source.eval_docs)}
  # bits per byte = eval nats per target token / ln 2 / eval_bytes_per_token (EOS targets included)
  info['eval_bytes_per_token'] = info['eval_bytes'] / info['eval_target_tokens']
  if 'true_nats_per_doc' in info:
    # The true model's loss per target token under this tokenizer (= the source's figure when one
    # symbol is one token): a document carries the same information however it is tokenized.
    info['true_entropy_nats_per_token'] = (info['true_nats_per_doc'] * info['n_eval_docs']
                                           / info['eval_target_tokens'])
  return Dataset(tokenizer, info, seed, process_index, process_count, train, evals)


def run_tokenizer(spec: str, train_docs: list[str], tokenizer_dir: str | None,
                  process_index: int) -> SavedTokenizer:
  """The saved tokenizer when there is one (a resumed run), else a new one saved by process 0."""
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.spec != spec:
      raise UserError(f"{tokenizer_dir} holds a {tokenizer.spec!r} tokenizer but data.tokenizer is {spec!r}; "
                      "set it back or use a fresh workdir")
    return tokenizer
  tokenizer = build_tokenizer(spec, train_docs)
  if tokenizer_dir and process_index == 0:
    tokenizer.save(tokenizer_dir)
  return tokenizer
