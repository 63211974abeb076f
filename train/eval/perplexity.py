"""Perplexity and bits per byte of a named held-out set (Paloma-style: one figure per domain).

A set is `text:GLOB` (one document per file), `jsonl:GLOB:FIELD` (one per record) or `synthetic`
(the held-out documents of the configured Markov chain). Every token of a document is predicted
once, in disjoint windows of the model's context after BOS (no EOS scored), so `loss` is nats per
token and `bpb` is bits per UTF-8 byte of the text: comparable across tokenizers.

`tokens:STORE` is the eval split of a token store (data/store.py) as stored: ids after each
document's BOS, its EOS included (as training's eval_loss counts them), and bpb over the text bytes
the tokenize stage counted (whole split only: a store does not keep per-document byte counts).
"""
import dataclasses
import math
from typing import Any

from ml_collections import ConfigDict

from data import sources
from data import store as token_store
from data.jsonl import json_objects
from model.errors import UserError
from train.eval.requests import prefix_id, string_field
from train.eval.scoring import Scorer

SETS = 'text:GLOB | jsonl:GLOB:FIELD | synthetic | tokens:STORE'


def read_documents(spec: str, field: str, cfg_synthetic: ConfigDict | None = None) -> list[str]:
  """The documents of a held-out set `spec`; `field` names the config entry in errors."""
  kind, _, rest = spec.partition(':')
  if spec == 'synthetic':
    if cfg_synthetic is None:
      raise UserError(f'{field}: bpb:synthetic needs the data.synthetic config')
    source = sources.load_source(ConfigDict({'source': 'synthetic', 'eval_fraction': 0.1,
                                             'synthetic': cfg_synthetic}))
    return source.eval_docs
  if kind == 'text' and rest:
    return [text for _, text in sources.read_text_files(rest, field)]
  if kind == 'jsonl' and ':' in rest:
    pattern, name = rest.rsplit(':', 1)
    return [string_field(obj, where, name, f'{{"{name}": "some text"}}')
            for path in sources.match_files(pattern, spec, field) for where, obj in json_objects(path)]
  raise UserError(f'{field}: held-out set {spec!r} is not valid; use one of {SETS}')


def run_perplexity(documents: list[str], tokenizer: Any, scorer: Scorer) -> dict[str, float]:
  """loss (nats/token), ppl and bpb over the documents."""
  docs = [d for d in documents if d]
  if not docs:
    raise UserError('the held-out set has only empty documents; point it at some text')
  ids = [tokenizer.encode(d) for d in docs]
  nll = -sum(scorer.loglikelihood_rolling(ids, prefix_id(tokenizer)))
  n_tokens, n_bytes = sum(map(len, ids)), sum(len(d.encode('utf-8')) for d in docs)
  loss = nll / n_tokens
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)), 'bpb': nll / math.log(2) / n_bytes,
          'tokens': float(n_tokens), 'bytes': float(n_bytes)}


@dataclasses.dataclass(frozen=True)
class StoreSet:
  """Held-out documents of a token store, already tokenized."""
  documents: list[list[int]]  # each document's ids after its BOS (EOS included)
  prefix: int                 # the BOS every document follows
  bytes: int                  # UTF-8 bytes of their text; 0 when not known (part of the split, older store)


PROBE = 'The quick brown fox: 12 + 30 = 42.\n'


def store_documents(store: str, field: str, tokenizer: Any, limit: int = 0) -> StoreSet:
  """The first `limit` (0 = all) eval documents of `store`, checked to be in the model's tokenizer."""
  manifest = token_store.read_manifest(store)
  ours = token_store.store_tokenizer(store, manifest)
  if (ours.vocab_size, ours.bos_id, ours.encode(PROBE)) != (tokenizer.vocab_size, tokenizer.bos_id,
                                                            tokenizer.encode(PROBE)):
    raise UserError(f"{field}: store {store} was tokenized with {ours.spec!r}, not the model's tokenizer; "
                    "evaluate on a store built with the model's tokenizer (--config.data.tokenizer)")
  entry = manifest['splits'].get('eval') or {}
  if not entry.get('documents'):
    raise UserError(f'{field}: store {store} has no eval documents; rebuild it with data.eval_fraction > 0')
  docs: list[list[int]] = []
  for ids in token_store.read_split(store, 'eval'):
    if len(ids) and ids[0] == ours.bos_id:
      if limit and len(docs) == limit:
        break
      docs.append(ids[1:].tolist())
    elif docs:
      docs[-1].extend(ids.tolist())  # the next chunk of a long document
  whole = len(docs) == entry['documents']
  return StoreSet(docs, ours.bos_id, entry.get('bytes', 0) if whole else 0)


def run_store_perplexity(held: StoreSet, scorer: Scorer) -> dict[str, float]:
  """loss (nats/token), ppl, and bpb when the byte count is known."""
  nll = -sum(scorer.loglikelihood_rolling(held.documents, held.prefix))
  n_tokens = sum(map(len, held.documents))
  out = {'loss': nll / n_tokens, 'ppl': math.exp(min(nll / n_tokens, 50.0)), 'tokens': float(n_tokens)}
  if held.bytes:
    out.update(bpb=nll / math.log(2) / held.bytes, bytes=float(held.bytes))
  return out
