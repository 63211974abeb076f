"""Scaling-law fits on finished runs (Hoffmann et al. 2022, "Chinchilla").

Approach 1: the lower envelope of loss vs FLOPs over every run's curve, and which N sits on it.
Approach 2: a parabola in ln N per compute budget (IsoFLOP); its vertex gives N_opt(C), D_opt(C).
Approach 3: L(N, D) = E + A/N^α + B/D^β fitted with a Huber loss on ln L by L-BFGS (analytic
gradient) from the best points of a grid of initialisations.
Plus power laws in log-log space and bootstrap intervals that resample runs within each budget.
Everything here is numpy/scipy on small arrays: a full fit with bootstrap takes seconds.
"""
import dataclasses
import itertools
from typing import Callable

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
# Chinchilla's grid of initialisations for (ln A, ln B, ln E, α, β).
INIT_GRID = (np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
             np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
BOUNDS = [(-20, 80), (-20, 80), (-10, 5), (0, 5), (0, 5)]


@dataclasses.dataclass(frozen=True)
class Runs:
  """One row per finished run: its budget C, size N, tokens D and final loss."""
  budget: np.ndarray
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray

  def take(self, index: np.ndarray) -> 'Runs':
    return Runs(self.budget[index], self.n[index], self.d[index], self.loss[index])


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coef · x^exponent, fitted by least squares on (ln x, ln y); r2 is in log space."""
  coef: float
  exponent: float
  r2: float

  def __call__(self, x):
    return self.coef * np.asarray(x, float) ** self.exponent


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
  lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
  slope, intercept = np.polyfit(lx, ly, 1)
  resid = ly - (slope * lx + intercept)
  total = ((ly - ly.mean()) ** 2).sum()
  r2 = 1.0 - (resid ** 2).sum() / total if total > 0 else 1.0
  return PowerLaw(float(np.exp(intercept)), float(slope), float(r2))


@dataclasses.dataclass(frozen=True)
class Parabola:
  """loss ≈ c2·x² + c1·x + c0 with x = ln(size). `interior`: a minimum strictly inside the samples."""
  c2: float
  c1: float
  c0: float
  x_lo: float
  x_hi: float

  @property
  def convex(self) -> bool:
    return self.c2 > 0

  @property
  def x_min(self) -> float:
    return -self.c1 / (2 * self.c2) if self.c2 else float('nan')

  @property
  def interior(self) -> bool:
    return self.convex and self.x_lo < self.x_min < self.x_hi

  @property
  def loss_min(self) -> float:
    return float(np.polyval([self.c2, self.c1, self.c0], self.x_min))

  def __call__(self, x):
    return np.polyval([self.c2, self.c1, self.c0], x)


def fit_parabola(size: np.ndarray, loss: np.ndarray) -> Parabola | None:
  """Least-squares parabola in ln(size); None with fewer than 3 distinct sizes."""
  x = np.log(np.asarray(size, float))
  if len(np.unique(x)) < 3:
    return None
  c2, c1, c0 = np.polyfit(x, np.asarray(loss, float), 2)
  return Parabola(float(c2), float(c1), float(c0), float(x.min()), float(x.max()))


def approach2(runs: Runs) -> dict:
  """Per budget, parabolas in ln N and ln D; power laws through the interior vertices.

  Only budgets whose parabola has an interior minimum feed the power laws: a vertex outside the
  sampled sizes is an extrapolation. Missing fits (fewer than 2 usable budgets) come back as None.
  """
  budgets = []
  for c in np.unique(runs.budget):
    sel = runs.budget == c
    pn, pd = fit_parabola(runs.n[sel], runs.loss[sel]), fit_parabola(runs.d[sel], runs.loss[sel])
    if pn is None or pd is None:
      continue
    budgets.append({'budget': float(c), 'n_parabola': pn, 'd_parabola': pd,
                    'usable': pn.interior and pd.interior,
                    'n_opt': float(np.exp(pn.x_min)) if pn.convex else float('nan'),
                    'd_opt': float(np.exp(pd.x_min)) if pd.convex else float('nan'),
                    'loss_opt': pn.loss_min if pn.convex else float('nan'),
                    'best_loss': float(runs.loss[sel].min())})
  used = [b for b in budgets if b['usable']]
  out = {'budgets': budgets, 'n_opt': None, 'd_opt': None}
  if len(used) >= 2:
    c = np.array([b['budget'] for b in used])
    out['n_opt'] = fit_power_law(c, np.array([b['n_opt'] for b in used]))
    out['d_opt'] = fit_power_law(c, np.array([b['d_opt'] for b in used]))
  return out


def frontier(runs: Runs) -> PowerLaw:
  """Best observed final loss per budget vs budget: L* = k·C^exponent."""
  c = np.unique(runs.budget)
  return fit_power_law(c, np.array([runs.loss[runs.budget == b].min() for b in c]))


def loss_envelope(curves: list[tuple[np.ndarray, np.ndarray]], sizes: np.ndarray,
                  grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Approach 1: at each FLOP count in `grid`, the lowest loss any run reached there (its curve
  interpolated in ln FLOPs) and that run's size. Points no curve covers are NaN."""
  best_loss = np.full(len(grid), np.inf)
  best_size = np.full(len(grid), np.nan)
  for (flops, loss), size in zip(curves, sizes):
    lg = np.log(grid)
    inside = (lg >= np.log(flops[0])) & (lg <= np.log(flops[-1]))
    at = np.interp(lg, np.log(flops), loss)
    better = inside & (at < best_loss)
    best_loss[better], best_size[better] = at[better], size
  best_loss[~np.isfinite(best_loss)] = np.nan
  return best_loss, best_size


def smooth(x: np.ndarray, y: np.ndarray, factor: float) -> np.ndarray:
  """At each x (increasing), the mean of y over [x / factor, x]: a trailing window of fixed width in
  ln x, so short and long runs are smoothed alike (train losses of tiny batches are noisy)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  csum = np.cumsum(np.insert(y, 0, 0.0))
  hi = np.arange(1, len(y) + 1)
  lo = np.searchsorted(x, x / factor, side='left')
  return (csum[hi] - csum[lo]) / (hi - lo)


# ---- Approach 3 -------------------------------------------------------------------------------

def _logsumexp(terms: np.ndarray) -> np.ndarray:
  """ln Σ exp over axis 0; scipy's general version costs more than the whole objective here."""
  top = terms.max(axis=0)
  return top + np.log(np.exp(terms - top).sum(axis=0))


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss of residuals r and its derivative."""
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
  return value, np.clip(r, -delta, delta)


def approach3_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                        delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
  """Σ Huber(LSE(a − α ln N, b − β ln D, e) − ln L) / δ and its gradient; θ = (a, b, e, α, β).

  Divided by δ so the objective is O(Σ|r|), which keeps L-BFGS's relative stopping test meaningful.
  """
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  pred = _logsumexp(terms)
  value, slope = _huber(pred - log_loss, delta)
  w = np.exp(terms - pred) * slope  # d(loss)/d(term) for each of the three terms
  grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()])
  return float(value.sum()) / delta, grad / delta


def grid_objective(log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                   delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
  """The objective at every point of INIT_GRID at once: (points [G, 5], values [G])."""
  points = np.array(list(itertools.product(*INIT_GRID)))
  a, b, e, alpha, beta = (points[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(points), len(log_n)))])
  value, _ = _huber(_logsumexp(terms) - log_loss, delta)
  return points, value.sum(axis=1) / delta


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """L(N, D) = E + A/N^α + B/D^β and its compute-optimal allocation under C = 6·N·D."""
  A: float
  B: float
  E: float
  alpha: float
  beta: float
  objective: float

  def __call__(self, n, d):
    return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

  @property
  def a(self) -> float:
    """Exponent of N_opt ∝ C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """Exponent of D_opt ∝ C^b."""
    return self.alpha / (self.alpha + self.beta)

  def n_opt(self, c):
    with np.errstate(divide='ignore', invalid='ignore'):  # a degenerate fit (α or β = 0) gives 0 or inf
      g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    return g * (np.asarray(c, float) / 6) ** self.a

  def d_opt(self, c):
    with np.errstate(divide='ignore'):
      return np.asarray(c, float) / (6 * self.n_opt(c))


def approach3(runs: Runs, starts: int = 8, extra_starts: list[np.ndarray] = (),
              delta: float = HUBER_DELTA) -> ParametricFit:
  """L-BFGS-B from the `starts` best grid points (and any `extra_starts`); the lowest objective wins."""
  log_n, log_d, log_loss = np.log(runs.n), np.log(runs.d), np.log(runs.loss)
  points, values = grid_objective(log_n, log_d, log_loss, delta)
  inits = [*extra_starts, *points[np.argsort(values)[:starts]]]
  best = None
  for x0 in inits:
    res = optimize.minimize(approach3_objective, x0, args=(log_n, log_d, log_loss, delta), jac=True,
                            method='L-BFGS-B', bounds=BOUNDS,
                            options={'maxiter': 2000, 'ftol': 1e-15, 'gtol': 1e-10})
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  return ParametricFit(float(np.exp(a)), float(np.exp(b)), float(np.exp(e)), float(alpha), float(beta),
                       float(best.fun))


def theta(fit: ParametricFit) -> np.ndarray:
  """The fit as the optimiser's parameter vector (ln A, ln B, ln E, α, β): a warm start."""
  return np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])


