"""The hparams pipeline end to end in about 2 minutes (CI): tiny budgets, a 2 × 2 grid each.

  python run.py --config=experiments/hparams_smoke.py --workdir=/tmp/hparams_smoke

The fits run on too little compute to mean much; the point is that planning, trials, resuming,
the fits, hparams.json and both plots work.
"""
from ml_collections import ConfigDict

from experiments import hparams_cpu


def get_config() -> ConfigDict:
  c = hparams_cpu.get_config()
  c.sweep.experiment = 'experiments/hparams_smoke.py'
  c.eval.max_batches = 2
  c.scaling.ladder = '1x16,2x16'
  h = c.hparams
  h.budgets = (2e9, 4e9, 8e9, 1.6e10, 3.2e10)
  h.lr_grid = (0.5, 2.0)
  h.batch_grid = (2, 4)
  h.min_steps = 50
  h.bootstrap = 20
  return c
