"""IsoFLOP scaling studies: plan runs from a model ladder and compute budgets, then fit them.

N is counted as training FLOPs per token ÷ 6 (train/metrics.py: every matmul including the output
head, plus causal attention), so a run of D tokens costs exactly C = 6·N·D. Each budget trains the
`sizes_per_budget` consecutive ladder models centred on N* = sqrt(C / (6·tokens_per_param)); the
batch shrinks at small budgets so every run takes at least `min_steps` optimizer steps (shorter runs
sit on a plateau and bend the large-model side of each curve), warmup is a fraction of the run, and
the learning rate follows a per-width rule (standard parameterization moves the optimum with width).
"""
import csv
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from experiments.studies import fits, sweep
from model.config import model_config
from model.errors import UserError
from model.transformer import build_model
from train.metrics import flops_per_token

EMBEDDING_PARAMS = ('embed', 'pos_embed')  # top-level parameter collections that are lookups


@dataclasses.dataclass(frozen=True)
class Shape:
  n_layers: int
  d_model: int
  n_heads: int

  @property
  def label(self) -> str:
    return f'{self.n_layers}x{self.d_model}'


@dataclasses.dataclass(frozen=True)
class ShapeCost:
  """What one ladder model costs: FLOPs per token (N = that ÷ 6) and two parameter counts."""
  shape: Shape
  flops_per_token: float
  params: int
  params_non_embedding: int

  @property
  def n(self) -> float:
    return self.flops_per_token / 6


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  name: str
  role: str                 # isoflop | lr_check
  budget: float             # the compute budget C this run belongs to
  cost: ShapeCost
  batch_size: int
  steps: int
  warmup_steps: int
  lr: float
  seq_len: int
  branch_step: int = 0      # wsd: the cooldown starts from the stable run's checkpoint at this step
  stable: str = ''          # wsd: that stable run's name
  decay_shape: str = 'linear'

  @property
  def tokens(self) -> int:
    return self.steps * self.batch_size * self.seq_len

  @property
  def flops(self) -> float:
    """FLOPs of the whole run (steps are whole numbers, so not exactly the budget); a cooldown
    counts its stable part too: this is what the run would cost trained on its own."""
    return self.tokens * self.cost.flops_per_token

  @property
  def own_flops(self) -> float:
    """FLOPs this run spends itself: a cooldown only its steps after the branch point."""
    return (self.steps - self.branch_step) * self.batch_size * self.seq_len * self.cost.flops_per_token

  def overrides(self) -> dict:
    out = run_overrides(self)
    if self.branch_step:  # train.branch_from names the stable run's folder: the stage adds it
      out.update({'train.schedule': 'wsd', 'train.decay_steps': self.steps - self.branch_step,
                  'train.decay_shape': self.decay_shape})
    return out

  def row(self) -> dict:
    """The plan as a CSV row."""
    return run_row(self, self.role, self.budget, self.flops, self.branch_step, self.stable)


@dataclasses.dataclass(frozen=True)
class StableRun:
  """WSD: one constant-lr run per model size, saving a checkpoint at each of its cooldowns' branch
  points; it ends at the last one (its own loss is never fitted: it has not cooled down)."""
  name: str
  cost: ShapeCost
  batch_size: int
  warmup_steps: int
  lr: float
  seq_len: int
  branch_steps: tuple[int, ...]

  @property
  def steps(self) -> int:
    return max(self.branch_steps)

  @property
  def tokens(self) -> int:
    return self.steps * self.batch_size * self.seq_len

  @property
  def own_flops(self) -> float:
    return self.tokens * self.cost.flops_per_token

  def overrides(self) -> dict:
    return {**run_overrides(self), 'train.schedule': 'constant', 'eval.every_steps': 0,
            'checkpoint.every_steps': 0, 'checkpoint.at_steps': self.branch_steps,
            'checkpoint.keep': len(self.branch_steps)}

  def row(self) -> dict:
    return run_row(self, 'stable', '', self.own_flops, '', '')


def run_overrides(run: PlannedRun | StableRun) -> dict:
  """The model shape and training settings every planned run gives its trial."""
  s = run.cost.shape
  return {'model.n_layers': s.n_layers, 'model.d_model': s.d_model, 'model.n_heads': s.n_heads,
          'train.batch_size': run.batch_size, 'train.steps': run.steps,
          'train.warmup_steps': run.warmup_steps, 'train.lr': run.lr}


