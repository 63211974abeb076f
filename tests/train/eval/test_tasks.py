"""Task suite: lm-eval's multiple-choice metrics, request encoding, one-line errors for bad task
files, held-out sets read from text and JSONL alike, and the GSM8K generation task giving the SFT
stage's prompts and greedy replies."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from data.tokenizer import CharTokenizer
from experiments.base import get_config
from model.errors import UserError
from tests.helpers import tiny_config
from tests.train.eval.files import GSM8K_TEST, gsm8k_rows, write_jsonl
from train.eval.choice import Item, choice_metrics, read_items, run_choice
from train.eval.requests import encode_pair
from train.eval.tasks import build_suite, evaluators, parse_tasks
from train.loop import init_trainer


def eval_cfg(tasks: str, **kw) -> ConfigDict:
  e = get_config().eval
  e.tasks = tasks
  for k, v in kw.items():
    e[k] = v
  return e


def test_choice_metrics_follow_lm_eval():
  items = [Item('q', ('a', 'bbbb'), 1), Item('q', ('cc', 'd'), 0)]
  # item 0: the sum prefers 'a' (-2 > -3); per char and per token (4 tokens) 'bbbb' (-0.75), the label
  # item 1: the sum and per token ('cc' is one token) prefer 'd'; per char 'cc' (-0.75), the label
  got = choice_metrics(items, [-2.0, -3.0, -1.5, -1.0], [1, 4, 1, 1])
  assert got == {'acc': 0.0, 'acc_norm': 1.0, 'acc_bytes': 1.0, 'acc_norm_tokens': 0.5}


def test_encode_pair_moves_trailing_spaces_onto_the_continuation():
  tok = CharTokenizer('ab ')
  ctx, cont = encode_pair(tok, 'ab ', 'b', prefix=[tok.bos_id])
  assert ctx == [tok.bos_id] + tok.encode('ab') and cont == tok.encode(' b')


@pytest.mark.parametrize('record, message', [
    ({'choices': ['a', 'b'], 'label': 0}, "no string field 'context'"),
    ({'context': 'x', 'choices': ['a', 'b'], 'label': 2}, "'label' is 2, it must be the index"),
    ({'context': 'x', 'choices': ['a'], 'label': 0}, 'at least two non-empty strings'),
])
def test_bad_choice_record_is_one_line_naming_it(tmp_path, record, message):
  path = write_jsonl(str(tmp_path / 'bad.jsonl'), [{'context': 'x', 'choices': ['a', 'b'], 'label': 1},
                                                   record])
  with pytest.raises(UserError, match=message) as e:
    read_items([path])
  assert f'{path}:2' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('spec, message', [
    ('quiz=multiple:x.jsonl', "task 'quiz=multiple:x.jsonl' is not valid; write NAME=KIND:ARG"),
    ('a=bpb:synthetic,a=choice:synthetic', "task name 'a' is empty or repeated"),
])
def test_bad_task_list(spec, message):
  with pytest.raises(UserError, match=message):
    parse_tasks(spec)


def test_unknown_generation_checker(tmp_path):
  path = write_jsonl(str(tmp_path / 'g.jsonl'), [{'prompt': 'a', 'answer': 'b'}])
  with pytest.raises(UserError, match="checker 'nosuch.module:fn' is not exact, regex:PATTERN"):
    build_suite(eval_cfg(f'g=generate:{path}|nosuch.module:fn'), CharTokenizer('ab'))


@pytest.fixture(scope='module')
def tiny():
  texts = [r['question'] + r['answer'] for r in gsm8k_rows(40)]
  tok = CharTokenizer.from_texts(texts)
  cfg = tiny_config()
  cfg.model.max_len, cfg.mesh.data = 512, -1  # the first GSM8K test prompts fit
  return tok, init_trainer(cfg, tok.vocab_size)


def run_suite(tiny, tasks: str, **kw):
  tok, trainer = tiny
  cfg = eval_cfg(tasks, **kw)
  suite = build_suite(cfg, tok, get_config().data.synthetic)
  return suite.run(*evaluators(trainer.eval_model, trainer.variables(), trainer.model_cfg,
                               trainer.mesh, cfg))


def test_held_out_set_from_text_equals_jsonl(tiny, tmp_path):
  docs = [r['question'] for r in gsm8k_rows(3)]
  for i, d in enumerate(docs):
    (tmp_path / f'd{i}.txt').write_text(d, encoding='utf-8')
  write_jsonl(str(tmp_path / 'docs.jsonl'), [{'body': d} for d in docs])
  out = run_suite(tiny, f'a=bpb:text:{tmp_path}/d*.txt,b=bpb:jsonl:{tmp_path}/docs.jsonl:body')
  assert out['a'] == pytest.approx(out['b'])
  assert out['a']['bytes'] == sum(len(d.encode()) for d in docs)
  assert out['a']['bpb'] == pytest.approx(out['a']['loss'] * out['a']['tokens'] / out['a']['bytes']
                                          / np.log(2))


def test_context_longer_than_the_model_is_cut_and_counted(tiny):
  tok, trainer = tiny
  items = [Item('ab' * 300, ('a', 'b'), 0), Item('ab', ('a', 'b'), 1)]
  scorer, _ = evaluators(trainer.eval_model, trainer.variables(), trainer.model_cfg, trainer.mesh,
                         eval_cfg(''))
  assert run_choice(items, tok, scorer)['truncated'] == 2.0  # both choices of the long item


def test_held_out_set_from_a_token_store(tiny, tmp_path):
  """bpb:tokens:STORE scores the eval split's documents as stored (after BOS, EOS included), long
  documents put back together from their records; bpb needs the store's byte count."""
  import json

  from data import store as token_store
  from data.tokenizer import document_frame
  from train.eval.requests import prefix_id
  tok, trainer = tiny
  docs = [r['question'] for r in gsm8k_rows(3)]
  bos, eos = document_frame(tok)
  framed = [np.concatenate([bos, tok.encode_array(d), eos]) for d in docs]
  root = str(tmp_path / 'store')
  token_store.write_store(root, tok, {'train': framed[:1], 'eval': framed}, chunk_tokens=40)
  assert token_store.read_manifest(root)['splits']['eval']['records'] > len(docs)  # documents span records
  scorer, _ = evaluators(trainer.eval_model, trainer.variables(), trainer.model_cfg, trainer.mesh, eval_cfg(''))
  nll = -sum(scorer.loglikelihood_rolling([f[1:].tolist() for f in framed], prefix_id(tok)))
  out = run_suite(tiny, f's=bpb:tokens:{root}')['s']
  assert out['tokens'] == sum(len(f) - 1 for f in framed) and 'bpb' not in out  # write_store counts no bytes
  assert out['loss'] == pytest.approx(nll / out['tokens'], rel=1e-6)
  manifest = json.load(open(f'{root}/manifest.json'))
  manifest['splits']['eval']['bytes'] = 1000
  json.dump(manifest, open(f'{root}/manifest.json', 'w'))
  assert run_suite(tiny, f's=bpb:tokens:{root}')['s']['bpb'] == pytest.approx(nll / np.log(2) / 1000, rel=1e-6)
  assert run_suite(tiny, f's=bpb:tokens:{root}', task_examples=2)['s']['tokens'] == sum(len(f) - 1 for f in framed[:2])
  with pytest.raises(UserError, match="was tokenized with 'char', not the model's tokenizer"):
    build_suite(eval_cfg(f's=bpb:tokens:{root}'), CharTokenizer('abc'))


def test_gsm8k_task_uses_the_sft_stages_prompts_and_replies(tiny):
  from data.sft import build_sft_dataset
  from train.eval.generation import gsm8k_problems
  from train.stages.sft import generation_report
  tok, trainer = tiny
  cfg_sft = get_config().sft
  cfg_sft.train = cfg_sft.eval = f'gsm8k:{GSM8K_TEST}'
  cfg_sft.max_examples, cfg_sft.eval_generate, cfg_sft.max_new_tokens, cfg_sft.probe = 4, 4, 8, ''
  sft_data = build_sft_dataset(cfg_sft, tok, 512, seed=0)
  problems = gsm8k_problems(f'gsm8k:{GSM8K_TEST}', 'eval.tasks', tok, limit=4)
  assert [(p.prompt, p.record['answer']) for p in problems] == sft_data.eval_prompts[:4]
  out = run_suite(tiny, f'g=gsm8k:{GSM8K_TEST}', task_examples=4, max_new_tokens=8)
  assert out['g']['scored'] == 4
  assert out['g']['exact_match'] == generation_report(trainer, sft_data, cfg_sft)['exact_match']