"""Sweep definition, trial bookkeeping, cluster scripts, and a real sweep surviving a killed trial."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.studies import sweep
from train.stages.studies import inherited_overrides
from experiments.base import get_config
from model.errors import UserError
from tests.helpers import xla_flags


def test_grid_is_every_combination_last_axis_fastest():
  g = sweep.grid({'model.d_model': (32, 64), 'train.lr': (1e-3, 1e-2, 1e-1)})
  assert len(g) == 6 and g[0] == {'model.d_model': 32, 'train.lr': 1e-3}
  assert g[1] == {'model.d_model': 32, 'train.lr': 1e-2}


def test_log_space_and_log_uniform():
  np.testing.assert_allclose(sweep.log_space(1e-4, 1e-2, 3), [1e-4, 1e-3, 1e-2])
  draws = sweep.random_search({'train.lr': sweep.log_uniform(1e-4, 1e-2),
                               'model.mlp': sweep.choice(['gelu', 'swiglu'])}, 400, seed=0)
  lr = np.log10([d['train.lr'] for d in draws])
  assert lr.min() >= -4 and lr.max() <= -2 and abs(np.median(lr) + 3) < 0.15  # uniform in log
  assert {d['model.mlp'] for d in draws} == {'gelu', 'swiglu'}
  assert draws == sweep.random_search({'train.lr': sweep.log_uniform(1e-4, 1e-2),
                                       'model.mlp': sweep.choice(['gelu', 'swiglu'])}, 400, seed=0)
  with pytest.raises(UserError):
    sweep.log_uniform(0, 1)


def test_trial_names_are_readable_and_collisions_are_errors():
  assert sweep.trial_name({'model.d_model': 64, 'train.lr': 0.001}) == 'd_model=64_lr=0.001'
  long = sweep.trial_name({f'train.k{i}': 'x' * 10 for i in range(10)})
  assert len(long) <= 80
  with pytest.raises(UserError, match='both named'):
    sweep.make_trials([{'train.lr': 1e-3}, {'train.lr': 1.00001e-3}])


def test_trial_command_passes_overrides_as_config_flags():
  cmd = sweep.trial_command('experiments/x.py', '/w', {'train.lr': 0.1, 'model.mlp': 'gelu',
                                                       'scaling.budgets': (1e11, 2e11)})
  assert cmd[1:] == ['run.py', '--config=experiments/x.py', '--workdir=/w', '--config.train.lr=0.1',
                     '--config.model.mlp=gelu', '--config.scaling.budgets=(100000000000.0, 200000000000.0)']


def write_run(workdir: str, steps: int, records: list[str]) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'train': {'steps': steps}}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(records) + '\n')


def test_metrics_of_a_resumed_run_keep_the_last_record_per_step(tmp_path):
  write_run(str(tmp_path), 20, ['{"step": 10, "loss": 3.0}', '{"step": 20, "loss": 2.',  # cut by a kill
                                '{"step": 10, "loss": 2.5}', '{"step": 20, "loss": 2.0}',
                                '{"step": 20, "eval_loss": 2.1}'])
  records = sweep.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [10, 20]
  assert records[0]['loss'] == 2.5 and records[1] == {'step': 20, 'loss': 2.0, 'eval_loss': 2.1}
  assert sweep.final_metrics(str(tmp_path))['eval_loss'] == 2.1


def test_a_run_without_its_final_eval_is_unfinished(tmp_path):
  write_run(str(tmp_path), 30, ['{"step": 20, "loss": 2.0, "eval_loss": 2.1}'])
  assert sweep.final_metrics(str(tmp_path)) is None


def test_cluster_scripts_list_only_unfinished_trials(tmp_path):
  trials = sweep.make_trials([{'train.lr': 1e-3}, {'train.lr': 1e-2}, {'train.lr': 1e-1}])
  write_run(sweep.trial_dir(str(tmp_path), trials[0]), 10, ['{"step": 10, "eval_loss": 2.0}'])
  commands, script = sweep.write_cluster_scripts(trials, str(tmp_path), 'experiments/x.py', 2,
                                                 '--gres=gpu:1; --time=60')
  lines = open(commands).read().splitlines()
  assert len(lines) == 2 and all('run.py --config=experiments/x.py' in l for l in lines)
  assert '--config.train.lr=0.01' in lines[0]
  text = open(script).read()
  assert '#SBATCH --array=0-1%2' in text and '#SBATCH --gres=gpu:1' in text and '#SBATCH --time=60' in text
  rows = sweep.gather(trials, str(tmp_path))
  assert [r['state'] for r in rows] == ['finished', 'unfinished', 'unfinished']


def test_trials_inherit_the_sweeps_command_line_overrides_only():
  base = get_config()
  cfg = get_config()
  cfg.train.steps, cfg.sweep.parallel, cfg.stage, cfg.scaling.lr = 7, 3, 'sweep', 1.0
  assert inherited_overrides(cfg, base) == {'train.steps': 7}


def child_pids(pid: int) -> list[int]:
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    return [int(p) for p in f.read().split()]


@pytest.mark.slow
def test_sweep_survives_a_killed_trial(tmp_path):
  """Acceptance 6 in small: SIGKILL a running trial; the sweep reruns it (resuming from its
  checkpoint), finishes every trial and writes results.csv and the loss-vs-lr plot."""
  env = {**os.environ, 'XLA_FLAGS': xla_flags()}  # trials: one CPU device
  workdir = str(tmp_path / 'sweep')
  proc = subprocess.Popen([sys.executable, 'run.py', '--config=tests/experiments/tiny_sweep.py',
                           f'--workdir={workdir}'], cwd=sweep.REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  trial = os.path.join(workdir, 'trials', 'lr=0.001')
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(os.path.join(trial, 'checkpoints', '50')):  # orbax renames it there when complete
      os.kill(child_pids(proc.pid)[0], signal.SIGKILL)
      break
    time.sleep(0.1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert 'lr=0.001 ended unfinished (exit -9); retrying' in out
  assert 'resumed from' in open(os.path.join(trial, 'run.log')).read()
  rows = list(csv.DictReader(open(os.path.join(workdir, 'results.csv'))))
  assert [(r['name'], r['state'], r['attempts']) for r in rows] == [
      ('lr=0.001', 'finished', '2'), ('lr=0.003', 'finished', '1')]
  assert os.path.exists(os.path.join(workdir, 'results.png'))
