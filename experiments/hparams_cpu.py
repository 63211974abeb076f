"""lr_opt(C) and B_opt(C) on 2 CPU cores in about 25 minutes: byte-level GPTs on Python's own sources.

  python run.py --config=experiments/hparams_cpu.py --workdir=runs/hparams_cpu

The study is base.py's `hparams` section on scaling_cpu's corpus, ladder and lr rule: 5 budgets from
4e10 to 6.4e11 FLOPs (2× apart), each training the ladder model nearest N* at batches 1, 2, 4 and 8
rows (with 2 as the smallest, the best batch sat on the grid's edge at 3 of 5 budgets) and 0.25-4×
the lr rule (2× grid); 100 trials, two at a time, each pinned to one core. The largest
budget is held out: the laws fitted on the other four predict its optimum. Writes manifest.json,
results.csv, hparams.json and the plots into the workdir; a rerun resumes.
"""
from ml_collections import ConfigDict

from experiments import scaling_cpu


def get_config() -> ConfigDict:
  c = scaling_cpu.get_config()
  c.stage = 'hparams'
  c.sweep.experiment = 'experiments/hparams_cpu.py'
  c.hparams.batch_grid = (1, 2, 4, 8)
  return c
