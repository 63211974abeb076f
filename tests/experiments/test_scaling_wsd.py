"""WSD cooldown planning: each point is a cooldown that agrees with its size's stable run up to the
branch point, spends its budget, and the study costs less than the same points trained one by one."""
import json

import pytest

from experiments import scaling_wsd_cpu, scaling_wsd_smoke
from experiments.studies import planning, scaling
from model.errors import UserError
from tests.experiments.test_scaling import BYTE_VOCAB, with_overrides
from train.metrics import flops_per_token
from model.config import model_config


@pytest.mark.parametrize('get_config', [scaling_wsd_cpu.get_config, scaling_wsd_smoke.get_config])
def test_cooldowns_branch_off_their_stable_run(get_config):
  c = get_config()
  stables, cooldowns = planning.plan_wsd(c, BYTE_VOCAB)
  by_name = {s.name: s for s in stables}
  isoflop = {(r.budget, r.cost.shape) for r in planning.plan(c, BYTE_VOCAB) if r.role == 'isoflop'}
  assert {(r.budget, r.cost.shape) for r in cooldowns} == isoflop  # the same points
  for r in cooldowns:
    stable = by_name[r.stable]
    mine, theirs = r.overrides(), stable.overrides()
    shared = ('model.n_layers', 'model.d_model', 'model.n_heads', 'train.batch_size',
              'train.warmup_steps', 'train.lr')
    assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}, r.name
    assert r.branch_step in theirs['checkpoint.at_steps'] and r.branch_step <= stable.steps
    assert mine['train.decay_steps'] == r.steps - r.branch_step
    assert abs(mine['train.decay_steps'] / r.steps - c.scaling.cooldown_fraction) < 0.01
    trial = with_overrides(c, mine)  # the trial's own config spends the point's budget
    t = trial.train
    fpt = flops_per_token(model_config(trial.model, BYTE_VOCAB, t.seq_len), t.seq_len)
    assert abs(t.steps * t.batch_size * t.seq_len * fpt / r.budget - 1) <= 0.01, r.name
  for s in stables:  # a stable run ends at its last branch point and keeps every branch point
    assert s.steps == max(s.branch_steps)
    assert s.overrides()['checkpoint.keep'] >= len(s.branch_steps)
  summary = planning.compute_summary(stables, cooldowns)
  assert summary['one_run_per_point_flops'] == pytest.approx(sum(r.flops for r in cooldowns))
  assert summary['ratio'] < 0.75


def test_bad_cooldown_is_a_user_error():
  c = scaling_wsd_smoke.get_config()
  c.scaling.cooldown_shape = 'cosine'
  with pytest.raises(UserError, match='cooldown_shape'):
    planning.plan_wsd(c, BYTE_VOCAB)
  c.scaling.cooldown_shape, c.scaling.cooldown_fraction = 'sqrt', 0.99
  with pytest.raises(UserError, match='cooldown_fraction'):
    planning.plan_wsd(c, BYTE_VOCAB)


def test_a_cooldown_curve_starts_in_its_stable_run(tmp_path):
  """Approach 1 reads a cooldown's train loss from its stable run up to the branch point."""
  for name, steps in (('stable', range(1, 11)), ('cool', range(7, 13))):
    (tmp_path / name).mkdir()
    with open(tmp_path / name / 'metrics.jsonl', 'w') as f:
      for s in steps:
        f.write(json.dumps({'step': s, 'loss': 10.0 - s + (0.5 if name == 'stable' else 0.0),
                            'flops': 100.0 * s}) + '\n')
  rows = [{'name': 'cool', 'role': 'isoflop', 'state': 'finished', 'n_flops': 1.0,
           'stable': 'stable', 'branch_step': 6}]
  curves = scaling.train_curves(rows, {'stable': str(tmp_path / 'stable'), 'cool': str(tmp_path / 'cool')})
  _, flops, _ = curves['cool']
  assert flops.tolist() == [100.0 * s for s in range(1, 13)]
