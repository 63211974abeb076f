"""Where documents come from: `data.source` -> train and eval documents (plain strings) plus facts.

Forms: `synthetic` (a seeded Markov language with known entropy), `text:GLOB` (one document per
file; eval = the last eval_fraction of each file, nanoGPT's split), `jsonl:GLOB:FIELD` (one document
per record; eval = every k-th record), `tfds:NAME[:FIELD]` (a prepared TFDS dataset read through
array_record without TensorFlow; see data/tfds_text.py to turn local files into one).
Documents are held in memory as strings (fine for small studies); a large corpus is tokenized once
into a token store (stage tokenize) and streamed with `tokens:STORE` / `mixture:...` (data/stream.py).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from data import synthetic
from data.jsonl import json_objects
from model.errors import UserError

SOURCES = 'synthetic | text:GLOB | jsonl:GLOB:FIELD | tfds:NAME[:FIELD]'
STORE_SOURCES = 'tokens:STORE | mixture:STORE1=W1,STORE2=W2'  # stage=pretrain only: data/stream.py


@dataclasses.dataclass(frozen=True)
class Source:
  """Documents of both splits, and facts worth reporting (counts, and the true loss for synthetic)."""

  train_docs: list[str]
  eval_docs: list[str]
  info: dict


def load_source(cfg_data: ConfigDict) -> Source:
  """The documents `cfg_data.source` names, split into train and eval."""
  spec, fraction = cfg_data.source, cfg_data.eval_fraction
  check_fraction(fraction, 'data.eval_fraction')
  kind, _, rest = spec.partition(':')
  if spec == 'synthetic':
    source = _synthetic(cfg_data.synthetic, fraction)
  elif kind == 'text' and rest:
    source = text_source(rest, fraction)
  elif kind == 'jsonl' and ':' in rest:
    source = _jsonl(*rest.rsplit(':', 1), fraction)
  elif kind == 'tfds' and rest:
    source = _tfds(rest, cfg_data.data_dir, fraction)
  elif kind in ('tokens', 'mixture'):
    raise UserError(f"data.source {spec!r} is a token store, which only stage=pretrain (decoder or encoder) "
                    f"streams; give this stage one of {SOURCES}")
  else:
    raise UserError(f"data.source {spec!r} is not valid; use one of {SOURCES} | {STORE_SOURCES}")
  if not source.train_docs:
    raise UserError(f"data.source {spec!r} has an empty train split; add data or lower data.eval_fraction")
  if not source.eval_docs:
    raise UserError(f"data.source {spec!r} has an empty eval split; raise data.eval_fraction or add data")
  return source


def check_fraction(fraction: float, field: str) -> None:
  """A held-out share must leave both splits something."""
  if not 0 < fraction < 1:
    raise UserError(f"{field}={fraction} must be strictly between 0 and 1; use e.g. 0.1")


def holdout_mask(n: int, fraction: float) -> np.ndarray:
  """Which of n records are held out: every k-th (k = 1/fraction), spread evenly, exactly
  floor(n * fraction) of them."""
  i = np.arange(n)
  return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def split_tail(text: str, fraction: float) -> tuple[str, str]:
  """(head, tail) with the tail the last `fraction` of the characters (nanoGPT's 90/10 split)."""
  cut = int(len(text) * (1 - fraction))
  return text[:cut], text[cut:]


def read_text_files(pattern: str, field: str = 'data.source') -> list[tuple[str, str]]:
  """(path, text) of every file `pattern` matches, sorted; a pattern with no (non-blank) text is an
  error naming the config `field` that gave it."""
  files = [(path, _read_utf8(path)) for path in match_files(pattern, f'text:{pattern}', field)]
  if not any(text.strip() for _, text in files):
    raise UserError(f"{field} 'text:{pattern}' has only empty files; point it at a non-empty corpus")
  return files


def match_files(pattern: str, spec: str, field: str = 'data.source') -> list[str]:
  """Files the glob matches, sorted; none is an error naming the config `field` and its `spec`."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    raise UserError(f"{field} {spec!r} matched no files; check the path or glob")
  return paths


def _synthetic(cfg: ConfigDict, fraction: float) -> Source:
  chain, docs = synthetic.sample_documents(cfg)
  held_out = holdout_mask(len(docs), fraction)
  train, evals = docs[~held_out], docs[held_out]
  info = {
      'n_train_docs': len(train), 'n_eval_docs': len(evals),
      'train_chars': train.size, 'eval_chars': evals.size,
      'true_entropy_nats_per_token': chain.expected_nll(cfg.doc_len),  # one token per symbol
      'true_nats_per_doc': chain.doc_entropy(cfg.doc_len),  # tokenizer-independent
      'entropy_rate_nats_per_symbol': chain.entropy_rate(),
      'eval_true_nll_nats_per_token': chain.nll(evals) if len(evals) else float('nan'),  # this sample
  }
  return Source(chain.render(train), chain.render(evals), info)


def text_source(pattern: str, fraction: float, field: str = 'data.source') -> Source:
  """One document per file; eval = the last `fraction` of each file."""
  splits = [split_tail(text, fraction) for _, text in read_text_files(pattern, field)]
  train = [head for head, _ in splits if head]
  evals = [tail for _, tail in splits if tail]
  return Source(train, evals, _counts(train, evals, n_files=len(splits)))


def _jsonl(pattern: str, field: str, fraction: float) -> Source:
  paths = match_files(pattern, f'jsonl:{pattern}:{field}')
  docs = [doc for path in paths for doc in _jsonl_field(path, field)]
  held_out = holdout_mask(len(docs), fraction)
  train = [d for d, h in zip(docs, held_out) if not h]
  evals = [d for d, h in zip(docs, held_out) if h]
  return Source(train, evals, _counts(train, evals, n_files=len(paths)))


def _jsonl_field(path: str, field: str) -> list[str]:
  """`field` of every record of a .jsonl or .jsonl.gz file (blank lines skipped)."""
  docs = []
  for where, record in json_objects(path):
    if not isinstance(record.get(field), str):
      raise UserError(f"{where} has no string field {field!r}; check the FIELD in 'jsonl:GLOB:FIELD'")
    docs.append(record[field])
  return docs


def tfds_splits(name: str, data_dir: str) -> dict:
  """The prepared splits of a TFDS dataset (read from its metadata, no download); it must have
  'train'. Errors name the dataset and data.data_dir."""
  import tensorflow_datasets as tfds  # here, so only tfds sources pay for the import
  try:
    splits = tfds.builder(name, data_dir=data_dir or None).info.splits
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"tfds dataset {name!r} not found; check the name or data.data_dir") from None
  if 'train' not in splits:
    raise UserError(f"tfds dataset {name!r} has no prepared 'train' split under data.data_dir "
                    f"{data_dir or '(default)'}; prepare it (tfds build) or fix data.data_dir")
  return splits


def _tfds(rest: str, data_dir: str, fraction: float) -> Source:
  """A prepared TFDS dataset: 'train' plus 'validation' (or 'test'), else eval carved from train."""
  import tensorflow_datasets as tfds  # here, so only tfds sources pay for the import
  name, field = _parse_tfds(rest)
  splits = tfds_splits(name, data_dir)
  train = _tfds_field(tfds.data_source(name, split='train', data_dir=data_dir or None, download=False),
                      name, 'train', field)
  eval_split = next((s for s in ('validation', 'test') if s in splits), None)
  if eval_split:
    records = tfds.data_source(name, split=eval_split, data_dir=data_dir or None, download=False)
    evals = _tfds_field(records, name, eval_split, field)
  else:
    held_out = holdout_mask(len(train), fraction)
    train, evals = [d for d, h in zip(train, held_out) if not h], [d for d, h in zip(train, held_out) if h]
  return Source(train, evals, _counts(train, evals, tfds_eval_split=eval_split or 'train (every k-th)'))


def _parse_tfds(rest: str) -> tuple[str, str]:
  """'NAME[/CONFIG][:VERSION][:FIELD]' -> (name with version, field); FIELD defaults to 'text'."""
  head, _, last = rest.rpartition(':')
  if head and not re.fullmatch(r'[\d.*]+', last):
    return head, last
  return rest, 'text'


def _tfds_field(records: Sequence[dict], name: str, split: str, field: str) -> list[str]:
  """`field` of every record of a TFDS data source, as str."""
  docs = []
  for index in range(len(records)):
    value = records[index].get(field)
    if not isinstance(value, (bytes, str)):
      raise UserError(f"tfds dataset {name!r} split {split!r} record {index} has no text field {field!r}; "
                      "name the field as tfds:NAME:FIELD")
    docs.append(value.decode('utf-8') if isinstance(value, bytes) else value)
  return docs


def _read_utf8(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it or leave it out of the glob") from None


def _counts(train: list[str], evals: list[str], **extra) -> dict:
  return {'n_train_docs': len(train), 'n_eval_docs': len(evals),
          'train_chars': sum(map(len, train)), 'eval_chars': sum(map(len, evals)), **extra}
