"""The IsoFLOP study of scaling_cpu.py (same corpus, ladder and budgets) from WSD cooldowns: one
constant-lr run per model size, each (size, budget) point a 1-sqrt cooldown branched off it.

  python run.py --config=experiments/scaling_wsd_cpu.py --workdir=runs/scaling_wsd \\
      --config.scaling.reference=runs/scaling_cpu

The reference (a finished scaling_cpu workdir) is optional: with it, fits.json compares the
Approach-2 exponent and the total training FLOPs with that one-run-per-point study.

Four sizes per budget rather than five: the largest budget's points cost the same however they
are trained (each size runs all of its tokens), so five sizes there alone would spend half of
scaling_cpu's FLOPs. tokens_per_param = 25 (scaling_cpu measured D_opt/N_opt of 25 to 52) centres
the windows so that the two largest budgets share their four sizes. Cooldowns are 10% of each
point's steps, 1-sqrt shaped (Hägele et al. 2024 find 10-20% of 1-sqrt close to a full cosine
run). Together: 48% of scaling_cpu's FLOPs. The learning-rate check of scaling_cpu is left out.

Every size trains 8-row batches (min_batch = max_batch), as scaling_cpu's points mostly do. With
the batch rule's smaller batches at a size's smallest budget, kept for all its points, the larger
sizes gained at small budgets and the exponent came out 0.11-0.13 below scaling_cpu's (README).
"""
from ml_collections import ConfigDict

from experiments import scaling_cpu


def get_config() -> ConfigDict:
  c = scaling_cpu.get_config()
  c.sweep.experiment = 'experiments/scaling_wsd_cpu.py'
  s = c.scaling
  s.design = 'wsd'
  s.sizes_per_budget = 4
  s.tokens_per_param = 25.0
  s.cooldown_fraction = 0.1
  s.min_batch = s.max_batch
  s.lr_check = ()
  return c
