"""Hyperparameter scaling (DeepSeek LLM 2024, §3.1): the compute-optimal learning rate and batch size
as power laws of the compute budget, lr_opt(C) = a·C^α and B_opt(C) = b·C^β.

Each budget C trains one model, the `scaling.ladder` model whose N is nearest N* = sqrt(C / (6 ·
scaling.tokens_per_param)), on every pair of `batch_grid` batch sizes and `lr_grid` multipliers of
scaling's lr rule at that width and batch; every trial spends C within 1%. Per budget a quadratic
surface in (ln lr, ln B) fitted to the final loss gives the optimum when its minimum lies inside the
sampled points, else the best trial stands in. Power laws through the optima of all but the
`holdout` largest budgets, with bootstrap intervals (trials resampled within each budget), predict
the held-out budgets' optima.
"""
import dataclasses
import math

import numpy as np
from ml_collections import ConfigDict
from scipy import spatial

from experiments.studies import fits, planning
from model.errors import UserError

LEVEL = 0.9  # of every bootstrap interval


@dataclasses.dataclass(frozen=True)
class Trials:
  """Finished trials, one entry each. fits.bootstrap resamples anything with `budget` and `take`."""
  budget: np.ndarray
  lr: np.ndarray
  batch: np.ndarray
  loss: np.ndarray

  def take(self, index: np.ndarray) -> 'Trials':
    return Trials(self.budget[index], self.lr[index], self.batch[index], self.loss[index])


@dataclasses.dataclass(frozen=True)
class Surface:
  """loss ≈ c0 + c1·u + c2·v + c3·u² + c4·u·v + c5·v² with u = ln lr − center[0] and
  v = ln batch − center[1] (centred so the least squares are well conditioned)."""
  coef: tuple[float, ...]
  center: tuple[float, float]

  @property
  def convex(self) -> bool:
    """A positive-definite Hessian: one minimum, no saddle or ridge."""
    _, _, _, a, b, c = self.coef
    return a > 0 and 4 * a * c - b * b > 0

  def minimum(self) -> tuple[float, float]:
    """(ln lr, ln batch) where the gradient vanishes; call only when convex."""
    _, p, q, a, b, c = self.coef
    u, v = np.linalg.solve([[2 * a, b], [b, 2 * c]], [-p, -q])
    return float(u + self.center[0]), float(v + self.center[1])

  def best_log_lr(self, log_batch: float) -> float | None:
    """The ln lr that minimises the surface at one batch size; None where it curves down in lr."""
    _, p, _, a, b, _ = self.coef
    return None if a <= 0 else float(self.center[0] - (p + b * (log_batch - self.center[1])) / (2 * a))

  def __call__(self, log_lr, log_batch) -> np.ndarray:
    return _features(np.asarray(log_lr, float) - self.center[0],
                     np.asarray(log_batch, float) - self.center[1]) @ np.array(self.coef)


def _features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)


def fit_surface(lr: np.ndarray, batch: np.ndarray, loss: np.ndarray) -> Surface | None:
  """Least-squares quadratic in (ln lr, ln batch); None when the points cannot pin all six
  coefficients (fewer than 3 distinct values on an axis, or too few points)."""
  x, y = np.log(lr), np.log(batch)
  center = (float(x.mean()), float(y.mean()))
  design = _features(x - center[0], y - center[1])
  if np.linalg.matrix_rank(design) < design.shape[1]:
    return None
  coef, *_ = np.linalg.lstsq(design, np.asarray(loss, float), rcond=None)
  return Surface(tuple(float(c) for c in coef), center)


def inside(points: np.ndarray, point: tuple[float, float]) -> bool:
  """Whether `point` lies in the convex hull of `points` [n, 2] (its boundary included)."""
  return bool(spatial.Delaunay(np.unique(points, axis=0)).find_simplex(np.array(point)) >= 0)


