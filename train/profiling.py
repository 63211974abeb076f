"""One jax.profiler trace window over a few train steps (config.profile), and its top XLA ops.

The trace goes to WORKDIR/profile in TensorBoard's layout: plugins/profile/<run>/<host>.xplane.pb
(what TensorBoard's profile plugin and XProf open), <host>.trace.json.gz (the trace viewer's events)
and perfetto_trace.json.gz (for ui.perfetto.dev). Every process traces; only process 0 prints. A
profiler failure never stops the run: it is one warning line and training goes on.
"""
import contextlib
import dataclasses
import gzip
import json
import os
import socket
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

OpTimes = dict[str, tuple[float, int]]  # op name -> (total self time in µs, executions)


def trace_events(path: str) -> list[dict]:
  """The events of a trace viewer file (`*.trace.json.gz`, Chrome trace format, times in µs)."""
  with gzip.open(path, 'rt') as f:
    return json.load(f)['traceEvents']


def op_events(events: list[dict]) -> list[dict]:
  """The events that are executions of compiled XLA ops.

  On CPU they are the thunks XLA's runtime executes (fusions, dots, reduces, copies ...): host
  events with an `hlo_op` argument (and `hlo_module`), on the PjRt client and Eigen pool threads.
  Their zero-length 'end: ...' markers, and the Python, PjRt and thread-pool events around them,
  carry no `hlo_op` and are left out. On GPU and TPU the device's 'XLA Ops' line is taken when the
  trace has one (else device events with `hlo_op`), so host-side launches are not counted as well.
  """
  process = {e['pid']: e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  thread = {(e['pid'], e.get('tid')): e['args']['name'] for e in events
            if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  spans = [e for e in events if e.get('ph') == 'X']
  on_device = [e for e in spans if process.get(e['pid'], '').startswith('/device:')]
  xla_ops_line = [e for e in on_device if thread.get((e['pid'], e.get('tid'))) == 'XLA Ops']
  with_op = lambda es: [e for e in es if 'hlo_op' in e.get('args', {})]
  return xla_ops_line or with_op(on_device) or with_op(spans)


def self_times(ops: list[dict]) -> list[tuple[dict, float]]:
  """Each op event with its self time: its duration less that of the ops nested in it on the same
  thread (a while loop's body thunks run inside the while thunk), so no time counts twice."""
  by_thread: dict[tuple, list[dict]] = {}
  for e in ops:
    by_thread.setdefault((e['pid'], e.get('tid')), []).append(e)
  out: list[tuple[dict, float]] = []
  for events in by_thread.values():
    stack: list[list] = []  # [event, end, self time] of the ops enclosing the current one
    for e in sorted(events, key=lambda e: (e.get('ts', 0.0), -e.get('dur', 0.0))):
      start, dur = float(e.get('ts', 0.0)), float(e.get('dur', 0.0))
      while stack and start >= stack[-1][1]:
        event, _, own = stack.pop()
        out.append((event, max(own, 0.0)))
      if stack:
        stack[-1][2] -= dur
      stack.append([e, start + dur, dur])
    out.extend((event, max(own, 0.0)) for event, _, own in reversed(stack))
  return out


def op_times(events: list[dict]) -> OpTimes:
  """Total self time and count per op; an op of a second module is named `module/op`."""
  ops = op_events(events)
  modules = {e.get('args', {}).get('hlo_module', '') for e in ops}
  totals: OpTimes = {}
  for e, own in self_times(ops):
    args = e.get('args', {})
    name = args.get('hlo_op', e['name'])
    if len(modules) > 1:
      name = f'{args.get("hlo_module", "?")}/{name}'
    dur, n = totals.get(name, (0.0, 0))
    totals[name] = (dur + own, n + 1)
  return totals


def top_ops_table(times: OpTimes, top: int) -> list[str]:
  """The `top` ops by total self time, one line each: milliseconds, share of all op time, count."""
  total = sum(dur for dur, _ in times.values()) or 1.0
  ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
  return [f'  {dur / 1e3:9.3f} ms {100 * dur / total:5.1f}% {n:5d}x  {name}'
          for name, (dur, n) in ranked]


def _runs(log_dir: str) -> set[str]:
  """The trace folders under `log_dir` (one per trace, named by its start time)."""
  root = os.path.join(log_dir, 'plugins', 'profile')
  try:
    return {os.path.join(root, n) for n in os.listdir(root)}
  except OSError:
    return set()


def _host_trace(run_dir: str) -> str:
  """This host's trace viewer file in `run_dir` (hosts sharing a file system share the folder)."""
  own = os.path.join(run_dir, f'{socket.gethostname()}.trace.json.gz')
  if os.path.exists(own):
    return own
  names = sorted(n for n in os.listdir(run_dir)
                 if n.endswith('.trace.json.gz') and n != 'perfetto_trace.json.gz')
  if not names:
    raise FileNotFoundError(f'no *.trace.json.gz in {run_dir}')
  return os.path.join(run_dir, names[0])


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


@dataclasses.dataclass
class ProfileWindow:
  """Traces steps first..last (1-based, as the loop counts) once; `first` = 0: off."""
  first: int
  last: int
  top_ops: int
  log_dir: str
  echo: Callable[[str], None]
  tracing: bool = False
  traced_to: int = 0  # the last step marked
  run_dir: str | None = None  # the folder the trace was written to, once it is
  _before: set[str] = dataclasses.field(default_factory=set)
  _marks: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

  def begins(self, step: int) -> bool:
    return bool(self.first) and step == self.first

  def ends(self, step: int) -> bool:
    return self.tracing and step == self.last

  def start(self) -> None:
    """Start the trace (the caller has no step in flight, so it holds this window's steps only)."""
    try:
      self._before = _runs(self.log_dir)
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.tracing = True
    except Exception as e:  # e.g. a trace the user started is still running
      self.echo(f'warning: profiler did not start ({_first_line(e)}); training goes on untraced')

  def mark(self, step: int) -> None:
    """Mark one traced step (XProf's step-time views group the trace by these)."""
    if self.tracing:
      self._marks.close()
      self._marks.enter_context(jax.profiler.StepTraceAnnotation('train', step_num=step))
      self.traced_to = step

  def stop(self, outputs: Any = None) -> None:
    """Wait for `outputs` (the last traced step's), stop the trace and print its top ops."""
    if not self.tracing:
      return
    self.tracing = False
    self._marks.close()
    try:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
    except Exception as e:  # the files may still be written (the Perfetto copy comes last)
      self.echo(f'warning: the profiler failed stopping its trace ({_first_line(e)}); training '
                'goes on')
    new = _runs(self.log_dir) - self._before
    if not new:
      return
    self.run_dir = max(new, key=os.path.getmtime)
    try:
      times = op_times(trace_events(_host_trace(self.run_dir)))
    except Exception as e:  # the trace is written: only the summary is lost
      self.echo(f'warning: the trace in {self.run_dir} could not be summarized ({_first_line(e)})')
      return
    total = sum(dur for dur, _ in times.values())
    where = (f'profile: steps {self.first}-{self.traced_to} traced to {self.run_dir} '
             f'(TensorBoard/XProf: --logdir {self.log_dir}; Perfetto: perfetto_trace.json.gz)')
    if not times:
      self.echo(f'{where}; it holds no XLA op events')
      return
    self.echo(f'{where}; XLA ops took {total / 1e3:.1f} ms, top {min(self.top_ops, len(times))} '
              'by total time:')
    for line in top_ops_table(times, self.top_ops):
      self.echo(line)


def profile_window(cfg: ConfigDict, workdir: str, resume_step: int, train_steps: int,
                   echo: Callable[[str], None]) -> ProfileWindow:
  """The window `cfg` (config.profile) asks for, off (with a line saying why) when it lies outside
  the steps this run takes: beyond train.steps, or already done before the run resumed."""
  first = cfg.start_step
  last = min(first + cfg.steps - 1, train_steps)
  off = ProfileWindow(0, 0, cfg.top_ops, '', echo)
  if not first:
    return off
  if first > train_steps:
    echo(f'profile: config.profile.start_step={first} lies beyond train.steps={train_steps}; '
         'no trace')
    return off
  if first <= resume_step:
    echo(f'profile: config.profile.start_step={first} is not after the checkpoint this run '
         f'resumed from (step {resume_step}); no trace (set it above {resume_step})')
    return off
  return ProfileWindow(first, last, cfg.top_ops, os.path.join(os.path.abspath(workdir), 'profile'),
                       echo)
