"""PNG figures for sweeps and scaling studies (matplotlib, Agg: no display needed)."""
import math
import os
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from experiments.studies import fits  # noqa: E402


def _save(fig, path: str) -> str:
  for ax in fig.axes:  # label only powers of ten on log axes spanning a decade or more
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
      if axis.get_scale() == 'log' and lo > 0 and hi / lo >= 10:
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _legend(ax) -> None:
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def _colors(n: int):
  return plt.cm.viridis(np.linspace(0, 0.9, max(n, 1)))


def _plot_positive(ax, x, y, *args, **kwargs) -> None:
  """Plot on log axes, dropping non-positive or non-finite points (a degenerate fit can give N_opt = 0)."""
  x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
  ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
  if ok.any():
    ax.plot(x[ok], y[ok], *args, **kwargs)


def sweep_curves(rows: list[dict[str, Any]], x: str, path: str, metric: str = 'eval_loss',
                 panels: str = '') -> str:
  """Final `metric` against override `x` (log axis), one line per setting of the other overrides;
  one panel per value of override `panels` when given (e.g. model.parameterization)."""
  done = [r for r in rows if r['state'] == 'finished' and x in r]
  values = sorted({str(r.get(panels)) for r in done}) if panels else ['']
  fig, axes = plt.subplots(1, len(values), figsize=(6 * len(values), 4), squeeze=False,
                           sharey=True)
  swept = {k for r in done for k in r if '.' in k and k not in (x, panels)}  # dotted: overrides
  others = sorted(k for k in swept if len({str(r.get(k)) for r in done}) > 1)
  for value, ax in zip(values, axes[0]):
    groups: dict[tuple, list] = {}
    for r in done:
      if not panels or str(r.get(panels)) == value:
        groups.setdefault(tuple((k, r.get(k)) for k in others), []).append(
            (float(r[x]), float(r[metric])))
    for (key, points), color in zip(sorted(groups.items(), key=str), _colors(len(groups))):
      xs, ys = np.array(sorted(points)).T
      label = ', '.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in key
                        if v not in (None, '')) or metric  # unset in this panel's trials
      ax.plot(xs, ys, 'o-', color=color, label=label)
      ax.plot(xs[np.argmin(ys)], ys.min(), '*', color=color, ms=14)
    title = f'{metric} vs {x} (★ = best)' + (f': {panels.rsplit(".", 1)[-1]}={value}' if panels else '')
    ax.set(xscale='log', xlabel=x, ylabel=f'final {metric}', title=title)
    _legend(ax)
  return _save(fig, path)


def isoflop_curves(runs: fits.Runs, approach2: dict, path: str) -> str:
  """Final loss vs N per budget, each with its parabola in ln N and its vertex."""
  fig, ax = plt.subplots(figsize=(7, 5))
  for b, color in zip(approach2['budgets'], _colors(len(approach2['budgets']))):
    sel = runs.budget == b['budget']
    ax.plot(runs.n[sel], runs.loss[sel], 'o', color=color, label=f'C = {b["budget"]:.2g}')
    p = b['n_parabola']
    x = np.linspace(p.x_lo - 0.15, p.x_hi + 0.15, 100)
    ax.plot(np.exp(x), p(x), '-', color=color, alpha=0.7)
    if p.interior:
      ax.plot(b['n_opt'], b['loss_opt'], 'kx', ms=9)
  ax.set(xscale='log', xlabel='N (training FLOPs per token ÷ 6)', ylabel='final eval loss (nats/token)',
         title='IsoFLOP curves (x = parabola minimum)')
  _legend(ax)
  return _save(fig, path)


def optimal_allocation(approach2: dict, approach3: fits.ParametricFit, path: str) -> str:
  """N_opt(C) and D_opt(C): IsoFLOP vertices with their power laws, and Approach 3's prediction."""
  used = [b for b in approach2['budgets'] if b['usable']]
  budgets = np.array([b['budget'] for b in approach2['budgets']])
  grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 50)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label, a3 in ((axes[0], 'n_opt', 'N_opt', approach3.n_opt), (axes[1], 'd_opt', 'D_opt',
                                                                            approach3.d_opt)):
    law = approach2[key]
    if used:
      ax.plot([b['budget'] for b in used], [b[key] for b in used], 'o', label='IsoFLOP minima')
    if law is not None:
      ax.plot(grid, law(grid), '-', label=f'Approach 2: ∝ C^{law.exponent:.3f}')
    exponent = approach3.a if key == 'n_opt' else approach3.b
    _plot_positive(ax, grid, a3(grid), '--', label=f'Approach 3: ∝ C^{exponent:.3f}')
    ax.set(xscale='log', yscale='log', xlabel='C (FLOPs)', ylabel=label, title=f'{label} vs compute')
    _legend(ax)
  return _save(fig, path)


