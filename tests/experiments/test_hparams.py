"""lr_opt(C) and B_opt(C): planning, per-budget optima of a known surface, the laws and the holdout
check on synthetic trials, bad settings, and the smoke study end to end through run.py."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import hparams_cpu, hparams_smoke
from experiments.studies import fits, hparams, planning, scaling
from model.config import model_config
from model.errors import UserError
from tests.experiments.test_scaling import BYTE_VOCAB, with_overrides
from tests.test_run import ROOT, env
from train.metrics import flops_per_token
from train.validate import validate

LR_STAR = fits.PowerLaw(0.3, -0.1, 1.0)    # the synthetic studies' true lr_opt(C)
B_STAR = fits.PowerLaw(0.1, 0.15, 1.0)     # and B_opt(C), in rows


def test_cpu_plan_spends_every_budget_with_enough_steps():
  c = hparams_cpu.get_config()
  runs = hparams.plan(c, BYTE_VOCAB)
  budgets = sorted({r.budget for r in runs})
  h = c.hparams
  assert len(runs) == len(budgets) * len(h.lr_grid) * len(h.batch_grid) and len(budgets) >= 5
  assert hparams.split_budgets(h) == (budgets[:-1], budgets[-1:])  # the largest is held out
  assert sum(r.flops for r in runs) <= 2.5e13  # about 25 minutes on 2 cores
  for r in runs:
    assert re.fullmatch(r'C[0-9.e]+_\d+x\d+_b\d+_lrx[0-9.]+', r.name), r.name
    trial = with_overrides(c, r.overrides())
    t = trial.train
    achieved = t.steps * t.batch_size * t.seq_len * flops_per_token(
        model_config(trial.model, BYTE_VOCAB, t.seq_len), t.seq_len)
    assert abs(achieved / r.budget - 1) <= 0.01 and t.steps >= h.min_steps, r.name
  for c_ in budgets:  # one model per budget; the lr grid spans the rule at each batch
    same = [r for r in runs if r.budget == c_]
    assert len({r.cost.shape for r in same}) == 1
    rule = planning.lr_for(same[0].cost.shape.d_model, 4, c.scaling)
    assert sorted(r.lr / rule for r in same if r.batch_size == 4) == pytest.approx(sorted(h.lr_grid))


def bowl(lr: np.ndarray, batch: np.ndarray, lr_star: float, b_star: float) -> np.ndarray:
  """A convex quadratic in (ln lr, ln B), tilted (a cross term), with its minimum 2 at (lr_star, b_star)."""
  du, dv = np.log(lr / lr_star), np.log(batch / b_star)
  return 2 + 0.05 * du ** 2 + 0.02 * du * dv + 0.03 * dv ** 2


def synthetic_trials(budget: float, lr_star: float, b_star: float, rng=None) -> hparams.Trials:
  """A 5 × 3 grid (lr 2× apart around a rule 1.3× off, batches 2-8) on bowl(); optional noise of 1e-3."""
  batch = np.repeat([2.0, 4.0, 8.0], 5)
  lr = 1.3 * lr_star * np.sqrt(batch / b_star) * np.tile(2.0 ** np.arange(-2, 3), 3)
  loss = bowl(lr, batch, lr_star, b_star)
  if rng is not None:
    loss = loss + rng.normal(0, 1e-3, loss.shape)
  return hparams.Trials(np.full(15, budget), lr, batch, loss)


def test_optimum_is_the_surface_minimum_when_interior_else_the_best_trial():
  t = synthetic_trials(1e11, 2e-3, 3.0)
  o = hparams.optimum(t)
  assert o['method'] == 'surface' and o['trials'] == 15
  assert o['lr_opt'] == pytest.approx(2e-3, rel=1e-6) and o['batch_opt'] == pytest.approx(3.0, rel=1e-6)
  assert o['loss_opt'] == pytest.approx(2.0) and o['best_loss'] > 2.0
  outside = hparams.Trials(t.budget, t.lr, t.batch, bowl(t.lr, t.batch, 20 * 2e-3, 3.0))  # above every lr
  o = hparams.optimum(outside)
  assert o['method'] == 'best' and o['lr_opt'] == o['best_lr'] == outside.lr[np.argmin(outside.loss)]
  wide = hparams.Trials(t.budget, t.lr, t.batch, bowl(t.lr, t.batch, 2e-3, 20.0))  # B* above every batch
  o = hparams.optimum(wide)
  assert o['method'] == 'surface_lr' and o['batch_opt'] == 8
  assert o['lr_opt'] == pytest.approx(2e-3 * 0.4 ** -0.2, rel=1e-6)  # bowl's best lr at B = 8
  two_batches = t.take(np.flatnonzero(t.batch < 8))  # y² cannot be fitted from 2 batch sizes
  assert hparams.fit_surface(two_batches.lr, two_batches.batch, two_batches.loss) is None
  assert hparams.optimum(two_batches)['method'] == 'best'


def rows_of(trials: list[hparams.Trials]) -> list[dict]:
  """Trials as the merged plan rows the stage writes to results.csv."""
  return [{'name': f'C{c:.3g}_{i}', 'state': 'finished', 'budget': c, 'lr': lr, 'batch_size': b,
           'eval_loss': loss}
          for t in trials for i, (c, lr, b, loss) in enumerate(zip(t.budget, t.lr, t.batch, t.loss))]


def study(h, shift_top: float = 1.0) -> tuple[dict, dict]:
  """analyze() on noisy synthetic trials whose optima follow LR_STAR and B_STAR; the largest
  budget's true lr_opt is multiplied by `shift_top`."""
  rng = np.random.default_rng(0)
  budgets = sorted(h.budgets)
  trials = [synthetic_trials(c, LR_STAR(c) * (shift_top if c == budgets[-1] else 1), B_STAR(c), rng)
            for c in budgets]
  return hparams.analyze(rows_of(trials), h, seed=0)


