"""IsoFLOP scaling studies, the plan: the runs a model ladder and compute budgets call for.

N is counted as training FLOPs per token ÷ 6 (train/metrics.py: every matmul including the output
head, plus causal attention), so a run of D tokens costs exactly C = 6·N·D. Each budget trains the
`sizes_per_budget` consecutive ladder models centred on N* = sqrt(C / (6·tokens_per_param)); the
batch shrinks at small budgets so every run takes at least `min_steps` optimizer steps (shorter runs
sit on a plateau and bend the large-model side of each curve), warmup is a fraction of the run, and
the learning rate follows a per-width rule (standard parameterization moves the optimum with width).
WSD studies (`plan_wsd`) branch each point's cooldown off one constant-lr run per size.
"""
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

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