def optimum(t: Trials) -> dict:
  """The best (lr, batch) of one budget's trials. Method 'surface': the fitted surface's minimum,
  when it lies inside the sampled points. Else 'surface_lr': the best trial's batch and the lr that
  minimises the surface at that batch, when inside the lrs tried there (the optimal batch is often
  at the grid's edge while the lr is not). Else 'best': the best trial."""
  best = int(np.argmin(t.loss))
  out = {'budget': float(t.budget[0]), 'trials': len(t.loss), 'method': 'best',
         'lr_opt': float(t.lr[best]), 'batch_opt': float(t.batch[best]), 'loss_opt': float(t.loss[best]),
         'best_lr': float(t.lr[best]), 'best_batch': float(t.batch[best]), 'best_loss': float(t.loss[best])}
  surface = fit_surface(t.lr, t.batch, t.loss)
  if surface is None:
    return {**out, 'surface': None}
  if surface.convex and inside(np.column_stack([np.log(t.lr), np.log(t.batch)]), surface.minimum()):
    x, y = surface.minimum()
    out.update(method='surface', lr_opt=math.exp(x), batch_opt=math.exp(y), loss_opt=float(surface(x, y)))
  else:
    y, tried = math.log(t.batch[best]), np.log(t.lr[t.batch == t.batch[best]])
    x = surface.best_log_lr(y)
    if x is not None and tried.min() < x < tried.max():
      out.update(method='surface_lr', lr_opt=math.exp(x), loss_opt=float(surface(x, y)))
  return {**out, 'surface': surface}


def optima(t: Trials) -> list[dict]:
  """optimum() of every budget, smallest budget first."""
  return [optimum(t.take(np.flatnonzero(t.budget == c))) for c in np.unique(t.budget)]


def laws(points: list[dict]) -> dict[str, fits.PowerLaw]:
  """lr_opt(C) and B_opt(C) through the per-budget optima."""
  c = np.array([p['budget'] for p in points])
  return {key: fits.fit_power_law(c, np.array([p[f'{key}_opt'] for p in points]))
          for key in ('lr', 'batch')}


def law_statistics(t: Trials) -> dict[str, float]:
  """Both laws' coefficients and exponents on one bootstrap resample."""
  return {f'{key}_{part}': getattr(law, part) for key, law in laws(optima(t)).items()
          for part in ('coef', 'exponent')}