def test_laws_recover_known_exponents_with_intervals_and_predict_the_holdout():
  h = hparams_cpu.get_config().hparams
  h.bootstrap = 50
  result, draws = study(h)
  assert [o['method'] for o in result['optima']] == ['surface'] * 5
  for key, truth in (('lr', LR_STAR), ('batch', B_STAR)):
    fit = result[f'{key}_opt']
    assert fit['law'].exponent == pytest.approx(truth.exponent, abs=0.02), key
    lo, hi = fit['exponent_interval90']
    assert lo < truth.exponent < hi and hi - lo < 0.1, key
    assert draws[f'{key}_exponent'].shape == (50,)
  top = result['holdout'][0]
  assert top['budget'] == max(h.budgets) and top['lr_ratio'] == pytest.approx(1, abs=0.05)
  lo, hi = top['predicted_lr_interval90']
  assert lo < top['predicted_lr'] < hi
  checks = hparams.acceptance(result)
  assert all(check['pass'] for check in checks.values()), checks
  text = json.dumps(scaling.jsonable(result), allow_nan=False)
  assert json.loads(text)['optima'][0]['method'] == 'surface'


def test_a_holdout_optimum_off_by_3x_fails_the_check():
  h = hparams_cpu.get_config().hparams
  h.bootstrap = 10
  result, _ = study(h, shift_top=3.0)
  assert result['holdout'][0]['lr_ratio'] == pytest.approx(1 / 3, rel=0.05)
  check = hparams.acceptance(result)['3_holdout_lr']
  assert not check['pass'] and check['range'] == [0.5, 2.0]


@pytest.mark.parametrize('field,value', [('hparams.batch_grid', (4,)), ('hparams.lr_grid', (1.0, -2.0)),
                                         ('hparams.budgets', (1e11, 2e11)), ('hparams.holdout', -1)])
def test_bad_settings_are_one_line_errors(field, value):
  c = hparams_cpu.get_config()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(UserError, match=re.escape(field)) as e:
    validate(c)
  assert '\n' not in str(e.value)


def test_too_small_a_budget_names_the_fix():
  c = hparams_smoke.get_config()
  c.hparams.budgets = (2e8, *c.hparams.budgets[1:])
  fix = 'hparams.min_steps=50 within 1% of its budget; raise the smallest hparams.budgets'
  with pytest.raises(UserError, match=re.escape(fix)) as e:
    hparams.plan(c, BYTE_VOCAB)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
  """The smoke profile through run.py, cut to 3 budgets (12 trials) to keep the suite fast: trials,
  results.csv, hparams.json with its acceptance checks, and both plots; a rerun runs nothing."""
  workdir = str(tmp_path / 'hparams')
  command = [sys.executable, 'run.py', '--config=experiments/hparams_smoke.py', f'--workdir={workdir}',
             '--config.hparams.budgets=(4e9, 8e9, 1.6e10)']
  done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'hparams: 12 trials over 3 budgets (1 held out)' in done.stdout
  with open(os.path.join(workdir, 'hparams.json')) as f:
    result = json.load(f)
  assert result['fitted_budgets'] == [4e9, 8e9] and result['holdout_budgets'] == [1.6e10]
  assert [o['trials'] for o in result['optima']] == [4, 4, 4]
  assert set(result['acceptance']) == {'1_fitted_budgets', '2_intervals', '3_holdout_lr'}
  assert result['acceptance']['1_fitted_budgets'] == {'value': 2, 'min': 4, 'pass': False}
  assert math.isfinite(result['holdout'][0]['lr_ratio']) and result['lr_opt']['law']['exponent'] is not None
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12 and {r['state'] for r in rows} == {'finished'}
  for name in ('hparams_vs_compute', 'loss_vs_lr'):
    assert os.path.getsize(os.path.join(workdir, f'{name}.png')) > 10_000, name
  assert os.path.exists(os.path.join(workdir, 'manifest.json'))
  again = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and '12 already finished, 0 to run' in again.stdout, again.stderr[-3000:]
