import pytest

from tests.faults import runs


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
  """One uninterrupted run, alone on its workdir: what every faulted run must reproduce."""
  work = tmp_path_factory.mktemp('faults') / 'reference'
  result = runs.run(work)
  assert result.returncode == 0, result.stderr
  return work
