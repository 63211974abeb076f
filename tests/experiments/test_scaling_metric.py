"""A scaling study fits any named final metric (scaling.metric), e.g. a task's bits per byte."""
import numpy as np
import pytest

from experiments.studies import scaling
from model.errors import UserError

ROWS = [{'name': f'r{i}', 'role': 'isoflop', 'state': 'finished', 'budget': 1e12, 'n_flops': 10.0 * i,
         'tokens': 100.0, 'eval_loss': 2.0 + i, 'eval/web/bpb': 1.0 + i} for i in range(3)]


def test_runs_for_reads_the_named_metric():
  assert np.array_equal(scaling.runs_for(ROWS, 'n_flops', 'eval/web/bpb').loss, [1.0, 2.0, 3.0])
  assert np.array_equal(scaling.runs_for(ROWS, 'n_flops').loss, [2.0, 3.0, 4.0])


def test_a_metric_the_runs_did_not_log_is_one_line():
  with pytest.raises(UserError, match="scaling.metric='eval/nope/bpb' is not in the final metrics of r0"):
    scaling.runs_for(ROWS, 'n_flops', 'eval/nope/bpb')
