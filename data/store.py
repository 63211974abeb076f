"""The token store: documents tokenized once into ArrayRecord shards, read back by any number of hosts.

Layout (format `lmlab-token-store/1`):

  STORE/
    manifest.json    written LAST, atomically (tmp + os.replace): a folder without it is not a store
    tokenizer/       the tokenizer (SavedTokenizer.save); load it with `store_tokenizer`
    train/shard-00000-of-00004.array_record  ...
    eval/shard-00000-of-00001.array_record   ...

One ArrayRecord record = one document, or one chunk of a long one: the bytes of a little-endian
int32 array of token ids, framed as `data.tokenizer.document_frame` says (as `data.pipeline.tokenize_docs` frames a document ([BOS] + ids +
[EOS]; BOS only if the tokenizer adds one, EOS if it has one). A document longer than `chunk_tokens`
(`data.store.chunk_tokens`) is split into consecutive records of at most that many tokens (BOS only
on the first, EOS only on the last); the packer cuts records into seq_len pieces anyway. Records are
written with `group_size:1` (random access for grain) and zstd:1 (token ids compress ~5x).

Splits follow data/sources.py: `text:GLOB` is one document per file with eval = the last
eval_fraction of each file's characters; `jsonl:GLOB:FIELD` and `tfds:NAME` are one document per
record with eval = every k-th record (`sources.holdout_mask`; tfds uses its validation/test split
when it has one).

manifest.json:
  {"format": "lmlab-token-store/1",
   "tokenizer": {"spec", "kind", "vocab_size", "sha256": tokenizer_hash(STORE/tokenizer)},
   "splits": {"train": {"shards": [relative paths], "records": N, "documents": D, "tokens": T,
                        "records_per_shard": [...], "bytes": UTF-8 bytes of the text}, "eval": {...}},
   "chunk_tokens": ..., "sources": [{"path", "bytes", "sha256"}], "versions": {...},
   "data_config": {the data section that built it}}

A shard is written under a hidden temporary name (`.shard-...array_record.tmp-<uuid>`) and renamed
when closed, so a crash never leaves a half-written shard visible. Builders that resume (the Beam
stage, data/tokenize_beam.py) keep finished shards and rewrite only missing ones (a hidden
`.build.json` holds the data config and source hashes an unfinished build started from, so only the
same build resumes); the manifest comes last. `write_store` is the small in-process writer (no Beam) for tests and small studies.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from importlib import metadata
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data.tokenizer import SavedTokenizer, load_tokenizer
from model.errors import UserError

FORMAT = 'lmlab-token-store/1'
MANIFEST = 'manifest.json'
TOKENIZER_DIR = 'tokenizer'
SPLITS = ('train', 'eval')
WRITER_OPTIONS = 'group_size:1,zstd:1'
CHUNK_TOKENS = 65536
BUILD_HINT = 'python run.py --config=experiments/tokenize.py --workdir=STORE --config.data.source=SOURCE'
VERSIONED = ('lmlab', 'apache-beam', 'array_record', 'sentencepiece', 'grain')


def shard_name(split: str, index: int, count: int) -> str:
  """Path of a shard relative to the store."""
  return f'{split}/shard-{index:05d}-of-{count:05d}.array_record'


def decode_record(record: bytes) -> np.ndarray:
  """Token ids of one record, int32 [n]."""
  return np.frombuffer(record, '<i4').astype(np.int32)


def encode_record(ids: np.ndarray) -> bytes:
  return np.asarray(ids, '<i4').tobytes()


def chunk(ids: np.ndarray, chunk_tokens: int) -> Iterator[np.ndarray]:
  """Consecutive pieces of at most chunk_tokens ids."""
  for start in range(0, max(len(ids), 1), chunk_tokens):
    yield ids[start:start + chunk_tokens]


class ShardWriter:
  """Writes one shard under a hidden temporary name; `close` renames it into place, `abort` removes it.

  Counts what it wrote: records, tokens and documents (records that start a document)."""

  def __init__(self, store: str, split: str, index: int, count: int):
    self.path = os.path.join(store, shard_name(split, index, count))
    folder, name = os.path.split(self.path)
    os.makedirs(folder, exist_ok=True)
    self._tmp = os.path.join(folder, f'.{name}.tmp-{uuid.uuid4().hex}')
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self.records = self.tokens = self.documents = 0

  def write(self, ids: np.ndarray, starts_document: bool) -> None:
    self._writer.write(encode_record(ids))
    self.records += 1
    self.tokens += len(ids)
    self.documents += int(starts_document)

  def close(self) -> dict:
    """Renames the finished shard into place; returns its counts."""
    self._writer.close()
    os.replace(self._tmp, self.path)
    return {'records': self.records, 'tokens': self.tokens, 'documents': self.documents}

  def abort(self) -> None:
    self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is not None:
      self.abort()


def count_shard(path: str, bos_id: int | None) -> dict:
  """Counts of a finished shard read back (a resumed build keeps it): documents = records starting
  with BOS (every store tokenizer adds one)."""
  reader = ArrayRecordReader(path)
  try:
    records = tokens = documents = 0
    n = reader.num_records()
    for start in range(0, n, 1024):
      for record in reader.read(list(range(start, min(start + 1024, n)))):
        ids = decode_record(record)
        records += 1
        tokens += len(ids)
        documents += int(len(ids) > 0 and ids[0] == bos_id)
    return {'records': records, 'tokens': tokens, 'documents': documents}
  finally:
    reader.close()


def tokenizer_hash(directory: str) -> str:
  """sha256 over the names and bytes of the tokenizer folder's files (sorted)."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path) and not name.startswith('.'):
      digest.update(name.encode() + b'\0')
      with open(path, 'rb') as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def versions() -> dict:
  """Versions of the packages that shaped the store's bytes."""
  found = {}
  for name in VERSIONED:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = None
  found['python'] = platform.python_version()
  return found


