"""eval.tasks during pretraining: per-domain bpb for two held-out sets and a multiple-choice
accuracy logged at every eval step, the accuracy rising far above chance on a synthetic task the
model can learn; stage=eval on the finished workdir reproduces the final figures."""
import json
import os

import pytest

from experiments import quickstart
from tests.conftest import SHARED_DATA
from tests.helpers import xla_flags
from train.stages.eval import eval_stage
from train.stages.pretrain import pretrain_stage

pytestmark = pytest.mark.slow  # a 150-step pretraining run


def tiny_quickstart(tmp_path):
  c = quickstart.get_config()
  c.model.n_layers, c.model.d_model = 1, 32
  c.train.batch_size, c.train.seq_len, c.train.steps, c.train.warmup_steps = 8, 32, 150, 10
  c.data.synthetic.n_docs, c.data.synthetic.doc_len = 400, 31
  c.eval.every_steps, c.eval.max_batches, c.eval.task_examples = 50, 2, 64
  c.checkpoint.every_steps, c.sample.max_new_tokens = 0, 4
  shakespeare = tmp_path / 'shakespeare.txt'
  with open(os.path.join(SHARED_DATA, 'tinyshakespeare.txt'), encoding='utf-8') as f:
    shakespeare.write_text(f.read(2000), encoding='utf-8')
  c.eval.tasks = f'markov=bpb:synthetic,shakespeare=bpb:text:{shakespeare},mc=choice:synthetic'
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('pretrain')
  cfg, workdir = tiny_quickstart(tmp), str(tmp / 'run')
  os.makedirs(workdir)
  from train.workdir import write_config
  write_config(workdir, cfg)
  pretrain_stage(cfg, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return cfg, workdir, rows


def test_every_eval_step_logs_each_task_and_accuracy_rises_above_chance(trained):
  cfg, _, rows = trained
  evals = [r for r in rows if 'eval_loss' in r and r['step'] % 50 == 0]
  assert sorted({r['step'] for r in evals}) == [50, 100, 150]
  for r in evals:
    for key in ('eval/markov/bpb', 'eval/shakespeare/bpb', 'eval/markov/loss', 'eval/mc/acc',
                'eval/mc/acc_norm'):
      assert key in r, (r['step'], key)
  final = evals[-1]
  assert final['eval/mc/chance'] == 0.25
  assert final['eval/mc/acc'] >= 0.75  # four choices, three of them impossible next symbols
  assert final['eval/markov/bpb'] < final['eval/shakespeare/bpb']  # the trained domain vs another


def test_stage_eval_reproduces_the_final_figures(trained, tmp_path):
  cfg, workdir, rows = trained
  cfg.pretrained, cfg.stage = workdir, 'eval'
  eval_stage(cfg, str(tmp_path))
  with open(tmp_path / 'eval_results.json', encoding='utf-8') as f:
    results = json.load(f)['results']
  final = rows[-1]
  assert results['mc']['acc'] == final['eval/mc/acc']
  assert results['markov']['bpb'] == pytest.approx(final['eval/markov/bpb'], rel=1e-5)


def test_lm_eval_cli_on_the_workdir_agrees_with_our_task(trained, tmp_path):
  """`lmlab-eval` (lm-eval's CLI with the lmlab model) offline on a local YAML task over the same
  items as choice:synthetic: lm-eval's table shows the accuracy our own task logged."""
  pytest.importorskip('lm_eval')
  import subprocess
  import sys

  from tests.train.eval.files import lm_eval_yaml, write_jsonl
  from train.eval.choice import synthetic_items
  cfg, workdir, rows = trained
  items = synthetic_items(cfg.data.synthetic, cfg.eval.task_examples)
  data = write_jsonl(str(tmp_path / 'mc.jsonl'), [{'context': it.context, 'choices': list(it.choices),
                                                   'label': it.label} for it in items])
  lm_eval_yaml(str(tmp_path), 'lmlab_markov', data, 'multiple_choice')
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(), 'PYTHONPATH': os.getcwd()}
  out = subprocess.run([sys.executable, '-m', 'train.eval.lm_eval_adapter', '--model', 'lmlab',
                        '--model_args', f'pretrained={workdir}', '--tasks', 'lmlab_markov',
                        '--include_path', str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(l for l in out.stdout.splitlines() if 'lmlab_markov' in l and '|acc ' in l)
  assert float(line.split('|')[7]) == pytest.approx(rows[-1]['eval/mc/acc'], abs=1e-4)  # |acc|↑|VALUE|
