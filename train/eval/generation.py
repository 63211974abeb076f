"""Generation tasks: prompt -> completion (greedy, or sampled) -> a checker's score in [0, 1].

Sources: `gsm8k:GLOB` (GSM8K {"question", "answer"} records, prompted with the chat template as
the SFT stage renders them and scored by the final number, data/formats.py, so the figure equals
the SFT stage's exact match) and `generate:GLOB[|CHECKER]` ({"prompt", "answer"} records, the
prompt continued as plain text). CHECKER: `exact` (stripped reply == answer, the default),
`regex:PATTERN` (the pattern's first group, or whole match, in the reply == answer) or
`MODULE:FUNCTION`, a Python scorer called as fn(reply, record) -> float.
"""
import dataclasses
import importlib
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from data import formats
from data.jsonl import json_objects
from data.sft import render, resolve_template
from model.errors import UserError
from model.generate import generate_rows
from model.sampling import Sampling
from train.eval.requests import bos_prefix, string_field
from train.mesh import mesh_rules

Checker = Callable[[str, dict], float]
EXAMPLE = '{"prompt": "2 + 2 =", "answer": "4"}'


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: list[int]   # token ids the model continues
  record: dict        # what the checker sees; 'answer' is the reference


@dataclasses.dataclass
class Generator:
  """What generation needs: the deterministic model, plain params (LoRA merged), the mesh."""
  model: nn.Module
  params: Any
  mesh: jax.sharding.Mesh
  max_new_tokens: int = 256
  sampling: Sampling = Sampling(0.0)
  batch_size: int = 16
  seed: int = 0
  truncated: int = 0  # prompts cut from the left so far

  def replies(self, tokenizer: Any, prompts: Sequence[Sequence[int]]) -> list[str]:
    """Completions decoded without their stop token, `batch_size` prompts per generate call (the
    SFT stage's batching, so greedy replies match it token for token). A prompt longer than the
    context less `max_new_tokens` keeps its last tokens, as in lm-eval (but at least half the
    context: a small model's reply is cut at its context instead)."""
    stops = tuple(tokenizer.stop_ids)
    n = self.model.cfg.max_len
    keep = max(n - self.max_new_tokens, n // 2)  # lm-eval's left truncation, half the context at least
    self.truncated += sum(len(p) > keep for p in prompts)
    prompts = [p[-keep:] for p in prompts]
    with mesh_rules(self.mesh):
      rows = generate_rows(self.model, self.params, prompts, max_new_tokens=self.max_new_tokens,
                           rng=jax.random.PRNGKey(self.seed), chunk_size=self.batch_size,
                           sampling=self.sampling, stop_ids=stops, pad_id=tokenizer.pad_id).tokens
    ids = [row.tolist() for row in rows]
    return [tokenizer.decode(r[:-1] if r and r[-1] in stops else r) for r in ids]


def gsm8k_problems(spec: str, field: str, tokenizer: Any, template: str = 'auto',
                   limit: int = 0) -> list[Problem]:
  """GSM8K records rendered as the SFT stage renders its eval prompts (data/sft.py)."""
  records = formats.read_records(spec, field)[:limit or None]
  name = resolve_template(tokenizer, template)
  out = []
  for r in records:
    rendered = render(tokenizer, r.messages, name)
    out.append(Problem(rendered.ids[:rendered.reply_start].tolist(), {'answer': r.reference}))
  return out


def text_problems(paths: list[str], tokenizer: Any, limit: int = 0) -> list[Problem]:
  out = []
  for path in paths:
    for where, obj in json_objects(path):
      prompt = string_field(obj, where, 'prompt', EXAMPLE)
      string_field(obj, where, 'answer', EXAMPLE)
      out.append(Problem(bos_prefix(tokenizer) + tokenizer.encode(prompt), obj))
  if not out:
    raise UserError(f'{", ".join(paths)} holds no generation records; records look like {EXAMPLE}')
  return out[:limit or None]


def gsm8k_checker(reply: str, record: dict) -> float:
  """The SFT stage's GSM8K score: the reply's final number equals the reference's."""
  return float(formats.extract_answer(reply) == record['answer'])


def make_checker(spec: str, field: str) -> Checker:
  """`exact`, `regex:PATTERN` or `MODULE:FUNCTION` (see the module docstring)."""
  if spec in ('', 'exact'):
    return lambda reply, record: float(reply.strip() == record['answer'].strip())
  if spec.startswith('regex:'):
    try:
      pattern = re.compile(spec.removeprefix('regex:'))
    except re.error as e:
      raise UserError(f'{field}: checker {spec!r} is not a valid regular expression ({e})') from None

    def by_regex(reply: str, record: dict) -> float:
      found = pattern.search(reply)
      got = None if found is None else (found.group(1) if pattern.groups else found.group())
      return float(got is not None and got.strip() == record['answer'].strip())
    return by_regex
  module, _, name = spec.partition(':')
  try:
    fn = getattr(importlib.import_module(module), name) if name else None
  except (ImportError, AttributeError):
    fn = None
  if not callable(fn):
    raise UserError(f"{field}: checker {spec!r} is not exact, regex:PATTERN or an importable "
                    "MODULE:FUNCTION taking (reply, record) -> float")
  return fn


def run_generation(problems: list[Problem], checker: Checker, tokenizer: Any,
                   generator: Generator) -> dict[str, float]:
  """Mean checker score (`exact_match`) over the problems that have an answer."""
  before = generator.truncated
  replies = generator.replies(tokenizer, [p.prompt for p in problems])
  scores = [checker(reply, p.record) for reply, p in zip(replies, problems)
            if p.record.get('answer') is not None]
  return {'exact_match': float(np.mean(scores)) if scores else float('nan'),
          'scored': float(len(scores)), 'truncated': float(generator.truncated - before)}
