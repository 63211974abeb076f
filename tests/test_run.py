"""run.py end to end in subprocesses: bad input gives one line, resume after SIGKILL is exact,
SIGTERM saves and exits cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=experiments/quickstart.py', '--config.model.n_layers=1', '--config.model.d_model=32',
        '--config.train.batch_size=4', '--config.train.seq_len=32', '--config.data.synthetic.n_docs=200',
        '--config.data.synthetic.doc_len=31', '--config.eval.max_batches=2', '--config.eval.every_steps=0',
        '--config.train.log_every=1', '--config.sample.max_new_tokens=4', '--config.train.warmup_steps=5']


def env() -> dict[str, str]:
  """One CPU device, as a user's run (the 8-device test flag is not inherited), compiled fast."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(), 'JAX_PLATFORMS': 'cpu'}


def run(workdir, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'run.py', f'--workdir={workdir}', *TINY, *flags], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=timeout)


def start(workdir, *flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, 'run.py', f'--workdir={workdir}', *TINY, *flags], cwd=ROOT,
                          env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(workdir) -> dict[int, float]:
  """Loss per step; a step logged twice (before a kill and after resume) keeps its last value."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      out[row['step']] = row['loss']
  return out


def wait_for(path: str, proc: subprocess.Popen, limit: float = 240) -> None:
  deadline = time.time() + limit
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline, f'{path} never appeared'
    time.sleep(0.05)


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
  """The run failed with exactly one 'error:' line, last, and no traceback (a progress bar may precede)."""
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
  for w in words:
    assert w in errors[0], errors[0]
  return errors[0]


@pytest.mark.parametrize('flags,words', [
    (['--config.train.stepz=3'], ['stepz', 'steps']),
    (['--config.data.source=text:/nonexistent/dir/*.txt'], ['/nonexistent/dir']),
    (['--config.model.n_heads=3'], ['n_heads', 'd_model']),
    (['--config.model.n_heads=4', '--config.model.n_kv_heads=3'], ['n_kv_heads']),
    (['--config.stage=dance'], ['stage']),
    (['--config.mesh.data=3'], ['mesh']),
], ids=['unknown-key', 'missing-path', 'heads-vs-width', 'kv-vs-heads', 'bad-stage', 'bad-mesh'])
def test_bad_config_is_one_line_and_writes_no_checkpoint(tmp_path, flags, words):
  one_line_error(run(tmp_path / 'w', *flags), *words)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_empty_corpus(tmp_path):
  (tmp_path / 'empty.txt').write_text('  \n')
  one_line_error(run(tmp_path / 'w', f'--config.data.source=text:{tmp_path}/empty.txt'), 'empty')


def test_corpus_smaller_than_a_batch(tmp_path):
  (tmp_path / 'small.txt').write_text('To be, or not to be, that is the question.\n' * 2)
  one_line_error(run(tmp_path / 'w', f'--config.data.source=text:{tmp_path}/small.txt',
                     '--config.data.tokenizer=byte'), 'batch')


def test_corrupt_checkpoint(tmp_path):
  work = tmp_path / 'w'
  assert run(work, '--config.train.steps=4').returncode == 0
  for root, _, files in os.walk(work / 'checkpoints' / '4' / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  one_line_error(run(work, '--config.train.steps=8'), 'checkpoint', 'cannot be restored')
  assert sorted(os.listdir(work / 'checkpoints')) == ['4']  # nothing half-written was added


def test_non_finite_loss_stops_with_the_step(tmp_path):
  result = run(tmp_path / 'w', '--config.train.lr=1e30', '--config.train.clip_norm=0',
               '--config.train.warmup_steps=0', '--config.train.steps=30')
  line = one_line_error(result, 'loss became', 'step')
  assert 'nan' in line or 'inf' in line


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
  flags = ['--config.train.steps=40', '--config.checkpoint.every_steps=10']
  reference = tmp_path / 'reference'
  assert run(reference, *flags).returncode == 0
  work = tmp_path / 'killed'
  proc = start(work, *flags)
  wait_for(str(work / 'checkpoints' / '20'), proc)
  proc.kill()
  proc.wait()
  assert run(work, *flags).returncode == 0
  want, got = losses(reference), losses(work)
  assert sorted(got) == sorted(want)
  assert all(got[s] == want[s] for s in want if s > 20), [(s, got[s], want[s]) for s in want]


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
  flags = ['--config.train.steps=400', '--config.checkpoint.every_steps=1000']
  work = tmp_path / 'w'
  proc = start(work, *flags)
  wait_for(str(work / 'metrics.jsonl'), proc)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  saved = [int(s) for s in os.listdir(work / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 400
  result = run(work, *flags)
  assert result.returncode == 0, result.stderr
  assert 'resumed from' in result.stdout and max(losses(work)) == 400


def test_architecture_override_of_a_pretrained_base_is_an_error(tmp_path):
  """With config.pretrained the base fixes the architecture: --config.model.n_layers would be
  silently ignored, so it is refused by name (compute settings such as model.dtype still apply)."""
  out = subprocess.run([sys.executable, 'run.py', f'--workdir={tmp_path}',
                        '--config=experiments/sft_quickstart.py', '--config.pretrained=runs/none',
                        '--config.model.dtype=float32', '--config.model.n_heads=8'],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith('error: --config.model.n_heads cannot change the architecture'), lines
