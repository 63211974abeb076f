"""Token stores -> packed batches, streamed by grain and resumable on any process count.

`data.source=tokens:STORE` trains on one store (data/store.py), `mixture:S1=0.7,S2=0.3` on several.
The pipeline is grain's own pieces, per store:

  ArrayRecordDataSource(train shards) -> MapDataset.source -> shuffle(seed) (grain reshuffles every
  epoch) -> repeat -> to_iter_dataset (reader threads) -> FlatMap: decode and cut each record into
  pieces of <= seq_len (input, target) pairs -> WindowShuffle (pieces of a long document spread
  over many batches) -> FirstFitPackIterDataset (segment ids and positions per piece, so no piece
  attends to another)

then `IterDataset.mix` by weight over the stores' rows (grain's deterministic weighted
interleave: a weight is a share of rows, and so of tokens since rows are packed ~95% full),
`batch` into global batches, this process's slice, and a prefetch thread.

Guarantee (exact and elastic resume). Every process builds the same global stream of packed rows:
it depends on the stores, the seed, seq_len and the mixture, never on the process or device count
or the batch size. Global batch b is rows [b*B, (b+1)*B) of that stream and process p of P takes
the block [p*B/P, (p+1)*B/P) of it (the rows its devices hold in a global array). The iterator
state is grain's state of the global row stream, identical on every process, so a checkpoint taken
on P processes restores on any P' (train/checkpoint.py reads any process's copy): the run continues
at the same global row, with no row dropped, repeated or reordered. The price is that every process
reads and packs the whole global batch (4 bytes per token) and keeps only its block; at hundreds of
hosts a per-record length index would let each process read only its own rows.

Start-up reads only the manifests, the store's tokenizer and each shard's record count (its
footer); records are read by grain as the batches need them.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import os
import shutil
import weakref
from typing import Any, Iterator

import grain
import numpy as np
from ml_collections import ConfigDict

from data import store as token_store
from data.tokenizer import TOKENIZER_FILE, SavedTokenizer
from model.errors import UserError

PACKING_BINS = 64    # rows first-fit packing fills at once; more = less padding, more memory
SHUFFLE_TOKENS = 1 << 21  # pieces shuffled together before packing: this many tokens' worth...
SHUFFLE_PIECES = 4096     # ...or at most this many pieces (a window's Python objects stay small)
READ_THREADS = 2     # grain reader threads per store (record reads and decoding overlap the step)
READ_BUFFER = 256    # records read ahead per store
PREFETCH_BATCHES = 4  # batches a background thread keeps ready
FORMS = 'tokens:STORE | mixture:STORE1=W1,STORE2=W2,...'


@dataclasses.dataclass(frozen=True)
class Member:
  """One store of a run's source and its share of the rows."""

  path: str
  weight: float
  manifest: dict


def is_store_source(spec: str) -> bool:
  return spec.startswith(('tokens:', 'mixture:'))


def parse_source(spec: str) -> list[tuple[str, float]]:
  """'tokens:STORE' -> [(STORE, 1.0)]; 'mixture:A=0.7,B=0.3' -> [(A, 0.7), (B, 0.3)]."""
  kind, _, rest = spec.partition(':')
  if kind == 'tokens' and rest:
    return [(rest, 1.0)]
  if kind != 'mixture' or not rest:
    raise UserError(f"data.source {spec!r} is not valid; use {FORMS}")
  members = []
  for part in rest.split(','):
    path, eq, weight = part.rpartition('=')
    try:
      value = float(weight)
    except ValueError:
      value = math.nan
    if not eq or not path or not math.isfinite(value) or value < 0:
      raise UserError(f"data.source mixture entry {part!r} is not STORE=WEIGHT with a weight >= 0; "
                      "write e.g. mixture:runs/web=0.7,runs/code=0.3")
    members.append((path, value))
  if sum(w for _, w in members) <= 0:
    raise UserError(f"data.source {spec!r} has weights summing to 0; give at least one store a weight > 0")
  return [(path, w) for path, w in members if w > 0]


