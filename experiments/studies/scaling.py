"""IsoFLOP scaling studies, the analysis: finished runs merged with their plan (planning.py) and
fitted three ways (Hoffmann et al. 2022's Approaches 1-3, fits.py), with bootstrap intervals, a
held-out check and the acceptance verdicts a study prints.
"""
import csv
import dataclasses
import json
import math
import os
from typing import Any, Callable

import numpy as np
from ml_collections import ConfigDict

from experiments.studies import fits, sweep
from experiments.studies.planning import PlannedRun
from model.errors import UserError

def merge_results(planned: list[PlannedRun], results: list[dict]) -> list[dict]:
  """Plan rows with each run's state and final metrics. The plan's columns win (the final record's
  lr is the schedule's last value); the measured FLOPs are kept beside the planned ones."""
  by_name = {r['name']: r for r in results}
  rows = []
  for p in planned:
    plan_row, r = p.row(), by_name[p.name]
    final = {k: v for k, v in r.items() if '.' not in k and k not in plan_row}
    rows.append({**plan_row, **final, 'flops_measured': r.get('flops', '')})
  return rows


def runs_for(rows: list[dict], count: str, metric: str = 'eval_loss') -> fits.Runs:
  """Finished IsoFLOP runs as fits.Runs with N counted as `count` (n_flops | params_non_embedding |
  params), D = tokens trained and the loss read from the final metric `metric`."""
  done = [r for r in rows if r['role'] == 'isoflop' and r['state'] == 'finished']
  missing = [r['name'] for r in done if r.get(metric) in (None, '')]
  if missing:
    raise UserError(f'scaling.metric={metric!r} is not in the final metrics of {missing[0]}; use '
                    'eval_loss or an eval/NAME/METRIC its eval.tasks log')
  col = lambda k: np.array([float(r[k]) for r in done])
  return fits.Runs(col('budget'), col(count), col('tokens'), col(metric))


def lr_check(rows: list[dict]) -> dict[str, dict]:
  """Per checked model: final loss against lr (the rule's lr is its IsoFLOP run at the same budget)
  and the best lr: the vertex of a parabola in ln lr when it is interior, else the best sampled."""
  checked = {(r['budget'], r['n_layers'], r['d_model']) for r in rows if r['role'] == 'lr_check'}
  groups: dict[tuple, list] = {}
  rule: dict[tuple, float] = {}
  for r in rows:
    key = (r['budget'], r['n_layers'], r['d_model'])
    if key in checked and r['role'] == 'isoflop':
      rule[key] = float(r['lr'])
    if key in checked and r['state'] == 'finished':
      groups.setdefault(key, []).append((float(r['lr']), float(r['eval_loss'])))
  out = {}
  for key, points in groups.items():
    lr, loss = np.array(sorted(points)).T
    p = fits.fit_parabola(lr, loss)
    best = float(np.exp(p.x_min)) if p is not None and p.interior else float(lr[np.argmin(loss)])
    out[f'{key[1]}x{key[2]}'] = {'budget': key[0], 'lr': lr.tolist(), 'loss': loss.tolist(),
                                 'rule_lr': rule.get(key, float('nan')), 'best_lr': best,
                                 'best_over_rule': best / rule.get(key, float('nan'))}
  return out


def train_curves(rows: list[dict], workdirs: dict[str, str]) -> dict:
  """{name: (N, FLOPs, smoothed train loss)} of the finished IsoFLOP runs, for Approach 1; a WSD
  cooldown's curve is its stable run's up to the branch point, then its own."""
  curves = {}
  for r in rows:
    if r['role'] == 'isoflop' and r['state'] == 'finished':
      records = [m for m in sweep.read_metrics(workdirs[r['name']]) if 'loss' in m]
      if r.get('stable'):
        stable = sweep.read_metrics(workdirs[r['stable']])
        records = [m for m in stable if 'loss' in m and m['step'] <= r['branch_step']] + \
            [m for m in records if m['step'] > r['branch_step']]
      flops = np.array([m['flops'] for m in records])
      curves[r['name']] = (r['n_flops'], flops, fits.smooth(flops, [m['loss'] for m in records], 1.25))
  return curves


