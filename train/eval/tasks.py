"""A suite of named eval tasks from one config string, read and tokenized once, run on a model.

`eval.tasks` is a comma-separated list of `NAME=KIND:ARG` entries (NAME defaults to the file's stem):

  bpb:SET                    loss, ppl, bpb of a held-out set (text:GLOB | jsonl:GLOB:FIELD | synthetic
                             | tokens:STORE, a token store's eval split)
  choice:GLOB                acc, acc_norm, acc_bytes, acc_norm_tokens of {"context", "choices", "label"}
                             records; choice:synthetic draws them from data.synthetic's chain
  gsm8k:GLOB                 exact_match of greedy GSM8K answers (the SFT stage's prompts and scoring)
  generate:GLOB[|CHECKER]    exact_match of {"prompt", "answer"} records (exact | regex:PAT | MODULE:FN)

e.g. `--config.eval.tasks='shakespeare=bpb:text:data/*.txt,quiz=choice:tasks/quiz.jsonl'`.
Results are {name: {metric: value}}; the training loop logs them as eval/NAME/METRIC.
"""
import dataclasses
import os
from typing import Any, Callable

from ml_collections import ConfigDict

from data import sources
from model.errors import UserError
from model.lora import merge_lora
from model.sampling import Sampling
from train.eval.choice import read_items, run_choice, synthetic_items
from train.eval.generation import (Generator, gsm8k_checker, gsm8k_problems, make_checker,
                                   run_generation, text_problems)
from train.eval.perplexity import read_documents, run_perplexity, run_store_perplexity, store_documents
from train.eval.scoring import Scorer

KINDS = ('bpb', 'choice', 'gsm8k', 'generate')
FORM = 'NAME=KIND:ARG with KIND one of bpb, choice, gsm8k, generate (see train/eval/tasks.py)'
Results = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str
  arg: str


def parse_tasks(spec: str, field: str = 'eval.tasks') -> list[TaskSpec]:
  """The entries of an `eval.tasks` string; a malformed entry or a repeated name is an error."""
  out: list[TaskSpec] = []
  for entry in filter(None, (e.strip() for e in spec.split(','))):
    name, eq, rest = entry.partition('=')
    if not eq or ':' in name:
      name, rest = '', entry
    kind, _, arg = rest.partition(':')
    if kind not in KINDS or not arg:
      raise UserError(f'{field}: task {entry!r} is not valid; write {FORM}')
    if not name:
      path = arg.split('|')[0]
      name = f'synthetic_{kind}' if arg == 'synthetic' else os.path.basename(path).split('.')[0].strip('*')
    if not name or any(t.name == name for t in out):
      raise UserError(f'{field}: task name {name!r} is empty or repeated; name each task, NAME=KIND:ARG')
    out.append(TaskSpec(name, kind, arg))
  return out


@dataclasses.dataclass
class Suite:
  """Tasks ready to run: each a function (scorer, generator) -> {metric: value}."""
  tasks: list[tuple[str, Callable[[Scorer, Generator], dict[str, float]]]]

  def run(self, scorer: Scorer, generator: Generator) -> Results:
    return {name: fn(scorer, generator) for name, fn in self.tasks}


def build_suite(cfg_eval: ConfigDict, tokenizer: Any, cfg_synthetic: ConfigDict | None = None
                ) -> Suite:
  """Read every task of `cfg_eval.tasks` (files are checked now, not at the first eval step)."""
  limit = cfg_eval.task_examples
  tasks = []
  for t in parse_tasks(cfg_eval.tasks):
    field = f'eval.tasks[{t.name}]'
    if t.kind == 'bpb' and t.arg.startswith('tokens:'):
      held = store_documents(t.arg.removeprefix('tokens:'), field, tokenizer, limit)
      fn = lambda s, g, held=held: run_store_perplexity(held, s)
    elif t.kind == 'bpb':
      docs = read_documents(t.arg, field, cfg_synthetic)[:limit or None]
      fn = lambda s, g, docs=docs: run_perplexity(docs, tokenizer, s)
    elif t.kind == 'choice' and t.arg == 'synthetic':
      items = synthetic_items(cfg_synthetic, limit or 200)
      fn = lambda s, g, items=items: run_choice(items, tokenizer, s)
    elif t.kind == 'choice':
      items = read_items(sources.match_files(t.arg, t.arg, field), limit)
      fn = lambda s, g, items=items: run_choice(items, tokenizer, s)
    elif t.kind == 'gsm8k':
      problems = gsm8k_problems(f'gsm8k:{t.arg}', field, tokenizer, cfg_eval.template, limit)
      fn = lambda s, g, p=problems: run_generation(p, gsm8k_checker, tokenizer, g)
    else:
      pattern, _, checker_spec = t.arg.partition('|')
      problems = text_problems(sources.match_files(pattern, t.arg, field), tokenizer, limit)
      checker = make_checker(checker_spec, field)
      fn = lambda s, g, p=problems, c=checker: run_generation(p, c, tokenizer, g)
    tasks.append((t.name, fn))
  return Suite(tasks)


def evaluators(model: Any, variables: dict, model_cfg: Any, mesh: Any, cfg_eval: ConfigDict
               ) -> tuple[Scorer, Generator]:
  """A scorer over `variables` ({'params'} or {'params', 'lora'}) and a generator over the same
  weights with any adapters merged, both on `mesh`."""
  params = variables['params']
  if 'lora' in variables:
    params = merge_lora(params, variables['lora'], model_cfg)
  scorer = Scorer(model, variables, mesh, batch_size=cfg_eval.task_batch_size)
  generator = Generator(model, params, mesh, max_new_tokens=cfg_eval.max_new_tokens,
                        sampling=Sampling(cfg_eval.temperature), batch_size=cfg_eval.task_batch_size)
  return scorer, generator


def flat(results: Results, prefix: str = 'eval/') -> dict[str, float]:
  """{prefix + 'NAME/METRIC': value}: how metric writers log a suite's results."""
  return {f'{prefix}{name}/{k}': v for name, metrics in results.items() for k, v in metrics.items()}
