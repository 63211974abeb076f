"""µP transfer: the same learning-rate sweep at three widths (4x apart) under SP and under µP.

  python run.py --config=experiments/mup_transfer.py --workdir=runs/mup --config.sweep.parallel=2

Under SP (GPT-2's fixed init, one Adam learning rate) the best learning rate falls as the model
widens; under µP (model.parameterization=mup, base width 64) it stays put, so a rate tuned on the
small model holds for the wide one. µP's two multipliers were tuned at the base width like the
lr: the logits' (model.mup_output_mult: 1, 2, 4, 8 -> 4) and then the projections' init std
(model.mup_init_mult: 1, 2, 4 -> 2). With both at 1 the 64-wide µP run is SP's exactly, and
µP's wider models inherit SP-at-64's too-slow readout and too-small init and gain little from
their width. Heads keep head_dim 16 and grow with the width. Trials are lr_sweep.py's byte-level
stdlib runs; DIR gets results.csv and results.png (final eval loss vs lr, a panel per
parameterization, a line per width).
"""
from ml_collections import ConfigDict

from experiments import lr_sweep
from experiments.studies import sweep

WIDTHS = (64, 128, 256)
OUTPUT_MULT, INIT_MULT = 4.0, 2.0  # µP's, tuned at WIDTHS[0]


def get_config() -> ConfigDict:
  c = lr_sweep.get_config()
  c.model.mup_base_width = WIDTHS[0]
  c.sweep.experiment = 'experiments/mup_transfer.py'
  c.sweep.plot_panels = 'model.parameterization'
  return c


def trials(c: ConfigDict) -> list[dict]:
  """Every (parameterization, width, lr): lr on a 2x grid from 2^-13 to 2^-5."""
  rows = sweep.grid({'model.parameterization': ('sp', 'mup'), 'model.d_model': WIDTHS,
                     'train.lr': tuple(2.0 ** -k for k in range(13, 4, -1))})
  for row in rows:
    row['model.n_heads'] = row['model.d_model'] // 16
    if row['model.parameterization'] == 'mup':
      row['model.mup_output_mult'], row['model.mup_init_mult'] = OUTPUT_MULT, INIT_MULT
  return rows
