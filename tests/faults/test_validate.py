"""Bad settings are refused up front, one line naming the field and its range; every shipped
experiment config passes."""
import glob
import importlib
import os
import subprocess
import sys
import time

import pytest

from experiments import quickstart
from model.errors import UserError
from tests.faults.runs import fault_env
from tests.test_run import ROOT, one_line_error
from train.validate import validate, validate_devices

# (overrides, field named in the error): 22 invalid settings
INVALID = [
    ({'train.steps': -5}, 'train.steps'),
    ({'train.steps': 0}, 'train.steps'),
    ({'train.lr': 0.0}, 'train.lr'),
    ({'train.lr': float('nan')}, 'train.lr'),
    ({'train.warmup_steps': -1}, 'train.warmup_steps'),
    ({'train.min_lr_ratio': 1.5}, 'train.min_lr_ratio'),
    ({'train.b2': 1.0}, 'train.b2'),
    ({'train.log_every': 0}, 'train.log_every'),
    ({'train.grad_accum': 3}, 'train.grad_accum'),
    ({'eval.every_steps': -1}, 'eval.every_steps'),
    ({'checkpoint.every_steps': -10}, 'checkpoint.every_steps'),
    ({'checkpoint.keep': 0}, 'checkpoint.keep'),
    ({'model.max_len': 64}, 'train.seq_len'),
    ({'model.n_heads': 3}, 'model.n_heads'),
    ({'model.n_kv_heads': 3}, 'model.n_kv_heads'),
    ({'model.dropout': 1.0}, 'model.dropout'),
    ({'data.eval_fraction': 0.0}, 'data.eval_fraction'),
    ({'sample.top_p': 0.0}, 'sample.top_p'),
    ({'lora.rank': -1}, 'lora.rank'),
    ({'rlhf.gamma': 1.5}, 'rlhf.gamma'),
    ({'model.cudnn_segments': 2}, 'model.cudnn_segments'),  # quickstart's attention is einsum
    ({'train.loss_chunk': 128}, 'train.loss_chunk'),  # quickstart's rows are 128 positions
]


def config_with(overrides: dict):
  cfg = quickstart.get_config()
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def experiment_configs() -> list[str]:
  return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py'))
                if not p.endswith('__init__.py'))


@pytest.mark.parametrize('path', experiment_configs())
def test_every_experiment_config_is_valid(path):
  module = importlib.import_module(path[:-3].replace(os.sep, '.'))
  validate(module.get_config())


@pytest.mark.parametrize('overrides,field', INVALID, ids=[f for _, f in INVALID])
def test_invalid_setting_names_the_field_and_range(overrides, field):
  with pytest.raises(UserError, match=rf'^{field}=\S+ must be ') as e:
    validate(config_with(overrides))
  assert '\n' not in str(e.value)


def test_several_invalid_settings_are_reported_together():
  with pytest.raises(UserError, match=r'train.steps=0 must be >= 1; train.lr=-1.0 must be > 0'):
    validate(config_with({'train.steps': 0, 'train.lr': -1.0}))


def test_batch_must_split_over_the_data_parallel_devices():
  cfg = config_with({'train.batch_size': 12})
  validate_devices(cfg, n_devices=4)
  with pytest.raises(UserError, match=r'train.batch_size=12 .* 8 data-parallel devices'):
    validate_devices(cfg, n_devices=8)
  cfg.mesh.tensor = 2  # 8 devices as 4 data × 2 tensor: 12 splits over 4
  validate_devices(cfg, n_devices=8)
  with pytest.raises(UserError, match=r'3 processes'):
    validate_devices(config_with({'train.batch_size': 16}), n_devices=1, n_processes=3)


@pytest.mark.parametrize('overrides,field', INVALID[:20:5], ids=[f for _, f in INVALID[:20:5]])
def test_run_refuses_before_any_work(tmp_path, overrides, field):
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  started = time.perf_counter()
  result = subprocess.run([sys.executable, 'run.py', '--config=experiments/quickstart.py',
                           f'--workdir={tmp_path / "w"}', *flags], cwd=ROOT, env=fault_env(),
                          capture_output=True, text=True, timeout=60)
  elapsed = time.perf_counter() - started
  one_line_error(result, field, 'must be')
  assert not os.path.exists(tmp_path / 'w')  # nothing written: not even the workdir
  assert elapsed < 5, elapsed