# ---- uncertainty and extrapolation ------------------------------------------------------------

def resample_within_budgets(runs: Runs, rng: np.random.Generator) -> np.ndarray:
  """Indices of a bootstrap sample: each budget's runs drawn with replacement, so every budget
  keeps its number of runs."""
  index = []
  for c in np.unique(runs.budget):
    members = np.flatnonzero(runs.budget == c)
    index.append(rng.choice(members, len(members), replace=True))
  return np.concatenate(index)


def bootstrap(runs: Runs, statistics: Callable[[Runs], dict[str, float]], samples: int,
              seed: int) -> dict[str, np.ndarray]:
  """Each statistic over `samples` resamples; NaN where a resample could not be fitted."""
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  for _ in range(samples):
    for k, v in statistics(runs.take(resample_within_budgets(runs, rng))).items():
      draws.setdefault(k, []).append(v)
  return {k: np.array(v, float) for k, v in draws.items()}


def interval(draws: np.ndarray, level: float = 0.9) -> tuple[float, float]:
  """Central percentile interval of the finite draws."""
  finite = draws[np.isfinite(draws)]
  if not len(finite):
    return float('nan'), float('nan')
  tail = 100 * (1 - level) / 2
  return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def holdout(runs: Runs) -> dict[str, float]:
  """Fit without the largest budget; predict its best loss (frontier) and N_opt (Approach 2).

  The N_opt target is the full data's parabola vertex at that budget.
  """
  top = runs.budget.max()
  rest = runs.take(np.flatnonzero(runs.budget < top))
  observed_loss = float(runs.loss[runs.budget == top].min())
  if len(np.unique(rest.budget)) < 2:  # a line through one point predicts nothing
    nan = float('nan')
    return {'budget': float(top), 'observed_best_loss': observed_loss, 'predicted_best_loss': nan,
            'loss_rel_error': nan, 'observed_n_opt': nan, 'predicted_n_opt': nan, 'n_opt_factor': nan}
  predicted_loss = float(frontier(rest)(top))
  out = {'budget': float(top), 'observed_best_loss': observed_loss, 'predicted_best_loss': predicted_loss,
         'loss_rel_error': abs(predicted_loss - observed_loss) / observed_loss,
         'observed_n_opt': float('nan'), 'predicted_n_opt': float('nan'), 'n_opt_factor': float('nan')}
  full, part = approach2(runs), approach2(rest)
  top_fit = [b for b in full['budgets'] if b['budget'] == top]
  if part['n_opt'] is not None and top_fit and top_fit[0]['n_parabola'].interior:
    observed, predicted = top_fit[0]['n_opt'], float(part['n_opt'](top))
    out.update(observed_n_opt=observed, predicted_n_opt=predicted,
               n_opt_factor=max(observed / predicted, predicted / observed))
  return out
