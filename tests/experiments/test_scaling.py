"""IsoFLOP planning: every run spends its budget, N counts what the step computes (checked against XLA)."""
import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from experiments import scaling_cpu, scaling_smoke
from experiments.studies import planning
from model.config import model_config
from model.errors import UserError
from train.step import make_train_step
from train.trainer import init_trainer
from train.metrics import flops_per_token, matmul_params
from train.objectives import causal_lm_loss

BYTE_VOCAB = 259


def with_overrides(c: ConfigDict, overrides: dict) -> ConfigDict:
  c = ConfigDict(c.to_dict())
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


@pytest.mark.parametrize('get_config', [scaling_cpu.get_config, scaling_smoke.get_config])
def test_planned_runs_spend_their_budget(get_config):
  """The FLOPs a trial's own config implies (steps × batch × seq_len × FLOPs/token) are within 1%."""
  c = get_config()
  runs = planning.plan(c, BYTE_VOCAB)
  for run in runs:
    trial = with_overrides(c, run.overrides())
    t = trial.train
    achieved = t.steps * t.batch_size * t.seq_len * flops_per_token(
        model_config(trial.model, BYTE_VOCAB, t.seq_len), t.seq_len)
    assert abs(achieved / run.budget - 1) <= 0.01, run.name
    assert achieved == pytest.approx(run.flops)


def test_scaling_cpu_design():
  """Acceptance 1's design: 5 budgets over >= 1.2 decades, 4-6 sizes each, >= ~1000 steps."""
  c = scaling_cpu.get_config()
  runs = [r for r in planning.plan(c, BYTE_VOCAB) if r.role == 'isoflop']
  budgets = sorted({r.budget for r in runs})
  assert len(budgets) == 5 and budgets[-1] / budgets[0] >= 10 ** 1.2
  for b in budgets:
    assert 4 <= sum(r.budget == b for r in runs) <= 6
  assert min(r.steps for r in runs) >= 0.9 * c.scaling.min_steps


def test_n_counts_head_and_attention():
  c = scaling_cpu.get_config()
  cost = planning.shape_cost(c, planning.Shape(2, 64, 4), BYTE_VOCAB)
  mcfg = model_config(with_overrides(c, {'model.n_layers': 2, 'model.d_model': 64, 'model.n_heads': 4}).model,
                      BYTE_VOCAB, c.train.seq_len)
  head = 64 * BYTE_VOCAB
  attention = 2 * c.train.seq_len * 64  # 12·L·T·d / 2 (causal) / 6
  assert cost.n == pytest.approx(matmul_params(mcfg) + attention)
  assert matmul_params(mcfg) == cost.params_non_embedding - 64 * 5 + head  # norms are not matmuls
  assert cost.params == cost.params_non_embedding + head  # tied: the embedding counted once


def test_batch_rule_keeps_min_steps():
  s = scaling_cpu.get_config().scaling
  for tokens in (3e5, 1e6, 4e6, 2e7):
    batch, steps = planning.batch_and_steps(tokens, 128, s)
    assert s.min_batch <= batch <= s.max_batch and batch & (batch - 1) == 0
    assert steps >= s.min_steps or batch == s.min_batch
    assert steps < 2 * s.min_steps or batch == s.max_batch


def test_window_is_centred_and_consecutive():
  c = scaling_cpu.get_config()
  costs = sorted((planning.shape_cost(c, sh, BYTE_VOCAB) for sh in planning.parse_ladder(c.scaling.ladder, 16)),
                 key=lambda x: x.n)
  for budget in c.scaling.budgets:
    chosen = planning.window(costs, budget, c.scaling)
    i = costs.index(chosen[0])
    assert chosen == costs[i:i + len(chosen)]
    target = (budget / (6 * c.scaling.tokens_per_param)) ** 0.5
    assert chosen[0].n <= target <= chosen[-1].n


@pytest.mark.parametrize('spec', ['2x64,3', '2x60', ''])
def test_bad_ladder_is_a_user_error(spec):
  with pytest.raises(UserError, match='scaling.ladder'):
    planning.parse_ladder(spec, 16)


def test_tiny_budget_is_a_user_error():
  c = scaling_smoke.get_config()
  c.scaling.budgets = (1e8, 2e8)
  with pytest.raises(UserError, match='budget'):
    planning.plan(c, BYTE_VOCAB)


@pytest.mark.parametrize('layers,width', [(1, 32), (4, 128)])
def test_analytic_flops_match_xla(layers, width):
  """XLA's count of a compiled train step vs 6·N_matmul + 12·L·T·d for the ends of the CPU ladder.
  Our einsum attention computes the full T×T scores, so compare with the un-halved attention term;
  XLA also counts elementwise work (norms, softmax, optimizer), so it lands a few percent above."""
  c = scaling_cpu.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads = layers, width, width // 16
  c.train.batch_size = 8
  seq_len = c.train.seq_len
  trainer = init_trainer(c, BYTE_VOCAB, devices=jax.devices()[:1])
  step = make_train_step(trainer, causal_lm_loss)
  spec = lambda dtype: jax.ShapeDtypeStruct((8, seq_len), dtype)
  batch = {k: spec(jnp.int32) for k in ('inputs', 'targets', 'positions', 'segment_ids')}
  batch['weights'] = spec(jnp.float32)
  with jax.set_mesh(trainer.mesh):
    cost = step.lower(trainer.state, batch, jax.random.PRNGKey(0)).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)['flops']
  analytic = flops_per_token(trainer.model_cfg, seq_len, causal=False) * 8 * seq_len
  assert 1.0 <= xla / analytic <= 1.15
