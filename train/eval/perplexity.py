"""Perplexity and bits per byte of a named held-out set (Paloma-style: one figure per domain).

A set is `text:GLOB` (one document per file), `jsonl:GLOB:FIELD` (one per record) or `synthetic`
(the held-out documents of the configured Markov chain). Every token of a document is predicted
once, in disjoint windows of the model's context after BOS (no EOS scored), so `loss` is nats per
token and `bpb` is bits per UTF-8 byte of the text: comparable across tokenizers.
"""
import math
from typing import Any

from ml_collections import ConfigDict

from data import sources
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
  if kind == 'tokens':
    # Hook: pre-tokenized stores (data/, being built) score their documents' ids directly, without
    # the UTF-8 byte count unless the store records it.
    raise UserError(f'{field}: bpb:tokens:STORE is not supported yet; use text:GLOB or jsonl:GLOB:FIELD')
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
