"""µP transfer with a mixture of experts: mup_transfer.py's sweep with model.mlp=moe (4 SwiGLU
experts of the dense d_ff each, top-2) on a narrower lr grid, 2^-11 to 2^-6.

  python run.py --config=experiments/mup_transfer_moe.py --workdir=runs/mup_moe --config.sweep.parallel=2

Under µP the experts scale as the dense projections do and the router as a readout (model/moe.py);
the multipliers are mup_transfer.py's, tuned on the dense model at width 64.
"""
from ml_collections import ConfigDict

from experiments import mup_transfer


def get_config() -> ConfigDict:
  c = mup_transfer.get_config()
  c.model.mlp, c.model.n_experts, c.model.top_k = 'moe', 4, 2
  c.sweep.experiment = 'experiments/mup_transfer_moe.py'
  return c


def trials(c: ConfigDict) -> list[dict]:
  """mup_transfer's (parameterization, width, lr) grid, lr from 2^-11 to 2^-6."""
  return [row for row in mup_transfer.trials(c) if 2.0 ** -11 <= row['train.lr'] <= 2.0 ** -6]
