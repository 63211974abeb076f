"""The scaling analysis end to end on synthetic runs: fits, acceptance values, strict JSON, every plot."""
import json
import os

import numpy as np

from experiments import scaling_cpu
from experiments.studies import plots, scaling
from tests.experiments.test_fits import TRUE, synthetic_runs


def synthetic_rows() -> tuple[list[dict], dict]:
  """Plan-like rows (N = n_flops; the parameter counts are slightly smaller) and loss curves."""
  runs = synthetic_runs()
  rows, curves = [], {}
  for i, (c, n, d, loss) in enumerate(zip(runs.budget, runs.n, runs.d, runs.loss)):
    name = f'run{i}'
    rows.append({'name': name, 'role': 'isoflop', 'state': 'finished', 'budget': c, 'n_flops': n,
                 'params': 0.9 * n, 'params_non_embedding': 0.8 * n, 'tokens': d, 'eval_loss': loss,
                 'n_layers': i + 1, 'd_model': 64, 'lr': 1e-3})
    tokens = np.linspace(d / 20, d, 20)
    curves[name] = (n, 6 * n * tokens, TRUE(n, tokens))
  check = [dict(rows[0], name='lr_lo', role='lr_check', lr=5e-4, eval_loss=rows[0]['eval_loss'] + 0.05),
           dict(rows[0], name='lr_hi', role='lr_check', lr=2e-3, eval_loss=rows[0]['eval_loss'] + 0.02)]
  return rows + check, curves


def test_analysis_fits_serialises_and_plots(tmp_path):
  rows, curves = synthetic_rows()
  s = scaling_cpu.get_config().scaling
  s.bootstrap = 20
  result, draws = scaling.analyze(rows, curves, s, seed=0)
  assert abs(result['approach2']['a'] - TRUE.a) < 0.03
  assert abs(result['approach3']['alpha'] - TRUE.alpha) < 0.03
  assert result['approach1']['n_opt'].exponent > 0  # bigger models win at bigger budgets
  assert 0.9 * TRUE.a < result['other_counts']['params']['approach2_a'] < 1.1 * TRUE.a
  check = result['lr_check']['1x64']
  assert check['lr'] == [5e-4, 1e-3, 2e-3] and 1e-3 < check['best_lr'] < 2e-3
  result['acceptance'] = scaling.acceptance(result, [5] * 5, wall_minutes=1.0)
  assert all(v['pass'] for k, v in result['acceptance'].items() if k != '1_budgets_and_time')
  text = json.dumps(scaling.jsonable(result), allow_nan=False)
  assert json.loads(text)['approach2']['budgets'][0]['n_parabola']['interior'] is True
  plots.scaling_plots(str(tmp_path), scaling.runs_for(rows, 'n_flops'), result, draws, curves)
  for name in ('isoflop_curves', 'optimal_n_d', 'loss_frontier', 'approach3_contours',
               'approach3_residuals', 'bootstrap', 'lr_check'):
    assert os.path.getsize(tmp_path / f'{name}.png') > 10_000, name