def run_row(run: PlannedRun | StableRun, role: str, budget: float | str, flops: float,
            branch_step: int | str, stable: str) -> dict:
  """A planned run as a CSV row (runs.csv); a stable run leaves budget and branch cells empty."""
  s = run.cost.shape
  return {'name': run.name, 'role': role, 'budget': budget, 'n_layers': s.n_layers,
          'd_model': s.d_model, 'n_heads': s.n_heads, 'n_flops': run.cost.n,
          'params': run.cost.params, 'params_non_embedding': run.cost.params_non_embedding,
          'batch_size': run.batch_size, 'steps': run.steps, 'warmup_steps': run.warmup_steps,
          'lr': run.lr, 'tokens': run.tokens, 'flops': flops, 'own_flops': run.own_flops,
          'branch_step': branch_step, 'stable': stable}


def parse_ladder(spec: str, head_dim: int) -> list[Shape]:
  """'2x64,3x96' -> shapes (n_layers x d_model) with d_model / head_dim heads."""
  shapes = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    m = re.fullmatch(r'(\d+)x(\d+)', item)
    if not m:
      raise UserError(f'scaling.ladder entry {item!r} is not LAYERSxWIDTH; write e.g. "2x64,3x96"')
    layers, width = int(m[1]), int(m[2])
    if head_dim <= 0 or width % head_dim:
      raise UserError(f'scaling.ladder width {width} is not a multiple of scaling.head_dim={head_dim}; '
                      'change one of them')
    shapes.append(Shape(layers, width, width // head_dim))
  if not shapes:
    raise UserError('scaling.ladder is empty; list models as "2x64,3x96,..."')
  return shapes


def shape_cost(cfg: ConfigDict, shape: Shape, vocab_size: int) -> ShapeCost:
  """Analytic FLOPs per token, and parameter counts from the model's abstract init (no compute)."""
  m = ConfigDict(cfg.model.to_dict())
  m.n_layers, m.d_model, m.n_heads = shape.n_layers, shape.d_model, shape.n_heads
  mcfg = model_config(m, vocab_size, cfg.train.seq_len)
  tokens = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
  params = jax.eval_shape(lambda: build_model(mcfg).init(jax.random.PRNGKey(0), tokens))['params']
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))
  embedding = sum(size(params[k]) for k in EMBEDDING_PARAMS if k in params)
  total = size(params)
  return ShapeCost(shape, flops_per_token(mcfg, cfg.train.seq_len), total, total - embedding)


def batch_and_steps(tokens: float, seq_len: int, s: ConfigDict) -> tuple[int, int]:
  """The largest power-of-two batch in [min_batch, max_batch] that still gives min_steps steps."""
  batch = s.max_batch
  while batch > s.min_batch and tokens / (batch * seq_len) < s.min_steps:
    batch //= 2
  batch = max(batch, s.min_batch)
  return batch, max(round(tokens / (batch * seq_len)), 1)


def lr_for(width: int, batch: int, s: ConfigDict) -> float:
  """lr · (lr_width / width)^lr_exponent · (batch / lr_batch)^lr_batch_exponent: standard
  parameterization wants smaller rates for wider models, and Adam smaller ones for smaller batches."""
  return s.lr * (s.lr_width / width) ** s.lr_exponent * (batch / s.lr_batch) ** s.lr_batch_exponent


def window(costs: list[ShapeCost], budget: float, s: ConfigDict) -> list[ShapeCost]:
  """The `sizes_per_budget` consecutive ladder models whose mean ln N is closest to ln N*."""
  target = 0.5 * math.log(budget / (6 * s.tokens_per_param))
  k = min(s.sizes_per_budget, len(costs))
  starts = range(len(costs) - k + 1)
  best = min(starts, key=lambda i: abs(np.mean([math.log(c.n) for c in costs[i:i + k]]) - target))
  return costs[best:best + k]


def run_name(budget: float, shape: Shape, lr_multiplier: float = 1.0) -> str:
  name = f'C{budget:.3g}_{shape.label}'.replace('+', '')
  return name if lr_multiplier == 1.0 else f'{name}_lrx{lr_multiplier:g}'


def sized_run(name: str, role: str, budget: float, cost: ShapeCost, batch: int, s: ConfigDict,
              seq_len: int, lr_multiplier: float = 1.0) -> PlannedRun:
  """The run that spends `budget` in whole steps of `batch` rows: warmup a `warmup_fraction` of
  them, lr the rule's at this width and batch times `lr_multiplier`. Unchecked: callers say what
  to fix when the steps round too far from the budget."""
  steps = max(round(budget / (cost.flops_per_token * batch * seq_len)), 1)
  return PlannedRun(name, role, budget, cost, batch, steps, max(round(s.warmup_fraction * steps), 1),
                    lr_for(cost.shape.d_model, batch, s) * lr_multiplier, seq_len)


