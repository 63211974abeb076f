"""A source read as bounded blocks, so the tokenize stage streams any corpus in constant memory.

`plan_source` makes one sequential pass over the files (hashing them, checking they decode, counting
characters and records) and cuts them into blocks of about `block_bytes` at line boundaries;
`read_block` later reads one block back as documents or document parts. The splits are those of
data/sources.py: `text:` files are one document each with eval = the last eval_fraction of the
file's characters; `jsonl:`/`tfds:` records are documents with eval = `sources.holdout_mask`.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
from typing import Iterator

import numpy as np

from data import sources
from model.errors import UserError

DECODE_ERRORS = ('strict', 'replace', 'ignore')
TFDS_BLOCK_RECORDS = 10_000
TFDS_RECORD_BYTES = 2000  # a guess for shard sizing: a record's text is only seen when read


@dataclasses.dataclass(frozen=True)
class Block:
  """A contiguous piece of one input: bytes [start, end) of a file, or records [start, end) of tfds.

  text: the decoded characters [char_lo, char_hi) of those bytes, part of one document that it
  `opens` and/or `closes`. jsonl/tfds: whole records, those with holdout_mask == `held_out` kept
  (None keeps all), record `first` being the block's first record overall.
  """

  kind: str
  path: str
  start: int
  end: int
  nbytes: float  # text bytes this block gives its split (for shard sizing)
  char_lo: int = 0
  char_hi: int = 0
  opens: bool = True
  closes: bool = True
  first: int = 0
  held_out: bool | None = None
  fraction: float = 0.0
  tfds_split: str = ''
  field: str = ''


@dataclasses.dataclass(frozen=True)
class Plan:
  blocks: dict[str, list[Block]]  # split -> blocks in document order
  sources: list[dict]             # {'path', 'bytes', 'sha256'} of every input


def plan_source(spec: str, fraction: float, errors: str, block_bytes: int, data_dir: str = '') -> Plan:
  """The blocks of both splits of data.source `spec`; an empty split is an error, nothing written."""
  sources.check_fraction(fraction, 'data.eval_fraction')
  if errors not in DECODE_ERRORS:
    raise UserError(f"data.decode_errors={errors!r} is not valid; use one of {' | '.join(DECODE_ERRORS)}")
  kind, _, rest = spec.partition(':')
  if kind == 'text' and rest:
    plan = _plan_text(rest, fraction, errors, block_bytes)
  elif kind == 'jsonl' and ':' in rest:
    pattern, field = rest.rsplit(':', 1)
    plan = _plan_jsonl(pattern, field, fraction, errors, block_bytes)
  elif kind == 'tfds' and rest:
    plan = _plan_tfds(rest, fraction, data_dir)
  else:
    raise UserError(f"data.source {spec!r} cannot be tokenized into a store; use text:GLOB | "
                    "jsonl:GLOB:FIELD | tfds:NAME[:FIELD]")
  for split, fix in (('train', 'add data or lower data.eval_fraction'), ('eval', 'raise data.eval_fraction or add data')):
    if not plan.blocks[split]:
      raise UserError(f"data.source {spec!r} has an empty {split} split; {fix}")
  return plan


def read_block(block: Block, errors: str = 'strict', data_dir: str = '') -> Iterator[tuple[str, bool, bool]]:
  """(text, opens a document, closes it) for each document or document part in the block."""
  if block.kind == 'tfds':
    yield from _read_tfds(block, data_dir)
    return
  if block.kind == 'text':
    text = _decode(_read_bytes(block), block.path, block.start, errors)
    yield text[block.char_lo:block.char_hi], block.opens, block.closes
    return
  index = block.first
  for number, line in enumerate(_lines(block, errors)):
    if not line.strip():
      continue
    keep = block.held_out is None or _held_out(index, block.fraction) == block.held_out
    index += 1
    if keep:
      yield _jsonl_value(line, block, number), True, True


def _held_out(i: int, fraction: float) -> bool:
  """sources.holdout_mask for record i alone (the same float arithmetic)."""
  return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def _plan_text(pattern: str, fraction: float, errors: str, block_bytes: int) -> Plan:
  blocks: dict[str, list[Block]] = {'train': [], 'eval': []}
  found, blank = [], True
  for path in sources.match_files(pattern, f'text:{pattern}'):
    ranges, chars, digest = [], [], hashlib.sha256()
    for start, raw in _scan(path, block_bytes):
      digest.update(raw)
      blank = blank and not raw.strip()
      ranges.append((start, start + len(raw)))
      chars.append(len(_decode(raw, path, start, errors)))
    found.append({'path': os.path.abspath(path), 'bytes': os.path.getsize(path), 'sha256': digest.hexdigest()})
    cut = int(sum(chars) * (1 - fraction))  # sources.split_tail
    blocks['train'].extend(_text_parts(path, ranges, chars, 0, cut))
    blocks['eval'].extend(_text_parts(path, ranges, chars, cut, sum(chars)))
  if blank:
    raise UserError(f"data.source 'text:{pattern}' has only empty files; point it at a non-empty corpus")
  return Plan(blocks, found)


def _text_parts(path: str, ranges: list[tuple[int, int]], chars: list[int], lo: int, hi: int) -> list[Block]:
  """Blocks holding characters [lo, hi) of a file: one document (no blocks when it is empty)."""
  parts, offset = [], 0
  for (start, end), n in zip(ranges, chars):
    a, b = max(lo, offset), min(hi, offset + n)
    if a < b:
      parts.append(Block('text', path, start, end, (end - start) * (b - a) / n, a - offset, b - offset,
                         opens=not parts, closes=False))
    offset += n
  if parts:
    parts[-1] = dataclasses.replace(parts[-1], closes=True)
  return parts


def _plan_jsonl(pattern: str, field: str, fraction: float, errors: str, block_bytes: int) -> Plan:
  """Blocks of whole lines, each read by both splits (keeping its held-out or its other records)."""
  shared, found, index = [], [], 0
  for path in sources.match_files(pattern, f'jsonl:{pattern}:{field}'):
    digest = hashlib.sha256()
    if path.endswith('.gz'):  # gzip cannot seek: the whole file is one block, streamed by lines
      with open(path, 'rb') as f:
        while raw := f.read(1 << 20):
          digest.update(raw)
      block = Block('jsonl', path, 0, -1, 0, first=index, field=field, fraction=fraction)
      n = sum(1 for line in _lines(block, errors) if line.strip())
      shared.append(dataclasses.replace(block, nbytes=os.path.getsize(path) * 4.0))
      index += n
    for start, raw in () if path.endswith('.gz') else _scan(path, block_bytes):
      digest.update(raw)
      n = sum(1 for line in _decode(raw, path, start, errors).split('\n') if line.strip())
      shared.append(Block('jsonl', path, start, start + len(raw), len(raw), first=index, field=field,
                          fraction=fraction))
      index += n
    found.append({'path': os.path.abspath(path), 'bytes': os.path.getsize(path), 'sha256': digest.hexdigest()})
  if not index:
    raise UserError(f"data.source 'jsonl:{pattern}:{field}' has no records; point it at a non-empty corpus")
  held = sources.holdout_mask(index, fraction)
  share = {False: 1 - held.mean(), True: held.mean()}
  ends = [b.first for b in shared[1:]] + [index]
  blocks = {split: [dataclasses.replace(b, held_out=h, nbytes=b.nbytes * share[h])
                    for b, end in zip(shared, ends) if np.any(held[b.first:end] == h)]
            for split, h in (('train', False), ('eval', True))}
  return Plan(blocks, found)


def _plan_tfds(rest: str, fraction: float, data_dir: str) -> Plan:
  """Record ranges of a prepared TFDS dataset: its validation (or test) split is eval when present."""
  name, field = sources._parse_tfds(rest)
  splits = sources.tfds_splits(name, data_dir)
  eval_split = next((s for s in ('validation', 'test') if s in splits), None)

  def ranges(split: str, held_out: bool | None) -> list[Block]:
    n = splits[split].num_examples
    share = 1.0 if held_out is None else (fraction if held_out else 1 - fraction)
    return [Block('tfds', name, a, min(a + TFDS_BLOCK_RECORDS, n), TFDS_RECORD_BYTES * share * (min(a + TFDS_BLOCK_RECORDS, n) - a), first=a,
                  held_out=held_out, fraction=fraction, tfds_split=split, field=field)
            for a in range(0, n, TFDS_BLOCK_RECORDS)]
  blocks = ({'train': ranges('train', None), 'eval': ranges(eval_split, None)} if eval_split else
            {'train': ranges('train', False), 'eval': ranges('train', True)})
  info = [{'path': f'tfds:{name}', 'split': s, 'records': splits[s].num_examples, 'data_dir': data_dir}
          for s in dict.fromkeys(b.tfds_split for split in blocks.values() for b in split)]
  return Plan(blocks, info)


def _scan(path: str, block_bytes: int) -> Iterator[tuple[int, bytes]]:
  """(offset, bytes) of consecutive blocks of about block_bytes, each ending after a newline."""
  with open(path, 'rb') as f:
    start = 0
    while raw := f.read(block_bytes):
      raw += f.readline()
      yield start, raw
      start += len(raw)


def _lines(block: Block, errors: str) -> Iterator[str]:
  """The lines of a jsonl block (a .gz file streamed whole)."""
  if not block.path.endswith('.gz'):
    yield from _decode(_read_bytes(block), block.path, block.start, errors).split('\n')
    return
  with gzip.open(block.path, 'rt', encoding='utf-8', errors=errors) as f:
    try:
      yield from f
    except UnicodeDecodeError:
      raise UserError(f"{block.path} is not UTF-8 text once decompressed; convert it, leave it out of "
                      "the glob, or set data.decode_errors=replace (or ignore)") from None


def _read_bytes(block: Block) -> bytes:
  with open(block.path, 'rb') as f:
    f.seek(block.start)
    return f.read(block.end - block.start)


def _decode(raw: bytes, path: str, offset: int, errors: str) -> str:
  try:
    return raw.decode('utf-8', errors)
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {offset + e.start}); convert it, leave it out of the "
                    "glob, or set data.decode_errors=replace (or ignore)") from None


def _jsonl_value(line: str, block: Block, number: int) -> str:
  where = f"{block.path} (line {number + 1} of the block at byte {block.start})"
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    raise UserError(f"{where} is not valid JSON; fix or remove that line") from None
  value = record.get(block.field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    raise UserError(f"{where} has no string field {block.field!r}; check the FIELD in 'jsonl:GLOB:FIELD'")
  return value


def _read_tfds(block: Block, data_dir: str) -> Iterator[tuple[str, bool, bool]]:
  import tensorflow_datasets as tfds
  records = tfds.data_source(block.path, split=block.tfds_split, data_dir=data_dir or None, download=False)
  for index in range(block.start, block.end):
    if block.held_out is not None and _held_out(index, block.fraction) != block.held_out:
      continue
    value = records[index].get(block.field)
    if not isinstance(value, (bytes, str)):
      raise UserError(f"tfds dataset {block.path!r} split {block.tfds_split!r} record {index} has no text "
                      f"field {block.field!r}; name the field as tfds:NAME:FIELD")
    yield (value.decode('utf-8') if isinstance(value, bytes) else value), True, True
