"""Small task files written by the tests: a multiple-choice set built from GSM8K test problems
(the right final number among those of neighbouring problems), documents, and lm-eval YAMLs that
read them through `dataset_path: json` (no network)."""
import json
import os

from data.formats import extract_answer
from tests.conftest import SHARED_DATA

GSM8K_TEST = os.path.join(SHARED_DATA, 'gsm8k', 'test.jsonl')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')


def gsm8k_rows(n: int) -> list[dict]:
  with open(GSM8K_TEST, encoding='utf-8') as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return path


def gsm8k_choice(path: str, n: int, n_choices: int = 4) -> str:
  """Item i: question i, ' Answer:', and its final number among those of problems i+1..i+3."""
  rows = gsm8k_rows(n + n_choices)
  answers = [extract_answer(r['answer']) for r in rows]
  items = []
  for i in range(n):
    choices = [f' {answers[i]}']
    for a in answers[i + 1:]:
      if len(choices) < n_choices and f' {a}' not in choices:
        choices.append(f' {a}')
    label = i % len(choices)
    choices.insert(label, choices.pop(0))
    items.append({'context': rows[i]['question'] + '\nAnswer:', 'choices': choices, 'label': label})
  return write_jsonl(path, items)


def gsm8k_documents(path: str, n: int) -> str:
  return write_jsonl(path, [{'text': r['question'] + '\n' + r['answer']} for r in gsm8k_rows(n)])


def lm_eval_yaml(folder: str, task: str, data_file: str, kind: str) -> str:
  """An lm-eval task over a local JSONL file: multiple_choice on {"context", "choices", "label"}
  (choices concatenated as written, like our own task) or loglikelihood_rolling on {"text"}."""
  body = {
      'multiple_choice': ('doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                          'doc_to_target: "{{label}}"\ntarget_delimiter: ""\n'
                          'metric_list:\n  - metric: acc\n  - metric: acc_norm\n'),
      'loglikelihood_rolling': ('doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                'metric_list:\n  - metric: bits_per_byte\n'),
  }[kind]
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'{task}.yaml')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {data_file}\ntest_split: test\noutput_type: {kind}\n{body}')
  return path


def rolling_reference(hf, text: str) -> float:
  """A document's log-likelihood from the hf backend's own forward pass (one window: the test's
  documents fit the context), log-softmax in float64."""
  import torch
  ids = [hf.prefix_token_id, *hf.tok_encode(text)]
  with torch.no_grad():
    logp = hf._model_call(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
  return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
