"""The WSD scaling pipeline end to end in about 2 minutes (CI): scaling_smoke's ladder and budgets,
one stable run per size and a cooldown branched off it per point.

  python run.py --config=experiments/scaling_wsd_smoke.py --workdir=/tmp/scaling_wsd_smoke
"""
from ml_collections import ConfigDict

from experiments import scaling_smoke


def get_config() -> ConfigDict:
  c = scaling_smoke.get_config()
  c.sweep.experiment = 'experiments/scaling_wsd_smoke.py'
  c.scaling.design = 'wsd'
  return c
