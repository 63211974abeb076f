"""One writer per workdir: a second run is refused at once with one line naming the first; a
SIGKILLed holder leaves no stale lock."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from model.errors import UserError
from tests.faults import runs
from tests.test_run import ROOT, one_line_error
from train.workdir import WorkdirLock

HOLD = ('import sys, time; from train.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[1]); '
        'print("locked", flush=True); time.sleep(120)')


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
  child = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                           text=True, env={**os.environ, 'PYTHONPATH': ROOT})
  try:
    assert child.stdout.readline().strip() == 'locked'
    with pytest.raises(UserError, match=rf'in use by pid {child.pid} on host .*another --workdir'):
      WorkdirLock(str(tmp_path))
  finally:
    child.kill()
    child.wait()
  started = time.perf_counter()
  with WorkdirLock(str(tmp_path)):  # the killed holder's lock went with it
    assert time.perf_counter() - started < 0.1
    with pytest.raises(UserError, match=rf'pid {os.getpid()}'):  # and it excludes this process too
      WorkdirLock(str(tmp_path))
  WorkdirLock(str(tmp_path)).release()  # released on exit


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_the_first_is_unharmed(tmp_path, reference):
  work = tmp_path / 'w'
  first = runs.start(work)
  lock = work / '.lock'
  runs.wait_until(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text(), first)
  started = time.perf_counter()
  second = runs.run(work)
  elapsed = time.perf_counter() - started
  line = one_line_error(second, f'in use by pid {first.pid}', 'wait', 'another --workdir')
  print(f'second run refused after {elapsed:.2f} s: {line}')
  assert elapsed < 10
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert runs.losses_once(work) == runs.losses_once(reference)
  assert runs.committed(work) == runs.committed(reference)
  for step in runs.committed(reference):
    want, got = (runs.saved_arrays(d / 'checkpoints' / str(step)) for d in (reference, work))
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
