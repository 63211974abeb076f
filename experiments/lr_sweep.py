"""A learning-rate sweep: 8 rates × 2 widths of a small byte-level GPT on Python's own sources.

  python run.py --config=experiments/lr_sweep.py --workdir=runs/lr_sweep --config.sweep.parallel=2

Each trial is this file run with stage=pretrain and its overrides, in DIR/trials/NAME; DIR gets
results.csv and results.png (final eval loss vs lr, one line per width). Rerunning resumes.
The corpus is the standard library's top-level *.py files (~4.7 MB): no network, in every install.
"""
import os

from ml_collections import ConfigDict

from experiments import base
from experiments.studies import sweep

STDLIB_SOURCE = 'text:' + os.path.join(os.path.dirname(os.__file__), '*.py')


def use_stdlib_bytes(c: ConfigDict) -> None:
  """Byte-level stdlib corpus; a small fixed eval set (the same tokens for every trial)."""
  c.data.source = STDLIB_SOURCE
  c.data.tokenizer = 'byte'
  c.data.eval_fraction = 0.1
  c.eval.every_steps = 0
  c.eval.batch_size = 32
  c.eval.max_batches = 8
  c.sample.max_new_tokens = 16  # trials are judged by their metrics; keep the closing sample short


def get_config() -> ConfigDict:
  c = base.get_config()
  c.stage = 'sweep'
  use_stdlib_bytes(c)
  c.model.n_layers, c.model.d_model, c.model.n_heads = 2, 64, 4
  t = c.train
  t.steps, t.batch_size, t.seq_len = 400, 8, 128
  t.warmup_steps, t.log_every = 20, 10
  c.checkpoint.every_steps, c.checkpoint.keep = 100, 1
  c.sweep.experiment = 'experiments/lr_sweep.py'
  c.sweep.parallel, c.sweep.cpus_per_trial = 2, 1
  c.sweep.plot_x = 'train.lr'
  return c


def trials(c: ConfigDict) -> list[dict]:
  """The sweep: every (width, lr) pair."""
  return sweep.grid({'model.d_model': (64, 128), 'train.lr': sweep.log_space(3e-4, 3e-2, 8)})