def loss_frontier(curves: dict, envelope: dict, runs: fits.Runs, frontier: fits.PowerLaw, path: str) -> str:
  """Every run's train-loss curve vs FLOPs, their lower envelope, and the best-loss power law."""
  fig, ax = plt.subplots(figsize=(7, 5))
  for _, flops, loss in curves.values():
    ax.plot(flops, loss, '-', color='0.75', lw=0.8)
  ax.plot(envelope['flops'], envelope['loss'], 'b-', lw=2, label='envelope (Approach 1)')
  budgets = np.unique(runs.budget)
  best = [runs.loss[runs.budget == c].min() for c in budgets]
  ax.plot(budgets, best, 'ro', label='best final eval loss per budget')
  grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50)
  ax.plot(grid, frontier(grid), 'r--', label=f'L* = {frontier.coef:.3g}·C^{frontier.exponent:.4f} '
                                               f'(R² {frontier.r2:.3f})')
  ax.set(xscale='log', yscale='log', xlabel='C (FLOPs)', ylabel='loss (nats/token)',
         xlim=(budgets.min() / 20, budgets.max() * 2),
         title='Loss vs compute: train-loss curves (grey), final eval loss (red)')
  lo = min(min(best), np.nanmin(envelope['loss'], initial=np.inf))
  hi = np.percentile(np.concatenate([l for _, _, l in curves.values()]), 90)
  ax.set_ylim(lo * 0.97, hi)
  _legend(ax)
  return _save(fig, path)


def approach3_contours(fit: fits.ParametricFit, runs: fits.Runs, path: str) -> str:
  """Predicted loss over (C, N) with the compute-efficient frontier N_opt(C) and the runs."""
  c = np.geomspace(runs.budget.min() / 3, runs.budget.max() * 3, 120)
  n = np.geomspace(runs.n.min() / 3, runs.n.max() * 3, 120)
  cc, nn = np.meshgrid(c, n)
  fig, ax = plt.subplots(figsize=(7, 5))
  contour = ax.contourf(cc, nn, fit(nn, cc / (6 * nn)), levels=30, cmap='viridis_r')
  fig.colorbar(contour, ax=ax, label='predicted loss')
  _plot_positive(ax, c, fit.n_opt(c), 'r-', lw=2, label=f'efficient frontier N_opt ∝ C^{fit.a:.3f}')
  ax.scatter(runs.budget, runs.n, c='w', edgecolors='k', s=25, label='runs')
  ax.set(xscale='log', yscale='log', xlabel='C (FLOPs)', ylabel='N', ylim=(n.min(), n.max()),
         title=f'Approach 3: E={fit.E:.3f} A={fit.A:.3g} α={fit.alpha:.3f} B={fit.B:.3g} β={fit.beta:.3f}')
  _legend(ax)
  return _save(fig, path)


def approach3_residuals(fit: fits.ParametricFit, runs: fits.Runs, path: str) -> str:
  """Relative residual of each run against the parametric fit, by N and coloured by budget."""
  fig, ax = plt.subplots(figsize=(7, 4))
  budgets = np.unique(runs.budget)
  for c, color in zip(budgets, _colors(len(budgets))):
    sel = runs.budget == c
    resid = runs.loss[sel] / fit(runs.n[sel], runs.d[sel]) - 1
    ax.plot(runs.n[sel], 100 * resid, 'o-', color=color, label=f'C = {c:.2g}')
  ax.axhline(0, color='k', lw=0.8)
  ax.set(xscale='log', xlabel='N', ylabel='observed / predicted − 1 (%)', title='Approach 3 residuals')
  _legend(ax)
  return _save(fig, path)


def bootstrap_histograms(draws: dict[str, np.ndarray], estimates: dict[str, float], path: str,
                         level: float = 0.9) -> str:
  """One histogram per statistic with the point estimate and the central interval."""
  keys = list(draws)
  cols = min(len(keys), 3)
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    finite = draws[key][np.isfinite(draws[key])]
    ax.hist(finite, bins=30, color='0.6')
    lo, hi = fits.interval(draws[key], level)
    for v in (lo, hi):
      ax.axvline(v, color='b', ls='--')
    ax.axvline(estimates.get(key, np.nan), color='r')
    ax.set(title=f'{key}: {estimates.get(key, np.nan):.3f} [{lo:.3f}, {hi:.3f}]', xlabel=key)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  return _save(fig, path)


