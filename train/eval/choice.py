"""Multiple choice by log-likelihood, from JSONL records {"context", "choices": [...], "label"},
or `synthetic`: items drawn from the configured Markov chain (a task a model trained on it learns).

Each choice is scored as the continuation of the context (concatenated as written: put any space
in the choices, as lm-eval's `target_delimiter` would). Metrics as lm-eval's multiple_choice output
type computes them: `acc` picks the highest summed log-likelihood, `acc_norm` divides it by the
choice's length in characters (`acc_bytes`: in UTF-8 bytes); `acc_norm_tokens` divides by its
length in tokens instead (not an lm-eval metric).
"""
import dataclasses
from typing import Any

import numpy as np

from data import synthetic
from data.jsonl import json_objects
from model.errors import UserError
from train.eval.requests import bos_prefix, encode_pair, string_field
from train.eval.scoring import Scorer

EXAMPLE = '{"context": "The sky is", "choices": [" blue", " green"], "label": 0}'


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: tuple[str, ...]
  label: int


def read_items(paths: list[str], limit: int = 0) -> list[Item]:
  """The items of the files, checked: a missing field or an out-of-range label names its line."""
  items = []
  for path in paths:
    for where, obj in json_objects(path):
      context = string_field(obj, where, 'context', EXAMPLE)
      choices = obj.get('choices')
      if (not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings; "
                        f'records look like {EXAMPLE}')
      label = obj.get('label')
      if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"{where}: 'label' is {label!r}, it must be the index (0 to "
                        f"{len(choices) - 1}) of the right choice")
      items.append(Item(context, tuple(choices), label))
  if not items:
    raise UserError(f'{", ".join(paths)} holds no multiple-choice records; records look like {EXAMPLE}')
  return items[:limit or None]


def synthetic_items(cfg_synthetic: Any, n: int = 200, context_len: int = 8, n_choices: int = 4
                    ) -> list[Item]:
  """A chain prefix and its sampled next symbol among `n_choices - 1` symbols that can never follow
  it: a model that learned the chain's transitions scores 1, chance is 1 / n_choices."""
  chain = synthetic.markov_chain(cfg_synthetic)
  rng = np.random.default_rng([cfg_synthetic.seed, 3])
  docs = chain.sample(rng, n, context_len + 1)
  items = []
  for doc, text in zip(docs, chain.render(docs)):
    illegal = np.flatnonzero(chain.transitions[doc[-2]] == 0)
    if len(illegal) < n_choices - 1:
      raise UserError('choice:synthetic needs data.synthetic.branching <= n_symbols - 3')
    options = [int(doc[-1]), *rng.choice(illegal, n_choices - 1, replace=False).tolist()]
    order = rng.permutation(n_choices)
    items.append(Item(text[:-1], tuple(chain.alphabet[options[k]] for k in order),
                      int(np.flatnonzero(order == 0)[0])))
  return items


def choice_requests(items: list[Item], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
  """One (context, choice) request per choice of every item, in order."""
  prefix = bos_prefix(tokenizer)
  return [encode_pair(tokenizer, it.context, choice, prefix) for it in items for choice in it.choices]


def choice_metrics(items: list[Item], loglikelihoods: list[float], choice_tokens: list[int]
                   ) -> dict[str, float]:
  """acc, acc_norm (per character), acc_bytes, acc_norm_tokens over the items, from each choice's summed
  log-likelihood and token count (flat, in `choice_requests` order)."""
  hits: dict[str, list[float]] = {'acc': [], 'acc_norm': [], 'acc_bytes': [], 'acc_norm_tokens': []}
  i = 0
  for it in items:
    n = len(it.choices)
    ll = np.asarray(loglikelihoods[i:i + n])
    chars = np.asarray([len(c) for c in it.choices], np.float64)
    n_bytes = np.asarray([len(c.encode('utf-8')) for c in it.choices], np.float64)
    tokens = np.asarray(choice_tokens[i:i + n], np.float64)
    i += n
    for name, scores in (('acc', ll), ('acc_norm', ll / chars), ('acc_bytes', ll / n_bytes),
                         ('acc_norm_tokens', ll / tokens)):
      hits[name].append(float(np.argmax(scores) == it.label))
  return {name: float(np.mean(v)) for name, v in hits.items()}


def run_choice(items: list[Item], tokenizer: Any, scorer: Scorer) -> dict[str, float]:
  requests = choice_requests(items, tokenizer)
  before = scorer.truncated
  scores = scorer.loglikelihood(requests)
  out = choice_metrics(items, [ll for ll, _ in scores], [len(cont) for _, cont in requests])
  out['chance'] = float(np.mean([1 / len(it.choices) for it in items]))
  out['truncated'] = float(scorer.truncated - before)
  return out
