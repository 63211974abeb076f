"""Goodput: where a run's wall time went, each second charged to exactly one category.

Goodput is the share of wall time spent in train steps (dispatching them and waiting for their
metrics). The loop's host time is what is split: data loading counts as `data` even while the
device still runs the step before, so goodput is the host's view (a lower bound on how busy the
device was), and 1 - goodput is what compile, data, eval, checkpoints and the rest cost the run.
"""
import contextlib
import time
from typing import Callable, Iterator

# In the order they are printed; `startup` is set-up before the first batch, `restore` the
# checkpoint restore of a resumed run, `other` logging and bookkeeping.
CATEGORIES = ('step', 'compile', 'data', 'eval', 'checkpoint', 'profile', 'startup', 'restore',
              'other')


class Stopwatch:
  """One running category at a time: `switch` charges the time since the previous switch to the
  category that was running, so the categories always sum to the wall time since construction."""

  def __init__(self, category: str = 'startup', clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._seconds = dict.fromkeys(CATEGORIES, 0.0)
    self._category = self._check(category)
    self._since = clock()

  def _check(self, category: str) -> str:
    if category not in self._seconds:
      raise ValueError(f'unknown goodput category {category!r}; one of {", ".join(CATEGORIES)}')
    return category

  def switch(self, category: str) -> str:
    """Start charging `category`; returns the category that was running."""
    category = self._check(category)
    now = self._clock()
    self._seconds[self._category] += now - self._since
    previous, self._category, self._since = self._category, category, now
    return previous

  @contextlib.contextmanager
  def charge(self, category: str) -> Iterator[None]:
    """Charge the block to `category`, then go back to the category that was running."""
    previous = self.switch(category)
    try:
      yield
    finally:
      self.switch(previous)

  def seconds(self) -> dict[str, float]:
    """Seconds per category so far, the running one up to now."""
    out = dict(self._seconds)
    out[self._category] += self._clock() - self._since
    return out


def goodput_metrics(seconds: dict[str, float]) -> dict[str, float]:
  """`goodput` (step / wall), `time/wall` and `time/<category>` for every category."""
  wall = sum(seconds.values())
  return {'goodput': seconds.get('step', 0.0) / wall if wall > 0 else 0.0, 'time/wall': wall,
          **{f'time/{k}': v for k, v in seconds.items()}}


def goodput_line(seconds: dict[str, float]) -> str:
  """e.g. 'goodput 87.1% of 63.2 s: step 55.0 s, compile 4.1 s, ...' (categories never entered
  are left out)."""
  m = goodput_metrics(seconds)
  parts = ', '.join(f'{k} {v:.1f} s' for k, v in seconds.items() if v > 0)
  return f'goodput {100 * m["goodput"]:.1f}% of {m["time/wall"]:.1f} s: {parts}'