def split_entry(split: str, counts: Sequence[Mapping[str, int]]) -> dict:
  """The manifest entry of a split from its shards' counts (in shard order)."""
  n = len(counts)
  entry = {'shards': [shard_name(split, i, n) for i in range(n)],
           'records': sum(c['records'] for c in counts), 'documents': sum(c['documents'] for c in counts),
           'tokens': sum(c['tokens'] for c in counts), 'records_per_shard': [c['records'] for c in counts]}
  if counts and all('bytes' in c for c in counts):  # UTF-8 bytes of the text (the Beam stage counts them)
    entry['bytes'] = sum(c['bytes'] for c in counts)
  return entry


def write_manifest(store: str, tokenizer: SavedTokenizer, splits: Mapping[str, dict], chunk_tokens: int,
                   sources: Sequence[dict] = (), data_config: Mapping | None = None) -> dict:
  """Writes manifest.json last and atomically: from this moment the folder is a store."""
  tok_dir = os.path.join(store, TOKENIZER_DIR)
  manifest = {
      'format': FORMAT,
      'tokenizer': {'spec': tokenizer.spec, 'kind': tokenizer.kind, 'vocab_size': tokenizer.vocab_size,
                    'sha256': tokenizer_hash(tok_dir)},
      'splits': dict(splits), 'chunk_tokens': chunk_tokens, 'sources': list(sources),
      'versions': versions(), 'data_config': dict(data_config or {}),
  }
  path = os.path.join(store, MANIFEST)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, path)
  return manifest


