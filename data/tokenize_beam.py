"""The tokenize stage's pipeline: a source -> a token store (data/store.py), as an Apache Beam job.

The driver plans (one streaming pass over the source: hashes, UTF-8 check, block boundaries;
data/blocks.py), builds the tokenizer (SentencePiece trains on a bounded sample of blocks, the char
alphabet takes one streaming pass) and saves it into the store. The Beam job then has one element
per shard: a worker reads that shard's blocks one at a time, tokenizes them, and writes the shard
under a temporary name that it renames when closed; a last step writes manifest.json. Memory per
worker is a few blocks (`data.store.block_mb`), whatever the corpus size. A re-run on the same
store keeps every finished shard (it only counts it) and writes the missing ones.

Local run (Beam's DirectRunner, one worker process per core):

  python run.py --config=experiments/tokenize.py --workdir=/data/stores/owt \\
    --config.data.source='text:/data/owt/*.txt' --config.data.tokenizer=spm_bpe:32000

Cluster run: the same command, with Beam's standard pipeline options in data.store.beam_options
(the workers need this package, e.g. a wheel built with `pip wheel --no-deps -w dist .`, and the
source and the store on a filesystem every worker mounts, such as NFS or a GCS FUSE mount):

  python run.py --config=experiments/tokenize.py --workdir=/mnt/gcs/stores/owt \\
    --config.data.source='text:/mnt/gcs/owt/*.txt' --config.data.tokenizer=spm_bpe:32000 \\
    --config.data.store.beam_options='--runner=DataflowRunner --project=PROJECT --region=REGION
      --temp_location=gs://BUCKET/tmp --extra_package=dist/lmlab-0.1.0-py3-none-any.whl'
  # Flink: --runner=FlinkRunner --flink_master=HOST:8081 --environment_type=LOOPBACK
  # Spark: --runner=SparkRunner --spark_master_url=spark://HOST:7077
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import time
from typing import Callable, Iterable, Iterator

import numpy as np
from ml_collections import ConfigDict
from sentencepiece import sentencepiece_model_pb2

from data import blocks as blocks_lib
from data import store as store_lib
from data.tokenizer import SPECS, document_frame, SentencePieceTokenizer, SavedTokenizer, build_tokenizer, load_tokenizer
from model.errors import UserError

BUILD_FILE = '.build.json'  # data config and sources a partial build started from (checked on re-run)
MB = 1 << 20
SPM_PIECE = 4096  # characters SentencePiece encodes at once (see _line_pieces_encoder)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One shard to write: its split, index of count, and the blocks it holds in order."""

  split: str
  index: int
  count: int
  blocks: tuple[blocks_lib.Block, ...]


def plan_units(plan: blocks_lib.Plan, shard_bytes: float) -> list[Unit]:
  """Each split's blocks grouped into consecutive shards of about shard_bytes of text."""
  units = []
  for split, blocks in plan.blocks.items():
    sizes = np.array([b.nbytes for b in blocks], np.float64)
    total = max(sizes.sum(), 1.0)
    n = max(1, min(len(blocks), math.ceil(total / shard_bytes)))
    shard = np.minimum(((np.cumsum(sizes) - sizes) * n / total).astype(np.int64), n - 1)
    units += [Unit(split, i, n, tuple(b for b, s in zip(blocks, shard) if s == i)) for i in range(n)]
  return units


