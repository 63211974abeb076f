"""Instruction records: JSONL files (or the synthetic chain) -> conversations, and GSM8K scoring.

A conversation is a list of messages {'role': 'system' | 'user' | 'assistant', 'content': str}
with at least one assistant reply (what SFT trains on). Sources (`sft.train`, `sft.eval`):

  prompt_completion:GLOB  {"prompt", "completion"}                -> [user, assistant]
  chat:GLOB               {"messages": [{"role", "content"}, ...]} -> the messages as written
  gsm8k:GLOB              {"question", "answer"}                   -> [user, assistant]
  hh:GLOB                 Anthropic HH {"chosen", ...}             -> the chosen dialogue's turns
  synthetic_instruct      a copy task over data.synthetic's Markov chain (`synthetic_instruct`)

Two more `sft.train` kinds are not conversations (train/stages/sft.py dispatches on the kind):
  text:GLOB               plain text files, every token trained (data/sft.py build_text_dataset)
  classify:GLOB           {"text", "label": str | int}          -> (text, label), `read_labeled`

Files are .jsonl or .jsonl.gz, one record per line (blank lines skipped), read in sorted order.
A record may carry a reference answer that a generated reply is scored against (exact match):
GSM8K's final number, a prompt_completion or synthetic completion; chat and HH have none.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np
from ml_collections import ConfigDict

from data import sources, synthetic
from data.jsonl import json_objects, string_fields
from model.errors import UserError

SPECS = ('prompt_completion:GLOB | chat:GLOB | gsm8k:GLOB | hh:GLOB | synthetic_instruct | text:GLOB | '
         'classify:GLOB')
ROLES = ('system', 'user', 'assistant')
SYNTHETIC_PROMPT_SYMBOLS = (4, 12)  # shortest and longest synthetic prompt (the reply is as long)

_HH_TURN = re.compile(r'\n\n(Human|Assistant):')
_CALCULATOR = re.compile(r'<<[^>]*>>')  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
_NUMBER = re.compile(r'-?\$?-?\d[\d,]*(?:\.\d+)?')


@dataclasses.dataclass(frozen=True)
class Record:
  """One conversation, and the answer a generated last reply is scored against (None = unscored)."""

  messages: list[dict[str, str]]
  reference: str | None = None


def read_records(spec: str, field: str, cfg_synthetic: ConfigDict | None = None) -> list[Record]:
  """The records `spec` names; `field` (e.g. 'sft.train') is the config field errors point at."""
  if spec == 'synthetic_instruct':
    if cfg_synthetic is None:
      raise UserError(f"{field}='synthetic_instruct' needs the data.synthetic config; pass it to build_sft_dataset")
    return synthetic_instruct(cfg_synthetic)
  kind, _, pattern = spec.partition(':')
  if kind not in _PARSERS or not pattern:
    raise UserError(f"{field}={spec!r} is not valid; use one of {SPECS}")
  return [record for path in sources.match_files(pattern, spec, field)
          for record in _read_file(path, _PARSERS[kind], field)]


def read_labeled(spec: str, field: str) -> list[tuple[str, str | int]]:
  """(text, label) of every record of a `classify:GLOB` spec; `field` names it in errors."""
  kind, _, pattern = spec.partition(':')
  if kind != 'classify' or not pattern:
    raise UserError(f"{field}={spec!r} is not valid here; use classify:GLOB")
  records = []
  for path in sources.match_files(pattern, spec, field):
    for where, obj in json_objects(path):
      label = obj.get('label')
      if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise UserError(f"{where} has no string or integer field 'label'; classification records "
                        'are {"text": ..., "label": ...}')
      records.append((*string_fields(obj, where, 'text'), label))
  if not records:
    raise UserError(f"{field}={spec!r} has no records; fill its files or point it elsewhere")
  return records


def answer_extractor(spec: str) -> Callable[[str], str | None]:
  """What part of a generated reply is compared with a `spec` record's reference."""
  return extract_answer if spec.startswith('gsm8k:') else str.strip


def hh_dialogue(text: str, where: str = 'dialogue') -> list[dict[str, str]]:
  """Messages of an Anthropic HH dialogue "\\n\\nHuman: ...\\n\\nAssistant: ..." (either side of a
  pair: the RLHF stages parse `rejected` the same way). Turn texts are stripped; consecutive turns
  of one speaker (a few HH dialogues have them) stay separate messages."""
  parts = _HH_TURN.split(text)
  if parts[0].strip() or len(parts) < 3:
    raise UserError(f"{where} is not an HH dialogue; it must start with '\\n\\nHuman:' and alternate "
                    "'\\n\\nHuman:' / '\\n\\nAssistant:' turns")
  speakers, texts = parts[1::2], parts[2::2]
  return [_message('user' if s == 'Human' else 'assistant', t.strip()) for s, t in zip(speakers, texts)]