def write_store(store: str, tokenizer: SavedTokenizer, splits: Mapping[str, Iterable[np.ndarray]], *,
                chunk_tokens: int = CHUNK_TOKENS, num_shards: int | Mapping[str, int] = 1,
                sources: Sequence[dict] = (), data_config: Mapping | None = None) -> dict:
  """A store made in-process from framed documents (as tokenize_docs frames them), one array each;
  document i of D goes to shard floor(i * n / D) so shards hold consecutive documents. Returns the
  manifest."""
  tokenizer.save(os.path.join(store, TOKENIZER_DIR))
  entries = {}
  for split, docs in splits.items():
    docs = list(docs)
    n = num_shards if isinstance(num_shards, int) else num_shards[split]
    counts = []
    for index, part in enumerate(np.array_split(np.arange(len(docs)), n)):
      with ShardWriter(store, split, index, n) as writer:
        for d in part:
          for k, piece in enumerate(chunk(np.asarray(docs[d], np.int32), chunk_tokens)):
            writer.write(piece, starts_document=k == 0)
        counts.append(writer.close())
    entries[split] = split_entry(split, counts)
  return write_manifest(store, tokenizer, entries, chunk_tokens, sources, data_config)


def read_manifest(store: str) -> dict:
  """The manifest of `store`; a missing or unreadable one is a one-line error with the fix."""
  path = os.path.join(store, MANIFEST)
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{store} is not a token store (no {MANIFEST}); build it with {BUILD_HINT.replace('STORE', store)} "
                    "--config.data.tokenizer=...") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is corrupt ({' '.join(str(e).split())}); re-run the tokenize stage on "
                    f"the same workdir ({BUILD_HINT.replace('STORE', store)} ...)") from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = manifest.get('format') if isinstance(manifest, dict) else None
    raise UserError(f"{path} has format {found!r}, not {FORMAT!r}; rebuild the store with {BUILD_HINT}")
  return manifest


def shard_paths(store: str, split: str, manifest: dict | None = None) -> list[str]:
  """Absolute paths of the split's shards, each checked to exist with the record count the manifest
  says (a missing or truncated shard is a one-line error naming it and the fix)."""
  manifest = manifest or read_manifest(store)
  entry = manifest['splits'].get(split)
  if entry is None:
    raise UserError(f"token store {store} has no {split!r} split (it has {sorted(manifest['splits'])}); "
                    "rebuild it with the tokenize stage")
  fix = f"re-run the tokenize stage on the same workdir ({BUILD_HINT.replace('STORE', store)} ...): it rewrites missing shards"
  paths = []
  for rel, expected in zip(entry['shards'], entry['records_per_shard']):
    path = os.path.join(store, rel)
    if not os.path.isfile(path):
      raise UserError(f"token store shard {path} is missing; {fix}")
    try:
      reader = ArrayRecordReader(path)
      found = reader.num_records()
      reader.close()
    except (RuntimeError, ValueError, OSError):
      raise UserError(f"token store shard {path} is truncated or corrupt; delete it and {fix}") from None
    if found != expected:
      raise UserError(f"token store shard {path} has {found} records, the manifest says {expected}; "
                      f"delete it and {fix}")
    paths.append(path)
  return paths


def store_tokenizer(store: str, manifest: dict | None = None) -> SavedTokenizer:
  """The store's tokenizer, checked against the hash in its manifest."""
  manifest = manifest or read_manifest(store)
  directory = os.path.join(store, TOKENIZER_DIR)
  tokenizer = load_tokenizer(directory)
  if tokenizer_hash(directory) != manifest['tokenizer']['sha256']:
    raise UserError(f"the tokenizer in {directory} does not match {store}/{MANIFEST} (hash differs); "
                    "rebuild the store with the tokenize stage")
  return tokenizer


def read_split(store: str, split: str) -> Iterator[np.ndarray]:
  """Every record of a split, shard by shard, in order (tests and small tools; training uses grain)."""
  for path in shard_paths(store, split):
    reader = ArrayRecordReader(path)
    try:
      n = reader.num_records()
      for start in range(0, n, 1024):
        yield from map(decode_record, reader.read(list(range(start, min(start + 1024, n)))))
    finally:
      reader.close()