def write_unit(store: str, tokenizer: SavedTokenizer, unit: Unit, chunk_tokens: int, errors: str,
               data_dir: str = '') -> dict:
  """Writes one shard (or counts it, when a previous run finished it): its counts, keyed by split."""
  key = {'split': unit.split, 'index': unit.index}
  path = os.path.join(store, store_lib.shard_name(unit.split, unit.index, unit.count))
  if os.path.isfile(path):
    try:
      text_bytes = sum(len(text.encode('utf-8')) for block in unit.blocks
                       for text, _, _ in blocks_lib.read_block(block, errors, data_dir))
      return {**key, **store_lib.count_shard(path, tokenizer.bos_id), 'bytes': text_bytes, 'kept': True}
    except (RuntimeError, ValueError, OSError):
      os.remove(path)  # damaged by hand: write it again
  text_bytes = [0]
  with store_lib.ShardWriter(store, unit.split, unit.index, unit.count) as writer:
    for ids, starts in _records(tokenizer, unit.blocks, chunk_tokens, errors, data_dir, text_bytes):
      writer.write(ids, starts)
    return {**key, **writer.close(), 'bytes': text_bytes[0], 'kept': False}


def _records(tokenizer: SavedTokenizer, blocks: Iterable[blocks_lib.Block], chunk_tokens: int, errors: str,
             data_dir: str, text_bytes: list[int]) -> Iterator[tuple[np.ndarray, bool]]:
  """(record, starts a document) for the blocks' documents, framed and chunked as write_store does;
  a document cut by the shard's end is flushed unclosed (the next shard holds the rest). Adds the
  UTF-8 bytes of the documents' text to text_bytes[0] (bits per byte divide by it)."""
  bos, eos = document_frame(tokenizer)
  encode = _line_pieces_encoder(tokenizer)
  carry, starts = np.zeros(0, np.int32), False
  for block in blocks:
    for text, opens, closes in blocks_lib.read_block(block, errors, data_dir):
      text_bytes[0] += len(text.encode('utf-8'))
      if opens:
        carry, starts = bos, True
      carry = np.concatenate([carry, encode(text)] + ([eos] if closes else []))
      full = len(carry) if closes else len(carry) // chunk_tokens * chunk_tokens
      for start in range(0, full, chunk_tokens):
        yield carry[start:start + chunk_tokens], starts
        starts = False
      carry = carry[full:]
  if len(carry):
    yield carry, starts


def _line_pieces_encoder(tokenizer: SavedTokenizer) -> Callable[[str], np.ndarray]:
  """encode_array, by pieces of about SPM_PIECE characters cut after a newline for SentencePiece
  models that keep '\\n' a piece of its own (those trained here): the same ids, but SentencePiece's
  cost grows faster than the length of one input (4 MB at once is ~3x slower than 4 KB pieces)."""
  if not isinstance(tokenizer, SentencePieceTokenizer):
    return tokenizer.encode_array
  pieces = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto).pieces
  user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  if not any(p.piece == '\n' and p.type == user_defined for p in pieces):
    return tokenizer.encode_array

  def encode(text: str) -> np.ndarray:
    parts, start = [], 0
    while start < len(text):
      cut = text.find('\n', start + SPM_PIECE)
      end = len(text) if cut < 0 else cut + 1
      parts.append(tokenizer.encode_array(text[start:end]))
      start = end
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
  return encode


def finish_store(counts: list[dict], store: str, chunk_tokens: int, sources: list[dict], data_config: dict) -> None:
  """Writes the manifest from every shard's counts: the pipeline's last step."""
  splits = {}
  for split in store_lib.SPLITS:
    mine = sorted((c for c in counts if c['split'] == split), key=lambda c: c['index'])
    splits[split] = store_lib.split_entry(split, mine)
  tokenizer = load_tokenizer(os.path.join(store, store_lib.TOKENIZER_DIR))
  store_lib.write_manifest(store, tokenizer, splits, chunk_tokens, sources, data_config)


def pipeline_args(beam_options: str, workers: int) -> list[str]:
  """Beam's local runner with one worker process per core, then the user's options (they win)."""
  local = ['--runner=DirectRunner', '--direct_running_mode=multi_processing',
           f'--direct_num_workers={workers or os.cpu_count() or 1}', '--default_sdk_harness_log_level=WARNING']
  return local + shlex.split(beam_options)


