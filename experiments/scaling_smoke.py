"""The scaling pipeline end to end in under 3 minutes (CI): tiny budgets, 3 models each.

  python run.py --config=experiments/scaling_smoke.py --workdir=/tmp/scaling_smoke

The fits run on too little compute to mean much; the point is that planning, trials, resuming,
fits, fits.json and every plot work.
"""
from ml_collections import ConfigDict

from experiments import scaling_cpu


def get_config() -> ConfigDict:
  c = scaling_cpu.get_config()
  c.sweep.experiment = 'experiments/scaling_smoke.py'
  c.eval.max_batches = 2
  c.checkpoint.every_steps = 100
  s = c.scaling
  s.ladder = '1x16,1x32,2x32,2x48'
  s.budgets = (1e10, 2e10, 4e10)
  s.sizes_per_budget = 3
  s.min_steps, s.min_batch, s.max_batch = 100, 2, 8
  s.lr_check = ()
  s.bootstrap = 20
  return c