def decode_pieces(seq_len: int) -> grain.experimental.FlatMapTransform:
  """record bytes -> {'inputs', 'targets'} pieces of <= seq_len pairs (a piece restarts positions)."""

  class Cut(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20  # a record may be a whole long document

    def flat_map(self, record: bytes) -> list[dict[str, np.ndarray]]:
      ids = token_store.decode_record(record)
      pairs = len(ids) - 1
      return [{'inputs': ids[s:min(s + seq_len, pairs)], 'targets': ids[s + 1:min(s + seq_len, pairs) + 1]}
              for s in range(0, pairs, seq_len)]

  return Cut()


def contract(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed features -> the batch dict of data/pipeline.py."""
  segments = batch['targets_segment_ids'].astype(np.int32)
  return {'inputs': batch['inputs'].astype(np.int32), 'targets': batch['targets'].astype(np.int32),
          'segment_ids': segments, 'positions': batch['inputs_positions'].astype(np.int32),
          'weights': (segments > 0).astype(np.float32)}


def check_shape(batch_size: int, seq_len: int) -> None:
  if batch_size < 1 or seq_len < 1:
    raise UserError(f"batch of {batch_size}×{seq_len} rows is empty; use a per-process batch size and seq_len >= 1")


def process_block(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
  """Rows [index*B/count, (index+1)*B/count) of a global batch of B rows."""
  rows = len(batch['inputs']) // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def packed_rows(records: grain.MapDataset, seq_len: int, pad_id: int, seed: int, shuffle: bool = True
                ) -> grain.IterDataset:
  """Records (bytes) -> packed rows of seq_len, each a dict of grain's packed features; `shuffle`
  mixes pieces within a window (SHUFFLE_TOKENS / SHUFFLE_PIECES, so the rows of a batch are not consecutive
  windows of one long document) and rows within each packed group."""
  pieces = grain.experimental.FlatMapIterDataset(
      records.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)),
      decode_pieces(seq_len))
  if shuffle:
    pieces = grain.experimental.WindowShuffleIterDataset(
        pieces, window_size=max(PACKING_BINS, min(SHUFFLE_PIECES, SHUFFLE_TOKENS // seq_len)), seed=seed)
  return grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct={'inputs': seq_len, 'targets': seq_len}, num_packing_bins=PACKING_BINS,
      seed=seed, shuffle_bins=shuffle, padding_struct={'inputs': pad_id, 'targets': pad_id})


_OPEN: weakref.WeakSet = weakref.WeakSet()  # iterators whose prefetch threads run


@atexit.register
def _close_open() -> None:
  """Stop prefetch threads before interpreter teardown: a daemon thread caught inside a shard read
  then aborts the process ('FATAL: exception not rethrown')."""
  for it in list(_OPEN):
    it.close()


class StreamIterator(grain.DatasetIterator):
  """The global stream's grain iterator plus a fingerprint that refuses a state from another run
  (other stores, seed or seq_len). `elastic`: its state is the same on every process, so
  train/checkpoint.py may restore it from any process's saved copy."""

  elastic = True

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict):
    super().__init__(parent)
    self._fingerprint = fingerprint
    _OPEN.add(self)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict:
    return {'stream': self._parent.get_state(), 'fingerprint': self._fingerprint}

  def set_state(self, state: dict) -> None:
    saved = state.get('fingerprint', {})
    for key, value in self._fingerprint.items():
      if saved.get(key) != value:
        raise UserError(f"data iterator state has {key}={saved.get(key)!r} but this run has {value!r}; "
                        "resume with the same data.source, seed and train.seq_len, or use a fresh workdir")
    self._parent.set_state(state['stream'])

  def close(self) -> None:
    _OPEN.discard(self)
    self._parent.close()


class EvalBatches:
  """The eval splits of every store once, in order, re-read on each pass (nothing held in memory).
  Every process gets the same number of batches; padding rows have weight 0."""

  def __init__(self, data: 'StoreDataset', batch_size: int, seq_len: int, max_batches: int):
    self._data, self._batch, self._seq_len, self._max = data, batch_size, seq_len, max_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    d = self._data
    sources = [grain.sources.ArrayRecordDataSource(token_store.shard_paths(m.path, 'eval', m.manifest))
               for m in d.members]
    records = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])
    global_batch = self._batch * d.process_count
    rows = packed_rows(records, self._seq_len, d.tokenizer.pad_id, d.seed, shuffle=False)
    for b, batch in enumerate(rows.batch(global_batch)):
      if self._max and b >= self._max:
        break
      batch = contract(batch)
      short = global_batch - len(batch['inputs'])  # the last batch: pad with empty rows
      fill = lambda k: d.tokenizer.pad_id if k in ('inputs', 'targets') else 0
      batch = {k: np.concatenate([v, np.full((short, self._seq_len), fill(k), v.dtype)]) for k, v in batch.items()}
      yield process_block(batch, d.process_index, d.process_count)


