"""Stage sft end to end on a tiny GPT pretrained once per module: full fine-tuning on the synthetic
instruction set and on plain text lowers the held-out loss (in-process); through run.py a record
without a field, an unknown role and LoRA targets that match nothing each end in one error line,
and an overlong example is counted in the data summary (subprocesses)."""
import json
import os
import subprocess
import sys

import pytest

from data.pipeline import build_dataset
from experiments import quickstart, sft_quickstart
from tests.test_run import ROOT, env, one_line_error
from train.loop import pretrain
from train.stages.sft import sft_stage

SEQ_LEN = 32
SYNTHETIC = {'n_docs': 400, 'doc_len': SEQ_LEN - 1}


def small(cfg, steps: int):
  """`cfg` cut down to a few quick steps on rows of SEQ_LEN (8 rows: one per test device)."""
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.warmup_steps = steps, 8, SEQ_LEN, 5
  cfg.data.synthetic.update(SYNTHETIC)
  cfg.eval.every_steps, cfg.eval.max_batches, cfg.checkpoint.every_steps = 0, 4, 0
  return cfg


@pytest.fixture(scope='module')
def base(tmp_path_factory) -> str:
  """A 1-layer char GPT pretrained 30 steps on the synthetic chain, as run.py leaves a workdir."""
  workdir = str(tmp_path_factory.mktemp('base'))
  cfg = small(quickstart.get_config(), steps=30)
  cfg.model.n_layers, cfg.model.d_model = 1, 32
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f)
  pretrain(cfg, workdir, build_dataset(cfg.data, cfg.seed, tokenizer_dir=os.path.join(workdir, 'tokenizer')))
  return workdir


def fine_tune(base: str, workdir, steps: int, **sft) -> dict:
  """sft_stage in this process from `base` with sft_quickstart's recipe; returns sft_summary.json."""
  cfg = small(sft_quickstart.get_config(), steps)
  cfg.pretrained, cfg.sft.eval_generate = base, 0
  cfg.sft.update(sft)
  os.makedirs(workdir, exist_ok=True)
  sft_stage(cfg, str(workdir))
  with open(os.path.join(workdir, 'sft_summary.json')) as f:
    return json.load(f)


def test_full_fine_tuning_lowers_held_out_completion_loss(base, tmp_path, capsys):
  summary = fine_tune(base, tmp_path / 'sft', steps=60)
  before, after = summary['before']['eval_loss'], summary['after']['eval_loss']
  assert after < 0.9 * before, (before, after)
  assert 'held-out completion loss' in capsys.readouterr().out


def test_text_fine_tuning_trains_every_token(base, tmp_path):
  """A periodic text over the chain's letters: every token is a target and the held-out tail's
  loss falls well below the base's."""
  with open(os.path.join(base, 'tokenizer', 'tokenizer.json')) as f:
    letters = json.load(f)['chars']
  (tmp_path / 'domain.txt').write_text(''.join(letters[i * i % 7] for i in range(6000)))
  summary = fine_tune(base, tmp_path / 'sft', steps=40, train=f'text:{tmp_path}/domain.txt')
  before, after = summary['before']['eval_loss'], summary['after']['eval_loss']
  assert after < 0.8 * before, (before, after)


def run_sft(base: str, workdir, *flags: str) -> subprocess.CompletedProcess:
  command = [sys.executable, 'run.py', '--config=experiments/sft_quickstart.py', f'--workdir={workdir}',
             f'--config.pretrained={base}', '--config.train.steps=3', '--config.train.batch_size=4',
             f'--config.train.seq_len={SEQ_LEN}', '--config.train.warmup_steps=1',
             '--config.sft.eval_generate=0', '--config.eval.every_steps=0', *flags]
  return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def write_jsonl(path, records: list[dict]) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


PAIRS = [{'prompt': 'abc'[:1 + i % 3], 'completion': 'bca'[:1 + i % 2]} for i in range(40)]
CHAT = {'messages': [{'role': 'user', 'content': 'ab'}, {'role': 'assistant', 'content': 'ba'}]}


@pytest.mark.parametrize('records,flags,words', [
    (PAIRS[:3] + [{'prompt': 'ab'}], [], ["bad.jsonl:4 has no string field 'completion'"]),
    ([CHAT, {'messages': [{'role': 'robot', 'content': 'ab'}]}], [], ["bad.jsonl:2: message 0 has role 'robot'"]),
    (PAIRS, ['--config.lora.rank=4', '--config.lora.targets=qury'], ['lora.targets', 'qury matches no layer']),
], ids=['missing-field', 'unknown-role', 'lora-targets'])
def test_bad_input_is_one_error_line(base, tmp_path, records, flags, words):
  kind = 'chat' if 'messages' in records[0] else 'prompt_completion'
  data = write_jsonl(tmp_path / 'bad.jsonl', records)
  one_line_error(run_sft(base, tmp_path / 'w', f'--config.sft.train={kind}:{data}', *flags), *words)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_overlong_example_is_counted_in_the_summary_line(base, tmp_path):
  """A reply longer than the context is truncated and counted in the `sft data:` line; the run
  (LoRA adapters on every projection) finishes."""
  records = PAIRS + [{'prompt': 'ab', 'completion': 'abc' * SEQ_LEN}]
  data = write_jsonl(tmp_path / 'long.jsonl', records)
  result = run_sft(base, tmp_path / 'w', f'--config.sft.train=prompt_completion:{data}',
                   '--config.lora.rank=4', '--config.lora.targets=all')
  assert result.returncode == 0, result.stderr
  assert 'truncated 1, dropped 0 by' in result.stdout and 'LoRA rank 4' in result.stdout, result.stdout
  assert 'held-out completion loss' in result.stdout
