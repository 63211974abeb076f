"""run.py streaming from token stores in subprocesses (acceptance 3): SIGKILL after a checkpoint and
restart gives bitwise the same losses, from a store and a mixture; a run checkpointed on 2
processes x 4 devices resumes on 1 process x 8 devices (and the reverse) with the same losses."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from data import store
from data.tokenizer import ByteTokenizer
from tests.helpers import xla_flags
from tests.test_run import ROOT, losses, wait_for

STEPS, KILL_AT = 12, 6
FLAGS = ['--config=experiments/quickstart.py', '--config.data.tokenizer=byte', '--config.model.n_layers=1',
         '--config.model.d_model=32', '--config.train.batch_size=8', '--config.train.seq_len=32',
         f'--config.train.steps={STEPS}', f'--config.checkpoint.every_steps={KILL_AT}',
         '--config.checkpoint.async_save=false', '--config.eval.max_batches=2', '--config.eval.every_steps=0',
         '--config.train.log_every=1', '--config.sample.max_new_tokens=4', '--config.train.warmup_steps=2']


def make_store(path, seed: int, low: int) -> str:
  tok = ByteTokenizer()
  rng = np.random.default_rng(seed)
  docs = lambda n: [np.concatenate([[tok.bos_id], rng.integers(low, low + 60, rng.integers(5, 90)), [tok.eos_id]])
                    for _ in range(n)]
  store.write_store(str(path), tok, {'train': docs(300), 'eval': docs(10)}, num_shards=2)
  return str(path)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp('stores')
  a, b = make_store(root / 'a', 0, 0), make_store(root / 'b', 1, 100)
  return {'store': f'tokens:{a}', 'mixture': f'mixture:{a}=0.7,{b}=0.3'}


def launch(workdir, source: str, processes: int = 1) -> list[subprocess.Popen]:
  """run.py on `processes` local processes (jax.distributed) with 8 CPU devices in all."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(8 // processes)}
  cmd = [sys.executable, 'run.py', f'--workdir={workdir}', *FLAGS, f'--config.data.source={source}']
  if processes > 1:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    cmd += [f'--config.mesh.coordinator=localhost:{port}', f'--config.mesh.num_processes={processes}']
  return [subprocess.Popen(cmd + ([f'--config.mesh.process_id={i}'] if processes > 1 else []), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def finish(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


def kill_after_checkpoint(workdir, source: str, processes: int = 1) -> None:
  procs = launch(workdir, source, processes)
  wait_for(os.path.join(workdir, 'checkpoints', str(KILL_AT)), procs[0])
  for p in procs:
    p.kill()
    p.wait()


def check(got: dict[int, float], want: dict[int, float], tolerance: float = 0.0) -> None:
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  assert all(abs(got[s] - want[s]) <= tolerance for s in want), [(s, got[s], want[s]) for s in want]


@pytest.mark.slow
def test_store_run_resumes_exactly_and_on_another_process_count(tmp_path, sources):
  """SIGKILL after the checkpoint at step 6, restart: bitwise the uninterrupted losses. The same
  checkpoint resumed on 2 processes x 4 devices, and one written there resumed on 1 x 8: the same
  losses within 1e-5 (one global row stream, whatever the process count)."""
  source = sources['store']
  reference, killed, grown, shrunk = (str(tmp_path / n) for n in ('reference', 'killed', '1to2', '2to1'))
  finish(launch(reference, source))
  want = losses(reference)
  kill_after_checkpoint(killed, source)
  shutil.copytree(killed, grown)
  finish(launch(killed, source))
  check(losses(killed), want)
  finish(launch(grown, source, processes=2))
  check(losses(grown), want, 1e-5)
  kill_after_checkpoint(shrunk, source, processes=2)
  finish(launch(shrunk, source))
  check(losses(shrunk), want, 1e-5)


@pytest.mark.slow
def test_mixture_run_resumes_exactly(tmp_path, sources):
  reference, killed = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  finish(launch(reference, sources['mixture']))
  kill_after_checkpoint(killed, sources['mixture'])
  finish(launch(killed, sources['mixture']))
  check(losses(killed), losses(reference))
