"""The embedded default: a small GPT on the synthetic Markov source; no network, ~2 minutes on 2 cores.

The source's true entropy is printed next to the eval loss, so the run is judged against ground truth.
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.model.n_layers = 2
  c.model.d_model = 64
  c.model.n_heads = 4
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.eval.every_steps = 200
  c.checkpoint.every_steps = 200
  c.sample.prompt = 'ab'
  c.sample.max_new_tokens = 100
  return c