def run_pipeline(units: list[Unit], store: str, cfg_data: ConfigDict, sources: list[dict], data_config: dict) -> None:
  logging.getLogger('apache_beam').setLevel(logging.ERROR)  # the runner forwards workers' warnings
  root_level = logging.getLogger().level
  logging.getLogger().setLevel(logging.ERROR)  # Beam's import warns about optional GCP clients
  import apache_beam as beam  # here: only the tokenize stage pays for Beam's import
  from apache_beam.options.pipeline_options import PipelineOptions
  logging.getLogger().setLevel(root_level)

  chunk_tokens, errors, data_dir = cfg_data.store.chunk_tokens, cfg_data.decode_errors, cfg_data.data_dir

  class WriteShard(beam.DoFn):
    """One unit -> its shard on disk -> its counts."""

    def setup(self):
      self.tokenizer = load_tokenizer(os.path.join(store, store_lib.TOKENIZER_DIR))

    def process(self, unit: Unit):
      yield write_unit(store, self.tokenizer, unit, chunk_tokens, errors, data_dir)

  # local worker processes import this checkout, whatever the installed copy
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p)
  options = PipelineOptions(pipeline_args(cfg_data.store.beam_options, cfg_data.store.workers))
  try:
    with beam.Pipeline(options=options) as p:
      _ = (p | 'Shards' >> beam.Create(units) | beam.Reshuffle() | 'Write' >> beam.ParDo(WriteShard())
           | beam.combiners.ToList()
           | 'Manifest' >> beam.Map(finish_store, store, chunk_tokens, sources, data_config))
  except UserError:
    raise
  except Exception as e:  # a worker's UserError comes back inside the runner's error text
    found = re.search(r'UserError: (.*)', str(e))
    if found:
      raise UserError(found.group(1).strip()) from None
    raise


def store_data_config(cfg_data: ConfigDict) -> dict:
  """The data fields that decide the store's bytes (where and how wide the job runs do not)."""
  config = {k: cfg_data[k] for k in ('source', 'tokenizer', 'eval_fraction', 'data_dir', 'decode_errors')}
  config['store'] = {k: v for k, v in cfg_data.store.to_dict().items() if k not in ('beam_options', 'workers')}
  return config


def check_existing(store: str, config: dict) -> dict | None:
  """The finished manifest when the store is complete and matches; an error when it (or a partial
  build) was made from another config; None when there is work to do."""
  fix = f"use another --workdir, or delete {store} to rebuild it"
  manifest_path = os.path.join(store, store_lib.MANIFEST)
  if os.path.exists(manifest_path):
    manifest = store_lib.read_manifest(store)
    built = manifest['data_config']
  elif os.path.exists(os.path.join(store, BUILD_FILE)):
    manifest = None
    with open(os.path.join(store, BUILD_FILE), encoding='utf-8') as f:
      built = json.load(f)['data_config']
  else:
    return None
  if built.get('tokenizer') != config['tokenizer']:
    raise UserError(f"{store} holds a token store of tokenizer {built.get('tokenizer')!r}, not "
                    f"{config['tokenizer']!r}; {fix}")
  if built != config:
    changed = sorted(k for k in set(built) | set(config) if built.get(k) != config.get(k))
    raise UserError(f"{store} holds a token store built with other data settings ({', '.join(changed)}); {fix}")
  if manifest is None:
    return None
  try:
    for split in manifest['splits']:
      store_lib.shard_paths(store, split, manifest)
  except UserError:
    return None  # a shard went missing: rebuild it
  return manifest