def envelope(curves: dict[str, tuple[float, np.ndarray, np.ndarray]], budgets: np.ndarray,
             points: int = 40) -> dict:
  """Approach 1 on train-loss curves {name: (N, flops, loss)}: the lowest loss at each FLOP count
  between the smallest and largest budget, the N that reaches it, and N_opt ∝ C^a through them."""
  grid = np.geomspace(budgets.min(), budgets.max(), points)
  sizes = np.array([n for n, _, _ in curves.values()])
  loss, size = fits.loss_envelope([(f, l) for _, f, l in curves.values()], sizes, grid)
  ok = np.isfinite(loss)
  law = fits.fit_power_law(grid[ok], size[ok]) if len(np.unique(size[ok])) > 1 else None
  return {'flops': grid[ok], 'loss': loss[ok], 'n': size[ok], 'n_opt': law}


def approach3_summary(runs: fits.Runs, fit: fits.ParametricFit) -> dict:
  resid = runs.loss / fit(runs.n, runs.d) - 1
  return {**dataclasses.asdict(fit), 'a': fit.a, 'b': fit.b,
          'rms_relative_residual': float(np.sqrt(np.mean(resid ** 2)))}


def bootstrap_statistics(warm: fits.ParametricFit) -> Callable[[fits.Runs], dict[str, float]]:
  """a, b (Approach 2) and α, β, a (Approach 3) of one resample; the full fit warm-starts L-BFGS."""
  def statistics(runs: fits.Runs) -> dict[str, float]:
    a2 = fits.approach2(runs)
    a3 = fits.approach3(runs, starts=2, extra_starts=[fits.theta(warm)])
    return {'a': a2['n_opt'].exponent if a2['n_opt'] else float('nan'),
            'b': a2['d_opt'].exponent if a2['d_opt'] else float('nan'),
            'alpha': a3.alpha, 'beta': a3.beta, 'a3': a3.a}
  return statistics


def analyze(rows: list[dict], curves: dict, s: ConfigDict, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
  """Every fit with its intervals, and the bootstrap draws; `rows` are plan rows merged with each
  run's final metrics."""
  main = runs_for(rows, 'n_flops', s.metric)
  if len(np.unique(main.budget)) < 2:
    raise UserError(f'only {len(main.loss)} IsoFLOP runs finished, over fewer than 2 budgets; '
                    'rerun the same command to finish the others')
  a2, a3 = fits.approach2(main), fits.approach3(main)
  draws = fits.bootstrap(main, bootstrap_statistics(a3), s.bootstrap, seed)
  out = {
      'n_runs': len(main.loss), 'budgets': sorted(set(main.budget.tolist())),
      'approach1': envelope(curves, main.budget),
      'approach2': {**a2, 'a': a2['n_opt'].exponent if a2['n_opt'] else float('nan'),
                    'b': a2['d_opt'].exponent if a2['d_opt'] else float('nan')},
      'approach3': approach3_summary(main, a3),
      'frontier': fits.frontier(main),
      'bootstrap': {'samples': s.bootstrap, 'level': 0.9,
                    **{k: {'interval': fits.interval(v), 'failed': int((~np.isfinite(v)).sum())}
                       for k, v in draws.items()}},
      'holdout': fits.holdout(main),
      'lr_check': lr_check(rows),
      'other_counts': {},
  }
  for count in ('params_non_embedding', 'params'):
    runs = runs_for(rows, count, s.metric)
    other = fits.approach2(runs)
    out['other_counts'][count] = {
        'approach2_a': other['n_opt'].exponent if other['n_opt'] else float('nan'),
        'approach2_b': other['d_opt'].exponent if other['d_opt'] else float('nan'),
        'approach3': approach3_summary(runs, fits.approach3(runs))}
  return out, draws


def acceptance(result: dict, sizes_per_budget: list[int], wall_minutes: float) -> dict:
  """The issue's acceptance criteria 1-4, each with its value, threshold and verdict."""
  budgets = result['budgets']
  per_budget = result['approach2']['budgets']
  interior = sum(b['n_parabola'].interior for b in per_budget)
  a2, a3 = result['approach2']['a'], result['approach3']['a']
  hold = result['holdout']
  decades = math.log10(max(budgets) / min(budgets))
  return {
      '1_budgets_and_time': {
          'budgets': len(budgets), 'decades': decades, 'sizes_per_budget': sizes_per_budget,
          'wall_minutes': wall_minutes,
          'pass': len(budgets) >= 5 and decades >= 1.2 and min(sizes_per_budget) >= 4
                  and max(sizes_per_budget) <= 6 and wall_minutes <= 60},
      '2_interior_minima': {'value': interior, 'of': len(per_budget),
                            'pass': interior >= math.ceil(0.8 * len(per_budget))},
      '3a_approach2_a': {'value': a2, 'interval90': result['bootstrap']['a']['interval'],
                         'range': [0.35, 0.70], 'pass': 0.35 <= a2 <= 0.70},
      '3b_approach2_vs_3': {'value': abs(a2 - a3), 'approach2_a': a2, 'approach3_a': a3,
                            'max': 0.15, 'pass': abs(a2 - a3) <= 0.15},
      '3c_frontier_r2': {'value': result['frontier'].r2, 'min': 0.95,
                         'pass': result['frontier'].r2 >= 0.95},
      '4a_holdout_best_loss': {'value': hold['loss_rel_error'], 'max': 0.03,
                               'pass': hold['loss_rel_error'] <= 0.03},
      '4b_holdout_n_opt': {'value': hold['n_opt_factor'], 'max': 1.6,
                           'pass': bool(hold['n_opt_factor'] <= 1.6)},
  }


def reference(workdir: str, result: dict) -> dict:
  """The one-run-per-point study in `workdir` (scaling.reference) beside this one: its total
  training FLOPs (runs.csv) and Approach-2 exponent with its interval (fits.json)."""
  if not workdir:
    return {}
  try:
    with open(os.path.join(workdir, 'fits.json')) as f:
      fitted = json.load(f)
    with open(os.path.join(workdir, 'runs.csv'), newline='') as f:
      flops = sum(float(r['flops']) for r in csv.DictReader(f) if r['state'] == 'finished')
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'scaling.reference={workdir!r} holds no finished scaling study (fits.json and '
                    f'runs.csv: {e}); run one there first, or set scaling.reference=""') from None
  a = fitted['approach2']['a']
  return {'workdir': workdir, 'flops': flops, 'a': a,
          'interval90': fitted['bootstrap']['a']['interval'],
          'a_difference': abs(result['approach2']['a'] - a),
          'flops_ratio': result['compute']['wsd_flops'] / flops}


