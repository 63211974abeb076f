"""Checkpoints under faults: SIGKILL during async saves, a full disk, a different model shape."""
import os
import random
import shutil
import subprocess
import time

import pytest

from tests.faults import runs
from tests.test_run import one_line_error

KILLS = 5


@pytest.mark.slow
def test_sigkill_during_async_saves_resumes_bit_identically(tmp_path, reference):
  """Kill at 5 pseudo-random moments, each during an async save (after the 1st or 2nd save the run
  starts, plus 0-40 ms); every restart resumes from the newest complete checkpoint, takes the
  workdir lock at once, and the finished run's per-step losses equal the uninterrupted run's."""
  work, rng = tmp_path / 'w', random.Random(19)
  mid_save = 0
  for kill in range(KILLS):
    before_start, stale = runs.committed(work), set(runs.in_flight(work))
    proc = runs.start(work)
    seen: set[str] = set()

    def saves_seen(n=rng.randint(1, 2)) -> bool:
      """n saves of this run seen in flight (after its manager deleted the killed run's folder)."""
      now = set(runs.in_flight(work))
      if stale:
        stale.intersection_update(now)
      else:
        seen.update(now)
      return len(seen) >= n
    runs.wait_until(saves_seen, proc)
    time.sleep(rng.uniform(0, 0.04))
    before_kill = runs.committed(work)
    mid_save += bool(runs.in_flight(work))
    proc.kill()
    out, _ = proc.communicate()
    after_kill = runs.committed(work)
    assert len(after_kill) >= len(before_kill) and max(after_kill, default=0) >= max(before_kill, default=0)
    if before_start:  # it resumed from the newest complete checkpoint there was
      assert f'resumed from {work}/checkpoints/{before_start[-1]}' in out, out
    runs.losses_once(work)  # parses line by line, each step at most once
  final = runs.run(work)
  assert final.returncode == 0, final.stderr
  print(f'{KILLS} kills, {mid_save} with a save folder in flight at the kill; committed {runs.committed(work)}')
  assert mid_save >= KILLS // 2
  assert runs.losses_once(work) == runs.losses_once(reference)
  assert runs.committed(work) == runs.committed(reference)


def mount_tmpfs(path, size: str) -> None:
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f'cannot mount a size-limited tmpfs here ({result.stderr.strip()}); needs root')


@pytest.mark.slow
def test_disk_full_during_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, reference):
  """A 512 KiB tmpfs holds one ~320 KiB checkpoint of the tiny model but not two: the second save
  fails; after freeing space (a bigger remount) the same command resumes and matches the reference."""
  disk = tmp_path / 'disk'
  mount_tmpfs(disk, '512k')
  try:
    work = disk / 'w'
    started = time.perf_counter()
    full = runs.run(work)
    line = one_line_error(full, 'disk is full')
    print(f'disk full after {time.perf_counter() - started:.1f} s: {line}')
    kept = runs.committed(work)
    assert kept == [2]
    runs.losses_once(work)
    subprocess.run(['mount', '-o', 'remount,size=8m', str(disk)], check=True)
    resumed = runs.run(work)
    assert resumed.returncode == 0, resumed.stderr
    assert f'resumed from {work}/checkpoints/2' in resumed.stdout
    assert not runs.in_flight(work)  # the failed save's folder was cleaned up
    assert runs.losses_once(work) == runs.losses_once(reference)  # restored bit-exactly
  finally:
    subprocess.run(['umount', '-l', str(disk)])


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused_naming_the_parameter(tmp_path, reference):
  work = tmp_path / 'w'
  shutil.copytree(reference, work)
  result = runs.run(work, '--config.train.steps=70', '--config.model.d_model=48')
  one_line_error(result, 'different model', 'mis-shaped params.', 'checkpoint (', 'model (')
  assert runs.committed(work) == runs.committed(reference)
