"""Hyperparameter sweeps: trials are `run.py` subprocesses, each in its own workdir.

A sweep is a list of override dicts ({'train.lr': 1e-3, 'model.d_model': 64}); `grid` and
`random_search` build them. Each trial is `python run.py --config=EXPERIMENT --workdir=SWEEP/trials/
NAME --config.KEY=VALUE ...`. Locally N run at once; a trial counts as finished when its
metrics.jsonl holds the final eval, so a rerun skips finished trials and a crashed (or preempted) trial
is rerun on its own workdir, where run.py resumes from its latest checkpoint. For clusters the same
trials are written as one command per line and a SLURM array script.
"""
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from model.errors import UserError
from train.workdir import write_summary

Overrides = dict[str, Any]              # dotted config key -> value
Sampler = Callable[[np.random.Generator], Any]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where run.py is
STATUS_FILE = 'sweep_status.json'


# ---- defining a sweep -------------------------------------------------------------------------

def grid(axes: dict[str, Sequence[Any]]) -> list[Overrides]:
  """Every combination of the axes' values; the last axis varies fastest."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def log_space(low: float, high: float, n: int) -> list[float]:
  """n values evenly spaced in log between low and high (inclusive): a grid axis for rates."""
  return [float(v) for v in np.geomspace(low, high, n)]


def uniform(low: float, high: float) -> Sampler:
  return lambda rng: float(rng.uniform(low, high))


def log_uniform(low: float, high: float) -> Sampler:
  """Uniform in log: each decade between low and high is equally likely."""
  if not 0 < low < high:
    raise UserError(f'log_uniform({low}, {high}) needs 0 < low < high')
  return lambda rng: float(np.exp(rng.uniform(np.log(low), np.log(high))))


def choice(values: Sequence[Any]) -> Sampler:
  return lambda rng: values[int(rng.integers(len(values)))]


def random_search(space: dict[str, Sampler], n: int, seed: int = 0) -> list[Overrides]:
  """n independent draws from `space` (key -> sampler); seeded, so a rerun plans the same trials."""
  rng = np.random.default_rng(seed)
  return [{k: sample(rng) for k, sample in space.items()} for _ in range(n)]


# ---- trials -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: Overrides


def _format_value(v: Any) -> str:
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def trial_name(overrides: Overrides) -> str:
  """Readable, filesystem-safe and stable: 'd_model=64_lr=0.001' (hashed when long)."""
  name = '_'.join(f'{k.rsplit(".", 1)[-1]}={_format_value(v)}' for k, v in overrides.items()) or 'base'
  name = re.sub(r'[^A-Za-z0-9._=+-]', '-', name)
  if len(name) > 80:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f'{name[:60]}-{digest}'
  return name


def make_trials(overrides: list[Overrides], names: list[str] | None = None) -> list[Trial]:
  """Trials named by `names` or by their overrides; two trials may not share a workdir."""
  names = names or [trial_name(o) for o in overrides]
  seen: dict[str, Overrides] = {}
  for name, o in zip(names, overrides):
    if name in seen:
      raise UserError(f'two trials are both named {name!r} ({seen[name]} and {o}); '
                      'make the swept values differ in their first 4 significant digits')
    seen[name] = o
  return [Trial(n, dict(o)) for n, o in zip(names, overrides)]


def trial_dir(sweepdir: str, trial: Trial) -> str:
  return os.path.join(os.path.abspath(sweepdir), 'trials', trial.name)


def _flag_value(v: Any) -> str:
  return repr(v) if isinstance(v, (float, tuple, list)) else str(v)


def trial_command(experiment: str, workdir: str, overrides: Overrides) -> list[str]:
  """argv of one trial, run from the repository root."""
  return [sys.executable, 'run.py', f'--config={experiment}', f'--workdir={workdir}',
          *(f'--config.{k}={_flag_value(v)}' for k, v in overrides.items())]


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl records in step order; a step logged twice (a resumed run) keeps its last record."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        continue
      by_step[record['step']] = {**by_step.get(record['step'], {}), **record}
  return [by_step[s] for s in sorted(by_step)]


def final_metrics(workdir: str) -> dict | None:
  """The last record when it carries the end-of-training eval (config.json gives train.steps)."""
  records = read_metrics(workdir)
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      steps = json.load(f)['train']['steps']
  except (OSError, ValueError, KeyError):
    return None
  if records and records[-1]['step'] >= steps and 'eval_loss' in records[-1]:
    return records[-1]
  return None


# ---- running locally --------------------------------------------------------------------------

def _load_status(sweepdir: str) -> dict[str, dict]:
  try:
    with open(os.path.join(sweepdir, STATUS_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _save_status(sweepdir: str, status: dict[str, dict]) -> None:
  write_summary(sweepdir, STATUS_FILE, status, indent=1, sort_keys=True)


def _cpu_slots(parallel: int, cpus_per_trial: int) -> list[set[int] | None]:
  """CPUs each concurrent slot is pinned to (None = not pinned), round-robin over what we may use."""
  if cpus_per_trial <= 0 or not hasattr(os, 'sched_getaffinity'):
    return [None] * parallel
  cpus = sorted(os.sched_getaffinity(0))
  return [{cpus[(i * cpus_per_trial + j) % len(cpus)] for j in range(cpus_per_trial)}
          for i in range(parallel)]


def _start(trial: Trial, sweepdir: str, experiment: str, cpus: set[int] | None, attempt: int,
           env: dict[str, str] | None) -> tuple[subprocess.Popen, Any]:
  workdir = trial_dir(sweepdir, trial)
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, 'run.log'), 'a')
  cmd = trial_command(experiment, workdir, trial.overrides)
  log.write(f'\n=== attempt {attempt} at {time.strftime("%Y-%m-%d %H:%M:%S")}: {shlex.join(cmd)}\n')
  log.flush()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
  if cpus:  # pinned from here, not in a preexec_fn: forking a JAX process to run Python can deadlock
    try:
      os.sched_setaffinity(proc.pid, cpus)  # its threads start after imports, so they inherit this
    except ProcessLookupError:  # already gone; the retry logic sees it
      pass
  return proc, log


def _outcome(entry: dict, tries: int, retries: int) -> str:
  """One line on how an attempt ended."""
  if entry['state'] == 'finished':
    return f'finished ({entry["seconds"]:.0f} s)'
  verb = f'ended unfinished (exit {entry["returncode"]}); retrying ({tries} of {retries})' \
      if entry['state'] == 'pending' else f'FAILED (exit {entry["returncode"]}) after {tries} attempts'
  return f'{verb}; log: {entry["log"]}'


def _interrupt(signum, frame) -> None:
  """SIGTERM to the sweep: handled like Ctrl-C."""
  raise KeyboardInterrupt


def run_local(trials: list[Trial], sweepdir: str, experiment: str, parallel: int = 1, retries: int = 1,
              cpus_per_trial: int = 0, env: dict[str, str] | None = None,
              poll_seconds: float = 0.5) -> dict[str, dict]:
  """Run unfinished trials, `parallel` at a time; a trial that ends unfinished (crash, kill,
  preemption) is started again, up to `retries` more times. Returns (and saves) each trial's status.

  SIGTERM or Ctrl-C stops the sweep: running trials get SIGTERM, save a checkpoint and exit, and a
  rerun picks them up. `env` is the trials' environment (default: this process's).
  """
  if parallel < 1 or retries < 0:
    raise UserError(f'sweep.parallel={parallel} must be >= 1 and sweep.retries={retries} >= 0')
  status = _load_status(sweepdir)
  queue = []
  for t in trials:
    done = final_metrics(trial_dir(sweepdir, t)) is not None
    entry = status.setdefault(t.name, {'attempts': 0, 'seconds': 0.0})
    entry['log'] = os.path.join(trial_dir(sweepdir, t), 'run.log')
    entry['state'] = 'finished' if done else 'pending'
    if not done:
      queue.append(t)
  tries = {t.name: 0 for t in queue}
  # Trials of one sweep share XLA's persistent cache: identical programs (init, eval) compile once.
  env = {'JAX_COMPILATION_CACHE_DIR': os.path.join(os.path.abspath(sweepdir), 'jax_cache'),
         **(os.environ if env is None else env)}
  slots = _cpu_slots(parallel, cpus_per_trial)
  running: dict[int, tuple[Trial, subprocess.Popen, Any, float]] = {}
  print(f'sweep: {len(trials)} trials, {len(trials) - len(queue)} already finished, '
        f'{len(queue)} to run ({parallel} at a time)', flush=True)
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    while queue or running:
      for slot in range(parallel):
        if slot not in running and queue:
          t = queue.pop(0)
          tries[t.name] += 1
          status[t.name]['attempts'] += 1
          status[t.name]['state'] = 'running'
          proc, log = _start(t, sweepdir, experiment, slots[slot], status[t.name]['attempts'], env)
          running[slot] = (t, proc, log, time.time())
          _save_status(sweepdir, status)
      time.sleep(poll_seconds)
      for slot, (t, proc, log, started) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[slot]
        entry = status[t.name]
        entry['seconds'] += time.time() - started
        entry['returncode'] = proc.returncode
        done = final_metrics(trial_dir(sweepdir, t)) is not None
        entry['state'] = 'finished' if done else 'pending' if tries[t.name] <= retries else 'failed'
        if entry['state'] == 'pending':
          queue.insert(0, t)  # resumes from its latest checkpoint
        print(f'sweep: {t.name} {_outcome(entry, tries[t.name], retries)}', flush=True)
        _save_status(sweepdir, status)
  except KeyboardInterrupt:
    for t, proc, log, _ in running.values():
      proc.send_signal(signal.SIGTERM)
    for t, proc, log, _ in running.values():
      proc.wait()
      log.close()
      status[t.name]['state'] = 'pending'
    _save_status(sweepdir, status)
    raise UserError('sweep interrupted; running trials saved checkpoints; rerun the same command to resume')
  finally:
    signal.signal(signal.SIGTERM, previous)
  return status


# ---- clusters ---------------------------------------------------------------------------------

def write_cluster_scripts(trials: list[Trial], sweepdir: str, experiment: str, parallel: int,
                          slurm_header: str = '') -> tuple[str, str]:
  """commands.sh (one shell line per unfinished trial, run from the repo root) and slurm.sbatch (an
  array job whose task i runs line i+1). Submit with `sbatch SWEEP/slurm.sbatch`, then rerun the
  sweep to gather results; finished trials drop out of the next commands.sh."""
  todo = [t for t in trials if final_metrics(trial_dir(sweepdir, t)) is None]
  commands = os.path.join(os.path.abspath(sweepdir), 'commands.sh')
  with open(commands, 'w') as f:
    for t in todo:
      log = os.path.join(trial_dir(sweepdir, t), 'run.log')
      cmd = shlex.join(trial_command(experiment, trial_dir(sweepdir, t), t.overrides))
      f.write(f'cd {shlex.quote(REPO)} && mkdir -p {shlex.quote(trial_dir(sweepdir, t))} && '
              f'{cmd} >> {shlex.quote(log)} 2>&1\n')
  script = os.path.join(os.path.abspath(sweepdir), 'slurm.sbatch')
  header = ''.join(f'#SBATCH {line.strip()}\n' for line in slurm_header.split(';') if line.strip())
  with open(script, 'w') as f:
    f.write('#!/bin/bash\n'
            f'#SBATCH --job-name={os.path.basename(os.path.abspath(sweepdir))}\n'
            f'#SBATCH --array=0-{max(len(todo) - 1, 0)}%{parallel}\n'
            f'#SBATCH --output={os.path.abspath(sweepdir)}/slurm-%A_%a.out\n'
            f'{header}'
            f'sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands)} | bash\n')
  return commands, script


# ---- results ----------------------------------------------------------------------------------

def gather(trials: list[Trial], sweepdir: str) -> list[dict[str, Any]]:
  """One row per trial: name, state, attempts, its overrides, then its final metrics (if finished)."""
  status = _load_status(sweepdir)
  rows = []
  for t in trials:
    final = final_metrics(trial_dir(sweepdir, t))
    entry = status.get(t.name, {})
    state = 'finished' if final else ('failed' if entry.get('state') == 'failed' else 'unfinished')
    rows.append({'name': t.name, 'state': state, 'attempts': entry.get('attempts', 0),
                 'seconds': round(entry.get('seconds', 0.0), 1), **t.overrides, **(final or {})})
  return rows


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  """Columns in first-seen order; missing cells are empty."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