def wsd_acceptance(result: dict, wall_minutes: float) -> dict:
  """A WSD study's criteria: within 0.1 of the reference's exponent, on <= 50% of its FLOPs, in an hour."""
  ref = result.get('reference') or {}
  out = {'5_wsd_wall_minutes': {'value': wall_minutes, 'max': 60, 'pass': wall_minutes <= 60}}
  if ref:
    out['5_wsd_vs_reference_a'] = {'value': ref['a_difference'], 'a': result['approach2']['a'],
                                   'interval90': result['bootstrap']['a']['interval'],
                                   'reference_a': ref['a'], 'reference_interval90': ref['interval90'],
                                   'max': 0.1, 'pass': ref['a_difference'] <= 0.1}
    out['5_wsd_flops_ratio'] = {'value': ref['flops_ratio'], 'wsd_flops': result['compute']['wsd_flops'],
                                'reference_flops': ref['flops'], 'max': 0.5,
                                'pass': ref['flops_ratio'] <= 0.5}
  return out


def isoflop_rows(approach2: dict) -> list[dict]:
  return [{'budget': b['budget'], 'interior_minimum': b['n_parabola'].interior, 'n_opt': b['n_opt'],
           'd_opt': b['d_opt'], 'loss_at_n_opt': b['loss_opt'], 'best_observed_loss': b['best_loss'],
           'c2': b['n_parabola'].c2, 'c1': b['n_parabola'].c1, 'c0': b['n_parabola'].c0}
          for b in approach2['budgets']]


def jsonable(x: Any) -> Any:
  """Fit results as plain JSON: dataclasses with their derived fields, arrays as lists, NaN as null."""
  if isinstance(x, fits.Parabola):
    return {**dataclasses.asdict(x), 'convex': x.convex, 'interior': x.interior, 'x_min': x.x_min}
  if dataclasses.is_dataclass(x):
    return jsonable(dataclasses.asdict(x))
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x
