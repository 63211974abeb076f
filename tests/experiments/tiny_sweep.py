"""A two-trial sweep small enough for tests: a tiny GPT on the synthetic source."""
from ml_collections import ConfigDict

from experiments import base


def get_config() -> ConfigDict:
  c = base.get_config()
  c.stage = 'sweep'
  c.data.synthetic.n_docs = 400
  c.model.n_layers, c.model.d_model, c.model.n_heads = 1, 32, 2
  c.train.steps, c.train.batch_size, c.train.seq_len = 300, 8, 64
  c.train.warmup_steps, c.train.log_every = 10, 10
  c.eval.every_steps, c.eval.max_batches = 0, 2
  c.checkpoint.every_steps, c.checkpoint.keep = 50, 1
  c.sample.max_new_tokens = 4
  c.mesh.data = 1
  c.sweep.experiment = 'tests/experiments/tiny_sweep.py'
  return c


def trials(c: ConfigDict) -> list[dict]:
  return [{'train.lr': 1e-3}, {'train.lr': 3e-3}]