def lr_curves(check: dict[str, dict], path: str) -> str:
  """Final loss vs learning rate per checked model; ◆ = the rule's lr, ★ = the best."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for (label, g), color in zip(check.items(), _colors(len(check))):
    ax.plot(g['lr'], g['loss'], 'o-', color=color, label=f'{label} (C = {g["budget"]:.2g})')
    ax.axvline(g['rule_lr'], color=color, ls=':')
    ax.plot(g['lr'][int(np.argmin(g['loss']))], min(g['loss']), '*', color=color, ms=14)
  ax.set(xscale='log', xlabel='learning rate', ylabel='final eval loss',
         title='Learning-rate check (dotted = rule, ★ = best)')
  _legend(ax)
  return _save(fig, path)


def scaling_plots(workdir: str, runs: fits.Runs, result: dict, draws: dict[str, np.ndarray],
                  curves: dict) -> None:
  """Every figure of a scaling study, written into `workdir`."""
  fit = fits.ParametricFit(**{k: result['approach3'][k] for k in ('A', 'B', 'E', 'alpha', 'beta',
                                                                   'objective')})
  out = lambda name: os.path.join(workdir, name)
  isoflop_curves(runs, result['approach2'], out('isoflop_curves.png'))
  optimal_allocation(result['approach2'], fit, out('optimal_n_d.png'))
  loss_frontier(curves, result['approach1'], runs, result['frontier'], out('loss_frontier.png'))
  approach3_contours(fit, runs, out('approach3_contours.png'))
  approach3_residuals(fit, runs, out('approach3_residuals.png'))
  estimates = {'a': result['approach2']['a'], 'b': result['approach2']['b'], 'alpha': fit.alpha,
               'beta': fit.beta, 'a3': fit.a}
  bootstrap_histograms(draws, estimates, out('bootstrap.png'))
  if result['lr_check']:
    lr_curves(result['lr_check'], out('lr_check.png'))


# ---- hyperparameters vs compute (stage=hparams) -----------------------------------------------

def hparams_vs_compute(result: dict, draws: dict[str, np.ndarray], path: str) -> str:
  """lr_opt(C) and B_opt(C): each budget's optimum (● from the fitted surface, ○ the best trial's),
  the power law through the fitted budgets with its 90% bootstrap band, and the held-out optima
  (red) against their predictions (×)."""
  from experiments.studies import hparams
  budgets = np.array([o['budget'] for o in result['optima']])
  grid = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 60)
  held = set(result['holdout_budgets'])
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], 'lr', 'learning rate'), (axes[1], 'batch', 'batch (rows)')):
    law = result[f'{key}_opt']['law']
    lo, hi = hparams.band(draws, key, grid)
    ax.fill_between(grid, lo, hi, color='C0', alpha=0.2, label='90% bootstrap band')
    ax.plot(grid, law(grid), 'C0-', label=f'{key}_opt = {law.coef:.3g}·C^{law.exponent:.3f}')
    for o in result['optima']:
      color = 'r' if o['budget'] in held else 'C0'
      fitted = o['method'] == 'surface' or (key == 'lr' and o['method'] == 'surface_lr')
      ax.plot(o['budget'], o[f'{key}_opt'], 'o', color=color, mfc=color if fitted else 'none')
    for h in result['holdout']:
      ax.plot(h['budget'], h[f'predicted_{key}'], 'rx', ms=10,
              label=f'held out: predicted / observed = {h[f"{key}_ratio"]:.2f}')
    ax.set(xscale='log', yscale='log', xlabel='C (FLOPs)', ylabel=f'optimal {label}',
           title=f'{key}_opt vs compute (● fitted surface, ○ best trial)')
    _legend(ax)
  return _save(fig, path)


def hparams_loss_curves(trials: Any, result: dict, path: str) -> str:
  """Final loss vs lr, one panel per budget and one line per batch; ★ = best trial, dotted = lr_opt.
  `trials` is an experiments.studies.hparams.Trials."""
  cols = min(len(result['optima']), 3)
  rows = math.ceil(len(result['optima']) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
  batches = np.unique(trials.batch)
  for ax, o in zip(axes.flat, result['optima']):
    for b, color in zip(batches, _colors(len(batches))):
      sel = np.flatnonzero((trials.budget == o['budget']) & (trials.batch == b))
      sel = sel[np.argsort(trials.lr[sel])]
      ax.plot(trials.lr[sel], trials.loss[sel], 'o-', color=color, label=f'B = {b:g}')
    ax.axvline(o['lr_opt'], color='k', ls=':')
    ax.plot(o['best_lr'], o['best_loss'], 'k*', ms=12)
    held = ' (held out)' if o['budget'] in result['holdout_budgets'] else ''
    ax.set(xscale='log', xlabel='learning rate', ylabel=f'final {result["metric"]}',
           title=f'C = {o["budget"]:.2g}{held}: lr_opt {o["lr_opt"]:.2g}')
    _legend(ax)
  for ax in list(axes.flat)[len(result['optima']):]:
    ax.axis('off')
  return _save(fig, path)


def hparams_plots(workdir: str, trials: Any, result: dict, draws: dict[str, np.ndarray]) -> None:
  """Both figures of an hparams study, written into `workdir`."""
  hparams_vs_compute(result, draws, os.path.join(workdir, 'hparams_vs_compute.png'))
  hparams_loss_curves(trials, result, os.path.join(workdir, 'loss_vs_lr.png'))
