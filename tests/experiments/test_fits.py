"""Scaling-law fits recover known constants from synthetic runs drawn from L(N, D) with noise."""
import numpy as np
import pytest

from experiments.studies import fits

TRUE = fits.ParametricFit(A=400.0, B=1500.0, E=1.0, alpha=0.35, beta=0.40, objective=0.0)
BUDGETS = (3e11, 6e11, 1.2e12, 2.4e12, 5e12)


def synthetic_runs(noise: float = 0.003, sizes: int = 5, seed: int = 0,
                   law: fits.ParametricFit = TRUE) -> fits.Runs:
  """An IsoFLOP design around the true optimum, with multiplicative log-normal noise on the loss."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in BUDGETS:
    for f in np.geomspace(1 / 3, 3, sizes):
      n = law.n_opt(c) * f
      d = c / (6 * n)
      rows.append((c, n, d, law(n, d) * np.exp(rng.normal(0, noise))))
  return fits.Runs(*np.array(rows).T)


def test_power_law_exact():
  x = np.geomspace(1, 1e4, 7)
  law = fits.fit_power_law(x, 3.0 * x ** -0.25)
  assert law.coef == pytest.approx(3.0) and law.exponent == pytest.approx(-0.25)
  assert law.r2 == pytest.approx(1.0)


def test_parabola_vertex_and_interior():
  n = np.geomspace(1e4, 1e6, 5)
  x = np.log(n)
  p = fits.fit_parabola(n, 0.1 * (x - np.log(1e5)) ** 2 + 2.0)
  assert p.convex and p.interior
  assert np.exp(p.x_min) == pytest.approx(1e5) and p.loss_min == pytest.approx(2.0)
  edge = fits.fit_parabola(n, 0.1 * (x - np.log(1e7)) ** 2)
  assert edge.convex and not edge.interior
  assert fits.fit_parabola(n[:2], np.ones(2)) is None


def test_objective_gradient_matches_finite_differences():
  runs = synthetic_runs()
  args = np.log(runs.n), np.log(runs.d), np.log(runs.loss)
  theta = np.array([6.0, 7.0, 0.1, 0.4, 0.45])
  value, grad = fits.approach3_objective(theta, *args)
  eps = 1e-6
  numeric = [(fits.approach3_objective(theta + eps * e, *args)[0] -
              fits.approach3_objective(theta - eps * e, *args)[0]) / (2 * eps) for e in np.eye(5)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_approach3_recovers_constants():
  fit = fits.approach3(synthetic_runs())
  assert fit.alpha == pytest.approx(TRUE.alpha, abs=0.03)
  assert fit.beta == pytest.approx(TRUE.beta, abs=0.03)
  assert fit.E == pytest.approx(TRUE.E, rel=0.1)
  assert fit.a == pytest.approx(TRUE.a, abs=0.02)
  c = 5e12
  assert fit.n_opt(c) == pytest.approx(TRUE.n_opt(c), rel=0.15)


def test_approach3_noiseless_is_exact():
  fit = fits.approach3(synthetic_runs(noise=0.0))
  for got, want in ((fit.alpha, TRUE.alpha), (fit.beta, TRUE.beta), (fit.E, TRUE.E)):
    assert got == pytest.approx(want, rel=1e-3)


def test_approach2_recovers_exponents():
  out = fits.approach2(synthetic_runs())
  assert all(b['usable'] for b in out['budgets'])
  assert out['n_opt'].exponent == pytest.approx(TRUE.a, abs=0.03)
  assert out['d_opt'].exponent == pytest.approx(TRUE.b, abs=0.03)
  assert out['n_opt'](5e12) == pytest.approx(TRUE.n_opt(5e12), rel=0.1)


def test_frontier_and_holdout():
  runs = synthetic_runs()
  assert fits.frontier(runs).r2 > 0.99
  hold = fits.holdout(runs)
  assert hold['loss_rel_error'] < 0.03
  assert hold['n_opt_factor'] < 1.2


def test_bootstrap_interval_covers_truth():
  runs = synthetic_runs()
  warm = fits.theta(fits.approach3(runs))
  draws = fits.bootstrap(runs, lambda r: {'a': fits.approach2(r)['n_opt'].exponent,
                                          'alpha': fits.approach3(r, 2, [warm]).alpha}, 30, seed=1)
  lo, hi = fits.interval(draws['a'])
  assert lo - 0.02 <= TRUE.a <= hi + 0.02 and hi - lo < 0.2
  lo, hi = fits.interval(draws['alpha'])
  assert lo - 0.02 <= TRUE.alpha <= hi + 0.02


def test_resample_keeps_budget_sizes():
  runs = synthetic_runs()
  index = fits.resample_within_budgets(runs, np.random.default_rng(0))
  for c in BUDGETS:
    assert (runs.budget[index] == c).sum() == (runs.budget == c).sum()


def test_loss_envelope_picks_lowest_curve():
  flops = np.geomspace(1e9, 1e12, 20)
  small = (flops, 3.0 - 0.1 * np.log10(flops))
  large = (flops[5:], 3.2 - 0.15 * np.log10(flops[5:]))
  loss, size = fits.loss_envelope([small, large], np.array([1.0, 2.0]), np.array([5e8, 1e9, 1e12]))
  assert np.isnan(loss[0]) and size[1] == 1.0
  assert size[2] == 2.0 and loss[2] == pytest.approx(3.2 - 1.8)


def test_smooth_is_a_trailing_mean_in_log_x():
  x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
  np.testing.assert_allclose(fits.smooth(x, [1.0, 3.0, 5.0, 7.0, 9.0], 2.0), [1, 2, 4, 5, 9])
