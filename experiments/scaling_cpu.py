"""IsoFLOP scaling study on 2 CPU cores in under an hour: byte-level GPTs on Python's own sources.

  python run.py --config=experiments/scaling_cpu.py --workdir=runs/scaling_cpu

The study is base.py's `scaling` section: 5 budgets from 3e11 to 4.8e12 FLOPs (1.2 decades), 5 models
each from a ladder of 16k to 520k (N = training FLOPs per token ÷ 6), plus 4 learning-rate check runs;
29 runs, two at a time, each pinned to one core. Writes manifest.json, runs.csv, isoflop.csv,
fits.json and the plots into the workdir; a rerun resumes.

Tuned on this machine: the lr rule comes from experiments/lr_sweep.py (the best lr halves when the
width doubles); a pilot put N_opt(3e11) near 33k, ~45 tokens per parameter, hence tokens_per_param
= 30 to centre the windows over the whole range; batches stay <= 8 rows because bigger ones fall
out of cache and cost more per token.
"""
from ml_collections import ConfigDict

from experiments import base
from experiments.lr_sweep import use_stdlib_bytes


def get_config() -> ConfigDict:
  c = base.get_config()
  c.stage = 'scaling'
  use_stdlib_bytes(c)
  c.train.seq_len, c.train.log_every = 128, 10
  c.checkpoint.every_steps, c.checkpoint.keep = 1000, 1
  c.sweep.experiment = 'experiments/scaling_cpu.py'
  c.sweep.parallel, c.sweep.cpus_per_trial = 2, 1
  return c