def band(draws: dict[str, np.ndarray], key: str, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The central 90% of the bootstrap laws' predictions of `key` (lr | batch) at each budget."""
  c = np.asarray(budgets, float)
  predictions = draws[f'{key}_coef'][:, None] * c ** draws[f'{key}_exponent'][:, None]
  intervals = [fits.interval(column, LEVEL) for column in predictions.T]
  return np.array([i[0] for i in intervals]), np.array([i[1] for i in intervals])


# ---- planning ---------------------------------------------------------------------------------

def split_budgets(h: ConfigDict) -> tuple[list[float], list[float]]:
  """(fitted, held out): the `holdout` largest budgets are predicted, not fitted."""
  budgets = sorted(float(b) for b in h.budgets)
  return budgets[:len(budgets) - h.holdout], budgets[len(budgets) - h.holdout:]


def plan_trial(budget: float, cost: planning.ShapeCost, batch: int, multiplier: float, s: ConfigDict,
               seq_len: int, min_steps: int) -> planning.PlannedRun:
  """One trial that spends `budget` at `batch` rows and `multiplier` × the lr rule (else a UserError)."""
  name = f'{planning.run_name(budget, cost.shape)}_b{batch}_lrx{multiplier:g}'
  run = planning.sized_run(name, 'hparams', budget, cost, batch, s, seq_len, multiplier)
  if run.steps < min_steps or abs(run.flops / budget - 1) > 0.01:
    raise UserError(f'{name} gets {run.steps} steps of {batch}x{seq_len} tokens ({run.flops:.3g} of its '
                    f'{budget:.3g} FLOPs) but needs >= hparams.min_steps={min_steps} within 1% of its '
                    'budget; raise the smallest hparams.budgets or lower the largest hparams.batch_grid')
  return run


def plan(cfg: ConfigDict, vocab_size: int) -> list[planning.PlannedRun]:
  """Every budget's model × batch_grid × lr_grid, smallest budget first."""
  h, s = cfg.hparams, cfg.scaling
  shapes = planning.parse_ladder(s.ladder, s.head_dim)
  costs = sorted((planning.shape_cost(cfg, shape, vocab_size) for shape in shapes), key=lambda c: c.n)
  nearest = ConfigDict({**s.to_dict(), 'sizes_per_budget': 1})  # a window of one ladder model
  return [plan_trial(c, planning.window(costs, c, nearest)[0], int(b), float(m), s, cfg.train.seq_len,
                     h.min_steps)
          for c in sorted(float(b) for b in h.budgets) for b in h.batch_grid for m in h.lr_grid]


# ---- analysis ---------------------------------------------------------------------------------

def finished(rows: list[dict], metric: str) -> Trials:
  """The finished trials of merged plan rows, judged by the final `metric`."""
  done = [r for r in rows if r['state'] == 'finished']
  missing = [r['name'] for r in done if r.get(metric) in (None, '')]
  if missing:
    raise UserError(f'hparams.metric={metric!r} is not in the final metrics of {missing[0]}; use '
                    'eval_loss or an eval/NAME/METRIC its eval.tasks log')
  col = lambda k: np.array([float(r[k]) for r in done])
  return Trials(col('budget'), col('lr'), col('batch_size'), col(metric))


def holdout_check(optimum_at: dict, law: dict[str, fits.PowerLaw], draws: dict[str, np.ndarray]) -> dict:
  """A held-out budget's observed optimum against the laws' prediction and its 90% interval."""
  c = optimum_at['budget']
  out = {'budget': c, 'method': optimum_at['method']}
  for key in ('lr', 'batch'):
    predicted, observed = float(law[key](c)), optimum_at[f'{key}_opt']
    lo, hi = band(draws, key, np.array([c]))
    out.update({f'observed_{key}': observed, f'predicted_{key}': predicted,
                f'{key}_ratio': predicted / observed, f'predicted_{key}_interval90': [lo[0], hi[0]]})
  return out


def analyze(rows: list[dict], h: ConfigDict, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
  """Per-budget optima, the two laws fitted on the non-held-out budgets with bootstrap intervals,
  and the held-out check; returns the result and the bootstrap draws."""
  t = finished(rows, h.metric)
  fitted, held = split_budgets(h)
  empty = [c for c in fitted + held if not (t.budget == c).any()]
  if empty:
    raise UserError(f'no trial of budget {empty[0]:.3g} has finished; rerun the same command to run them')
  per_budget = optima(t)
  fit_trials = t.take(np.flatnonzero(np.isin(t.budget, fitted)))
  law = laws([o for o in per_budget if o['budget'] in fitted])
  draws = fits.bootstrap(fit_trials, law_statistics, h.bootstrap, seed)
  result = {'metric': h.metric, 'n_trials': len(t.loss), 'fitted_budgets': fitted, 'holdout_budgets': held,
            'optima': per_budget, 'bootstrap': {'samples': h.bootstrap, 'level': LEVEL}}
  for key in ('lr', 'batch'):
    result[f'{key}_opt'] = {'law': law[key],
                            **{f'{part}_interval90': fits.interval(draws[f'{key}_{part}'], LEVEL)
                               for part in ('coef', 'exponent')}}
  result['holdout'] = [holdout_check(o, law, draws) for o in per_budget if o['budget'] in held]
  return result, draws


def acceptance(result: dict) -> dict:
  """Issue 16, point 4: both laws fitted over >= 4 budgets with intervals, and the largest held-out
  budget's lr_opt predicted within a factor 2."""
  n = len(result['fitted_budgets'])
  exponents = {f'{key}_exponent_interval90': result[f'{key}_opt']['exponent_interval90']
               for key in ('lr', 'batch')}
  top = result['holdout'][-1] if result['holdout'] else {'budget': float('nan'), 'lr_ratio': float('nan')}
  return {
      '1_fitted_budgets': {'value': n, 'min': 4, 'pass': n >= 4},
      '2_intervals': {'value': exponents,
                      'pass': all(math.isfinite(v) for i in exponents.values() for v in i)},
      '3_holdout_lr': {'value': top['lr_ratio'], 'budget': top['budget'], 'range': [0.5, 2.0],
                       'pass': bool(0.5 <= top['lr_ratio'] <= 2.0)},
  }