def synthetic_instruct(cfg_synthetic: ConfigDict) -> list[Record]:
  """A task for a char model pretrained on `data.synthetic`: the prompt is the first 4..12 symbols
  of one of the chain's documents, the reply repeats them. Prompt and reply use only the chain's
  symbols, so the pretrained tokenizer covers them; the pretrained model knows which symbols may
  follow which, and SFT must teach it to copy (an induction head), which a 2-layer model learns in
  a few hundred steps. One record per document of the source, lengths fixed by data.synthetic.seed."""
  lo, hi = SYNTHETIC_PROMPT_SYMBOLS
  if cfg_synthetic.doc_len < hi:
    raise UserError(f"data.synthetic.doc_len={cfg_synthetic.doc_len} is shorter than the synthetic_instruct "
                    f"prompts ({hi} symbols); raise it to {hi} or more")
  chain, docs = synthetic.sample_documents(cfg_synthetic)
  lengths = np.random.default_rng([cfg_synthetic.seed, 2]).integers(lo, hi + 1, len(docs))
  prefixes = [text[:n] for text, n in zip(chain.render(docs[:, :hi]), lengths.tolist())]
  return [Record([_message('user', p), _message('assistant', p)], p) for p in prefixes]


def extract_answer(text: str) -> str | None:
  """The final answer of a GSM8K-style solution: the number after the last '####', else the last
  number in the text, without commas or '$' (a full stop after it is not part of it). None when the
  text has no number."""
  _, mark, tail = text.rpartition('####')
  found = _NUMBER.search(tail) if mark else None
  if found is None:
    found = next(reversed(list(_NUMBER.finditer(text))), None)
  return None if found is None else found.group().replace(',', '').replace('$', '')


def exact_match(predictions: Sequence[str | None], references: Sequence[str | None]) -> float:
  """Share of scored pairs (reference not None) whose prediction equals the reference; nan if none."""
  if len(predictions) != len(references):
    raise UserError(f"{len(predictions)} predictions for {len(references)} references; pass one per reference")
  scored = [(p, r) for p, r in zip(predictions, references) if r is not None]
  return sum(p == r for p, r in scored) / len(scored) if scored else float('nan')


def _read_file(path: str, parse: Callable[[dict, str], Record], field: str) -> list[Record]:
  records = []
  for where, obj in json_objects(path):
    records.append(parse(obj, where))
    if not any(m['role'] == 'assistant' for m in records[-1].messages):
      raise UserError(f"{where} has no assistant message; SFT trains on assistant replies, so add "
                      "one or drop that record")
  if not records:
    raise UserError(f"{path} has no records; fill it or leave it out of {field}")
  return records


def _message(role: str, content: str) -> dict[str, str]:
  return {'role': role, 'content': content}


def _prompt_completion(obj: dict, where: str) -> Record:
  prompt, completion = string_fields(obj, where, 'prompt', 'completion')
  return Record([_message('user', prompt), _message('assistant', completion)], completion.strip())


def _chat(obj: dict, where: str) -> Record:
  messages = obj.get('messages')
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where} has no 'messages' list; chat records are "
                    '{"messages": [{"role": ..., "content": ...}, ...]}')
  out = []
  for i, message in enumerate(messages):
    role = message.get('role') if isinstance(message, dict) else None
    if role not in ROLES:
      raise UserError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
    out.append(_message(role, *string_fields(message, f'{where}: message {i}', 'content')))
  return Record(out)


def _gsm8k(obj: dict, where: str) -> Record:
  """The solution as the reply, without calculator annotations (the text beside them says the
  same, and a model without a calculator should not learn to emit them)."""
  question, answer = string_fields(obj, where, 'question', 'answer')
  answer = _CALCULATOR.sub('', answer)
  return Record([_message('user', question), _message('assistant', answer)], extract_answer(answer))


def _hh(obj: dict, where: str) -> Record:
  return Record(hh_dialogue(*string_fields(obj, where, 'chosen'), where=where))


def read_hh_pairs(pattern: str, field: str) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
  """(chosen, rejected) messages of every HH record the glob matches (the RLHF stages' pairs)."""
  return [tuple(hh_dialogue(text, where) for text in string_fields(obj, where, 'chosen', 'rejected'))
          for path in sources.match_files(pattern, f'hh:{pattern}', field) for where, obj in json_objects(path)]


_PARSERS: dict[str, Callable[[dict, str], Record]] = {
    'prompt_completion': _prompt_completion, 'chat': _chat, 'gsm8k': _gsm8k, 'hh': _hh}
