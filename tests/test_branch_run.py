"""A WSD cooldown branched off a constant-lr run (train.branch_from) is the full WSD run: the same
loss at every step after the branch point, bit for bit on CPU."""
import pytest

from tests.test_run import losses, one_line_error, run

SCHEDULE = ['--config.train.warmup_steps=2', '--config.checkpoint.every_steps=6',
            '--config.checkpoint.async_save=false', '--config.eval.every_steps=0']
COOLDOWN = ['--config.train.steps=10', '--config.train.schedule=wsd',
            '--config.train.decay_steps=4', '--config.train.decay_shape=sqrt']


def test_cooldown_branch_equals_the_full_wsd_run(tmp_path):
  stable, branch, fresh = (tmp_path / n for n in ('stable', 'branch', 'fresh'))
  out = {}
  at_six = ['--config.checkpoint.every_steps=0', '--config.checkpoint.at_steps=(6,)']  # a WSD study's stable run
  for workdir, flags in ((stable, ['--config.train.steps=12', '--config.train.schedule=constant', *at_six]),
                         (branch, [*COOLDOWN, f'--config.train.branch_from={stable}:6']),
                         (fresh, COOLDOWN)):
    out[workdir] = run(workdir, *SCHEDULE, *flags)
    assert out[workdir].returncode == 0, out[workdir].stderr[-3000:]
  assert f'resumed from {branch}/checkpoints/6' in out[branch].stdout
  full = losses(fresh)
  assert {s: losses(stable)[s] for s in range(1, 7)} == {s: full[s] for s in range(1, 7)}
  assert losses(branch) == {s: full[s] for s in range(7, 11)}  # the cooldown, from step 6 on


def test_branch_from_a_missing_step_is_one_line(tmp_path):
  result = run(tmp_path / 'b', '--config.train.steps=10', f'--config.train.branch_from={tmp_path}:6')
  one_line_error(result, 'train.branch_from', 'no finished checkpoint')


def test_wsd_cooldown_shapes():
  import math

  from tests.helpers import tiny_config
  from train.state import lr_schedule
  t = tiny_config().train
  t.lr, t.min_lr_ratio, t.warmup_steps, t.steps, t.schedule, t.decay_steps = 1.0, 0.1, 2, 12, 'wsd', 4
  for shape, mid in (('linear', 0.55), ('sqrt', 0.1 + 0.9 * (1 - math.sqrt(0.5)))):
    t.decay_shape = shape
    lr = lr_schedule(t)
    assert [float(lr(s)) for s in (1, 2, 7, 8)] == [0.5, 1.0, 1.0, 1.0]  # warmup, then stable
    assert float(lr(10)) == pytest.approx(mid) and float(lr(12)) == pytest.approx(0.1)