def plan_run(budget: float, cost: ShapeCost, s: ConfigDict, seq_len: int, role: str = 'isoflop',
             lr_multiplier: float = 1.0, batch: int = 0) -> PlannedRun:
  """Steps and batch (the batch rule's unless given) that spend `budget` within 1% (else a
  UserError naming the fix)."""
  batch = batch or batch_and_steps(budget / cost.flops_per_token, seq_len, s)[0]
  run = sized_run(run_name(budget, cost.shape, lr_multiplier), role, budget, cost, batch, s, seq_len,
                  lr_multiplier)
  if abs(run.flops / budget - 1) > 0.01:
    raise UserError(f'{run.name} can only spend {run.flops:.3g} FLOPs of its {budget:.3g} budget '
                    f'({run.steps} steps of {batch}x{seq_len} tokens); raise the budget or lower '
                    'scaling.min_batch')
  return run


def plan(cfg: ConfigDict, vocab_size: int) -> list[PlannedRun]:
  """IsoFLOP runs for every budget, then the learning-rate check (extra multipliers of the rule for
  the smallest and largest model of the smallest budget)."""
  s = cfg.scaling
  budgets = sorted(float(b) for b in s.budgets)
  if len(budgets) < 2 or s.sizes_per_budget < 3:
    raise UserError(f'a scaling study needs >= 2 scaling.budgets (got {len(budgets)}) and '
                    f'scaling.sizes_per_budget >= 3 (got {s.sizes_per_budget}) to fit parabolas')
  costs = sorted((shape_cost(cfg, shape, vocab_size) for shape in parse_ladder(s.ladder, s.head_dim)),
                 key=lambda c: c.n)
  seq_len = cfg.train.seq_len
  runs = [plan_run(c, cost, s, seq_len) for c in budgets for cost in window(costs, c, s)]
  first = window(costs, budgets[0], s)
  for cost in dict.fromkeys([first[0], first[-1]]):
    runs += [plan_run(budgets[0], cost, s, seq_len, 'lr_check', m) for m in s.lr_check if m != 1.0]
  return runs


def plan_wsd(cfg: ConfigDict, vocab_size: int) -> tuple[list[StableRun], list[PlannedRun]]:
  """WSD cooldown branching (Hägele et al. 2024): the same IsoFLOP points as `plan`, but each model
  size trains once at constant lr, and each point is a cooldown of `scaling.cooldown_fraction` of
  its steps branched off that run. A size keeps one batch (the batch rule's at its smallest budget)
  and one warmup, so every branch agrees with its stable run up to the branch point."""
  s = cfg.scaling
  if s.cooldown_shape not in ('linear', 'sqrt'):
    raise UserError(f'scaling.cooldown_shape={s.cooldown_shape!r} is not one of linear, sqrt')
  runs = plan(cfg, vocab_size)
  by_size: dict[Shape, list[PlannedRun]] = {}
  for r in runs:
    if r.role == 'isoflop':
      by_size.setdefault(r.cost.shape, []).append(r)
  stables, cooldowns = [], []
  for shape, points in by_size.items():
    points.sort(key=lambda r: r.budget)
    first = points[0]
    name = f'stable_{shape.label}'
    branched = []
    for p in points:
      run = plan_run(p.budget, p.cost, s, p.seq_len, batch=first.batch_size)
      branch = round((1 - s.cooldown_fraction) * run.steps)
      if branch <= first.warmup_steps or branch >= run.steps:
        raise UserError(f'{run.name}: a cooldown of {s.cooldown_fraction:g} of {run.steps} steps '
                        f'leaves no stable phase after the {first.warmup_steps} warmup steps (or no '
                        'cooldown); change scaling.cooldown_fraction or raise scaling.min_steps')
      branched.append(dataclasses.replace(run, warmup_steps=first.warmup_steps, lr=first.lr,
                                          branch_step=branch, stable=name,
                                          decay_shape=s.cooldown_shape))
    stables.append(StableRun(name, first.cost, first.batch_size, first.warmup_steps, first.lr,
                             first.seq_len, tuple(r.branch_step for r in branched)))
    cooldowns += branched
  return stables, cooldowns


def compute_summary(stables: list[StableRun], cooldowns: list[PlannedRun]) -> dict[str, float]:
  """FLOPs the WSD study spends against the same points trained one run each."""
  used = sum(r.own_flops for r in stables) + sum(r.own_flops for r in cooldowns)
  separate = sum(r.flops for r in cooldowns)
  return {'wsd_flops': used, 'one_run_per_point_flops': separate, 'ratio': used / separate}


# ---- analysis -----------------------------------------------------------------------------------

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