@dataclasses.dataclass(frozen=True)
class StoreDataset:
  """A run's view of one or more token stores: the interface of data/pipeline.Dataset."""

  tokenizer: SavedTokenizer
  info: dict
  members: tuple[Member, ...]
  seed: int
  process_index: int = 0
  process_count: int = 1

  def fingerprint(self, seq_len: int) -> dict:
    """What a saved position is valid for: the stores (by manifest, so a store may move), weights,
    seed and seq_len."""
    stores = [[m.weight, hashlib.sha256(json.dumps(m.manifest, sort_keys=True).encode()).hexdigest()[:16]]
              for m in self.members]
    return {'stores': stores, 'seed': self.seed, 'seq_len': seq_len}

  def rows(self, seq_len: int, epochs: int | None = None) -> grain.IterDataset:
    """The global stream of packed rows (grain features), the same on every process: endless, or
    `epochs` passes over every store (a mixture stops with its first store to end)."""
    streams = []
    for i, m in enumerate(self.members):
      source = grain.sources.ArrayRecordDataSource(token_store.shard_paths(m.path, 'train', m.manifest))
      records = grain.MapDataset.source(source).shuffle(seed=self.seed * 1000 + i).repeat(epochs)
      streams.append(packed_rows(records, seq_len, self.tokenizer.pad_id, self.seed * 1000 + i))
    if len(streams) == 1:
      return streams[0]
    return grain.IterDataset.mix(streams, [m.weight for m in self.members])

  def train_dataset(self, batch_size: int, seq_len: int) -> grain.IterDataset:
    """Endless batches of `batch_size` rows (this process's block of each global batch)."""
    check_shape(batch_size, seq_len)
    index, count = self.process_index, self.process_count
    batches = self.rows(seq_len).batch(batch_size * count, drop_remainder=True)
    return batches.map(lambda b: process_block(contract(b), index, count))

  def train_iter(self, batch_size: int, seq_len: int) -> StreamIterator:
    """Iterator over `train_dataset` with prefetch; get_state()/set_state() resume it exactly, on
    any process count."""
    dataset = grain.experimental.ThreadPrefetchIterDataset(self.train_dataset(batch_size, seq_len),
                                                           prefetch_buffer_size=PREFETCH_BATCHES)
    return StreamIterator(iter(dataset), self.fingerprint(seq_len))

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> EvalBatches:
    """The eval split(s) in order; max_batches > 0 keeps the first ones."""
    check_shape(batch_size, seq_len)
    return EvalBatches(self, batch_size, seq_len, max_batches)


def build_store_dataset(cfg_data: ConfigDict, seed: int, tokenizer_dir: str | None = None,
                        process_index: int = 0, process_count: int = 1) -> StoreDataset:
  """Reads the manifests and the store's tokenizer (checked against data.tokenizer, the other
  stores and a resumed run's), and copies it into `tokenizer_dir` for sampling."""
  members = tuple(Member(path, weight, token_store.read_manifest(path))
                  for path, weight in parse_source(cfg_data.source))
  first = members[0]
  for m in members[1:]:
    if m.manifest['tokenizer']['sha256'] != first.manifest['tokenizer']['sha256']:
      raise UserError(f"stores {first.path} and {m.path} were tokenized with different tokenizers "
                      f"({first.manifest['tokenizer']['spec']!r} vs {m.manifest['tokenizer']['spec']!r}); "
                      "mix only stores written with one tokenizer")
  store_tokenizer = os.path.join(first.path, token_store.TOKENIZER_DIR)
  spec = first.manifest['tokenizer']['spec']
  if spec != cfg_data.tokenizer:
    raise UserError(f"store {first.path} was tokenized with {spec!r} but data.tokenizer is "
                    f"{cfg_data.tokenizer!r}; set --config.data.tokenizer={spec} or use a store of that tokenizer")
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
    if token_store.tokenizer_hash(tokenizer_dir) != first.manifest['tokenizer']['sha256']:
      raise UserError(f"{tokenizer_dir} holds another tokenizer than store {first.path}; "
                      "train on stores of the run's tokenizer or use a fresh workdir")
  elif tokenizer_dir and process_index == 0:
    shutil.copytree(store_tokenizer, tokenizer_dir, dirs_exist_ok=True)
  tokenizer = token_store.store_tokenizer(first.path, first.manifest)
  return StoreDataset(tokenizer, store_info(members, tokenizer), members, seed, process_index, process_count)


def store_info(members: tuple[Member, ...], tokenizer: SavedTokenizer) -> dict[str, Any]:
  """Counts for the run's metadata and bits per byte, from the manifests alone."""
  split = lambda name: [m.manifest['splits'][name] for m in members]
  info = {'stores': [m.path for m in members], 'weights': [m.weight for m in members],
          'tokenizer': tokenizer.spec, 'vocab_size': tokenizer.vocab_size,
          'train_target_tokens': sum(s['tokens'] - s['records'] for s in split('train')),
          'eval_target_tokens': sum(s['tokens'] - s['records'] for s in split('eval'))}
  eval_bytes = [s.get('bytes') for s in split('eval')]
  if all(eval_bytes) and info['eval_target_tokens']:
    info['eval_bytes_per_token'] = sum(eval_bytes) / info['eval_target_tokens']
  return info