def check_sources(store: str, found: list[dict]) -> None:
  """A partial build resumes only on the same source files (its kept shards came from them)."""
  path = os.path.join(store, BUILD_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    before = json.load(f)['sources']
  if before != found:
    raise UserError(f"the source files changed since the unfinished build in {store} began; delete {store} "
                    "to rebuild it, or restore the files")


def store_tokenizer(cfg_data: ConfigDict, store: str, plan: blocks_lib.Plan) -> SavedTokenizer:
  """The store's tokenizer: the one a previous run saved, else built (trained on a bounded sample
  of train blocks, or on all of them streamed for the char alphabet) and saved."""
  directory = os.path.join(store, store_lib.TOKENIZER_DIR)
  spec, s = cfg_data.tokenizer, cfg_data.store
  if os.path.exists(os.path.join(directory, 'tokenizer.json')):
    tokenizer = load_tokenizer(directory)
    if tokenizer.spec != spec:
      raise UserError(f"{directory} holds tokenizer {tokenizer.spec!r}, not {spec!r}; use another --workdir, "
                      f"or delete {store} to rebuild it")
    return tokenizer
  train = plan.blocks['train']
  if spec.startswith(('spm_bpe:', 'spm_unigram:')):
    budget, total = s.tokenizer_sample_mb * MB, sum(b.nbytes for b in train)
    step = max(1, round(total / budget)) if total > budget else 1
    train = train[::step]  # evenly spaced blocks, about the budget in all
  elif spec != 'char':
    train = []
  texts = (text for b in train for text, _, _ in blocks_lib.read_block(b, cfg_data.decode_errors, cfg_data.data_dir))
  tokenizer = build_tokenizer(spec, texts)
  tokenizer.save(directory)
  return tokenizer


def build_store(cfg_data: ConfigDict, store: str) -> dict:
  """Tokenizes cfg_data.source into the token store `store`; returns its manifest."""
  store = os.path.abspath(store)  # Beam's workers may run elsewhere
  config = store_data_config(cfg_data)
  existing = check_existing(store, config)
  if existing is not None:
    print(f'tokenize: {store} is complete (manifest.json); nothing to do', flush=True)
    return existing
  s = cfg_data.store
  if s.chunk_tokens < 2 or s.block_mb <= 0 or s.shard_mb <= 0:
    raise UserError(f"data.store.chunk_tokens={s.chunk_tokens}, block_mb={s.block_mb}, shard_mb={s.shard_mb} "
                    "must be positive (chunk_tokens >= 2); use the defaults")
  if not re.fullmatch(r'byte|char|spm:.+|spm_(bpe|unigram):[1-9]\d*', cfg_data.tokenizer):
    raise UserError(f"data.tokenizer {cfg_data.tokenizer!r} is not valid; use one of {SPECS}")
  start = time.time()
  plan = blocks_lib.plan_source(cfg_data.source, cfg_data.eval_fraction, cfg_data.decode_errors,
                                int(s.block_mb * MB), cfg_data.data_dir)
  planned = time.time()
  check_sources(store, plan.sources)
  os.makedirs(store, exist_ok=True)
  with open(os.path.join(store, BUILD_FILE), 'w', encoding='utf-8') as f:
    json.dump({'data_config': config, 'sources': plan.sources}, f, indent=1)
  tokenizer = store_tokenizer(cfg_data, store, plan)
  units = plan_units(plan, s.shard_mb * MB)
  n_bytes = sum(b.nbytes for split in plan.blocks.values() for b in split)
  print(f'tokenize: {n_bytes / MB:.1f} MB of text in {sum(map(len, plan.blocks.values()))} blocks -> '
        f'{len(units)} shards; planned in {planned - start:.1f}s, tokenizer {tokenizer.spec} (vocab '
        f'{tokenizer.vocab_size}) ready in {time.time() - planned:.1f}s', flush=True)
  began = time.time()
  run_pipeline(units, store, cfg_data, plan.sources, config)
  manifest = store_lib.read_manifest(store)
  seconds = time.time() - start
  print(f'tokenize: pipeline ran in {time.time() - began:.1f}s', flush=True)
  for split, entry in manifest['splits'].items():
    print(f"tokenize: {split}: {entry['documents']} documents, {entry['records']} records, "
          f"{entry['tokens']} tokens in {len(entry['shards'])} shards", flush=True)
  print(f'tokenize: done in {seconds:.1f}s ({n_bytes / MB / seconds:.2f} MB/s of text)', flush=True)
  return manifest

