"""run.py in subprocesses for the fault tests: the tiny quickstart run of tests/test_run.py with a
checkpoint every 2 steps, so an async save is nearly always in flight."""
import json
import os
import subprocess
import sys
import time

from tests.test_run import ROOT, TINY, env

STEPS = 64
FLAGS = [*TINY, f'--config.train.steps={STEPS}', '--config.checkpoint.every_steps=2',
         '--config.checkpoint.keep=3']
TMP_SUFFIX = '.orbax-checkpoint-tmp'


def fault_env() -> dict[str, str]:
  """One CPU device; compiled steps cached across the many short runs (same executables, so the
  same numbers)."""
  return {**env(), 'JAX_COMPILATION_CACHE_DIR': os.path.expanduser('~/.cache/lmlab/jax-faults'),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def command(workdir, *flags: str) -> list[str]:
  return [sys.executable, 'run.py', f'--workdir={workdir}', *FLAGS, *flags]


def run(workdir, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *flags), cwd=ROOT, env=fault_env(), capture_output=True,
                        text=True, timeout=timeout)


def start(workdir, *flags: str) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, *flags), cwd=ROOT, env=fault_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def rows(workdir) -> list[dict]:
  """Every line of metrics.jsonl parsed (a cut-short or unparsable line fails the test)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    text = f.read()
  assert not text or text.endswith('\n'), 'metrics.jsonl ends in a partial line'
  return [json.loads(line) for line in text.splitlines()]


def losses_once(workdir) -> dict[int, float]:
  """Loss per step, asserting each step appears at most once."""
  steps = [r['step'] for r in rows(workdir)]
  assert len(steps) == len(set(steps)), f'duplicate steps {sorted(s for s in steps if steps.count(s) > 1)}'
  return {r['step']: r['loss'] for r in rows(workdir)}


def committed(workdir) -> list[int]:
  """Finished checkpoint steps (orbax renames STEP.orbax-checkpoint-tmp* to STEP when complete)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def in_flight(workdir) -> list[str]:
  path = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(path) if TMP_SUFFIX in n] if os.path.isdir(path) else []


def wait_until(condition, proc: subprocess.Popen, limit: float = 240, poll: float = 0.002) -> None:
  deadline = time.time() + limit
  while not condition():
    assert proc.poll() is None, f'run ended early: {proc.stderr.read()[-2000:]}'
    assert time.time() < deadline, 'timed out'
    time.sleep(poll)


def saved_arrays(step_dir: str) -> dict[str, object]:
  """The train state of one checkpoint as numpy arrays by path."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(step_dir), 'state'))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
