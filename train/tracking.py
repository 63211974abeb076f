"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow, through their own
libraries, each given the run's metadata (resolved config, code commit, package versions).

metrics.jsonl stays the record; a tracker mirrors its numeric scalars at the same steps under the
same names (train/metrics.py). Tracker run ids live in WORKDIR/tracking.json, so a run resumed
from a checkpoint continues the same tracker runs, and a run started from scratch starts new ones.
"""
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import secrets
import subprocess
import sys
import time
from typing import Any, Iterator, Protocol

from ml_collections import ConfigDict

from model.errors import UserError
from train.workdir import write_json_atomic

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy')
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout of run.py
IDS_FILE = 'tracking.json'
INFO_FILE = 'run_info.json'
WANDB_MODES = ('offline', 'online')
MLFLOW_VALUE_CHARS = 500  # the oldest MLflow servers' cap on a param value; run_info.json has all
MLFLOW_BATCH = 100        # params (and metrics) per log_batch call: MLflow's limit for params


class Tracker(Protocol):
  name: str

  def write(self, step: int, scalars: dict[str, float]) -> None: ...

  def close(self) -> None: ...


def git_state(root: str = CODE_ROOT) -> dict[str, Any]:
  """{'commit', 'dirty'} of the git checkout whose top is `root`; both None when it is not one
  (an installed package, no git binary), never an error."""
  env = {**os.environ, 'GIT_OPTIONAL_LOCKS': '0'}  # `git status` must not take the index lock

  def git(*args: str) -> str:
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, env=env,
                          timeout=10, check=True).stdout.strip()

  try:  # the top must be `root` itself: site-packages inside some other checkout is not the code
    if os.path.realpath(git('rev-parse', '--show-toplevel')) == os.path.realpath(root):
      return {'commit': git('rev-parse', 'HEAD'), 'dirty': bool(git('status', '--porcelain'))}
  except (OSError, subprocess.SubprocessError):
    pass
  return {'commit': None, 'dirty': None}


def package_versions() -> dict[str, str | None]:
  """Versions of Python and of the packages that shape a run's numbers (None: not installed)."""
  versions: dict[str, str | None] = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def run_metadata(cfg: ConfigDict) -> dict[str, Any]:
  """What every tracker run is given, and WORKDIR/run_info.json holds: the resolved config, the
  code's git commit with a dirty flag, and package versions, so a result traces to all three."""
  return {'config': cfg.to_dict(), 'git': git_state(), 'versions': package_versions()}


def require(module: str, flag: str) -> Any:
  """`module`, imported, or one line saying how to install the extra of metrics.`flag`."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"metrics.{flag}=True needs {module}: pip install '.[{flag}]'") from None


def first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _read_ids(workdir: str) -> dict[str, str]:
  try:
    with open(os.path.join(workdir, IDS_FILE)) as f:
      ids = json.load(f)
    return ids if isinstance(ids, dict) else {}
  except (OSError, ValueError):
    return {}


def stored_id(workdir: str, tracker: str) -> str | None:
  return _read_ids(workdir).get(tracker)


def store_id(workdir: str, tracker: str, run_id: str) -> None:
  write_json_atomic(os.path.join(workdir, IDS_FILE), {**_read_ids(workdir), tracker: run_id},
                    indent=2)


def run_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


class WandbTracker:
  """One wandb run per workdir. wandb's own step stays a counter and `step` is every metric's
  x-axis (define_metric): wandb refuses a step lower than one it holds, and a writer after
  training (the seq2seq exact match) logs at the final step again. Offline, each start writes
  its own WORKDIR/wandb/offline-run-* folder with the run's id; `wandb sync --id ID` joins them."""
  name = 'wandb'

  @staticmethod
  def check(m: ConfigDict) -> None:
    if m.wandb_mode not in WANDB_MODES:
      raise UserError(f'metrics.wandb_mode={m.wandb_mode!r} is not one of {", ".join(WANDB_MODES)}')
    require('wandb', 'wandb')

  def __init__(self, m: ConfigDict, workdir: str, metadata: dict | None, new_run: bool):
    import wandb
    run_id = None if new_run else stored_id(workdir, 'wandb')
    if run_id is None:
      run_id = secrets.token_hex(4)
      store_id(workdir, 'wandb', run_id)
    try:
      self.run = wandb.init(project=m.wandb_project, entity=m.wandb_entity or None,
                            name=m.wandb_name or run_name(workdir), dir=workdir,
                            mode=m.wandb_mode, config=metadata, id=run_id, resume='allow',
                            reinit='create_new')  # leaves wandb.run alone: no global run
    except wandb.Error as e:
      raise UserError(f'wandb.init failed: {first_line(e)} (run `wandb login`, or set '
                      'metrics.wandb_mode=offline)') from None
    self.run.define_metric('step')
    self.run.define_metric('*', step_metric='step')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self.run.log({**scalars, 'step': step})

  def close(self) -> None:
    self.run.finish()


def mlflow_uri(m: ConfigDict, workdir: str) -> str:
  """metrics.mlflow_uri, or a SQLite store in the workdir: MLflow 3 refuses a file store
  (./mlruns) unless MLFLOW_ALLOW_FILE_STORE=true."""
  return m.mlflow_uri or f'sqlite:///{os.path.abspath(os.path.join(workdir, "mlflow.db"))}'


def flat_params(config: dict, prefix: str = '') -> dict[str, str]:
  """{'model.n_layers': '2', ...}: a nested config as MLflow params, each value cut to
  MLFLOW_VALUE_CHARS."""
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(flat_params(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = str(v)[:MLFLOW_VALUE_CHARS]
  return out


def chunks(items: list, size: int = MLFLOW_BATCH) -> Iterator[list]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


class MlflowTracker:
  """One MLflow run per workdir, through MlflowClient's explicit run ids (no global active run to
  leak between the runs of one process). The config is the run's params (flattened; a resumed run
  keeps the first values, as MLflow params never change) and, whole, its run_info.json artifact;
  the commit and versions are tags."""
  name = 'mlflow'

  @staticmethod
  def check(m: ConfigDict) -> None:
    require('mlflow', 'mlflow')
    if not m.mlflow_uri or m.mlflow_uri.startswith('sqlite:'):  # MLflow's SQL store needs both
      require('sqlalchemy', 'mlflow')
      require('alembic', 'mlflow')

  def __init__(self, m: ConfigDict, workdir: str, metadata: dict | None, new_run: bool):
    uri = mlflow_uri(m, workdir)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    self.client = MlflowClient(tracking_uri=uri)
    try:
      self.run_id = (None if new_run else self._resume(workdir)) or self._start(m, workdir)
      if metadata is not None:
        self._describe(metadata)
    except MlflowException as e:
      raise UserError(f'MLflow at {uri}: {first_line(e)} (check metrics.mlflow_uri)') from None

  def _resume(self, workdir: str) -> str | None:
    """The stored run, marked running again; None when this store does not hold it."""
    from mlflow.exceptions import MlflowException
    run_id = stored_id(workdir, 'mlflow')
    if run_id is None:
      return None
    try:
      self.client.update_run(run_id, status='RUNNING')
    except MlflowException:  # metrics.mlflow_uri changed, or the run was deleted
      return None
    return run_id

  def _start(self, m: ConfigDict, workdir: str) -> str:
    experiment = self.client.get_experiment_by_name(m.mlflow_experiment)
    if experiment is not None:
      experiment_id = experiment.experiment_id
    else:  # the default store keeps its artifacts in the workdir too (MLflow's: the cwd)
      artifacts = None if m.mlflow_uri else pathlib.Path(workdir, 'mlartifacts').resolve().as_uri()
      experiment_id = self.client.create_experiment(m.mlflow_experiment,
                                                    artifact_location=artifacts)
    run_id = self.client.create_run(experiment_id, run_name=run_name(workdir)).info.run_id
    store_id(workdir, 'mlflow', run_id)
    return run_id

  def _describe(self, metadata: dict) -> None:
    from mlflow.entities import Param, RunTag
    known = self.client.get_run(self.run_id).data.params
    params = [Param(k, v) for k, v in flat_params(metadata['config']).items() if k not in known]
    for batch in chunks(params):
      self.client.log_batch(self.run_id, params=batch)
    git = metadata['git']
    tags = {f'version.{k}': str(v) for k, v in metadata['versions'].items()}
    if git['commit']:  # MLflow's own tag for the source commit
      tags.update({'mlflow.source.git.commit': git['commit'], 'git_dirty': str(git['dirty'])})
    self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    self.client.log_dict(self.run_id, metadata, INFO_FILE)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    for batch in chunks([Metric(k, float(v), now, step) for k, v in scalars.items()]):
      self.client.log_batch(self.run_id, metrics=batch)

  def close(self) -> None:
    self.client.set_terminated(self.run_id)


TRACKERS = (('wandb', WandbTracker), ('mlflow', MlflowTracker))  # config.metrics.<flag> -> class


def enabled_trackers(m: ConfigDict | None) -> list[type]:
  """The tracker classes config.metrics `m` turns on, their libraries and settings checked (one
  line naming the fix), so that nothing starts when one of them cannot."""
  classes = [cls for flag, cls in TRACKERS if m is not None and m.get(flag)]
  for cls in classes:
    cls.check(m)
  return classes


def open_trackers(classes: list[type], m: ConfigDict, workdir: str, metadata: dict | None,
                  new_run: bool) -> list[Tracker]:
  """Trackers of `classes` (enabled_trackers) for config.metrics `m`, each continuing the
  workdir's stored run unless `new_run`. A failure closes the ones already open."""
  opened: list[Tracker] = []
  try:
    for cls in classes:
      opened.append(cls(m, workdir, metadata, new_run))
  except BaseException:
    close_trackers(opened)
    raise
  return opened


def warn(tracker: Tracker, what: str, error: BaseException) -> None:
  print(f'warning: {tracker.name} {what}: {first_line(error)}; metrics.jsonl has every row',
        file=sys.stderr, flush=True)


def mirror(trackers: list[Tracker], step: int, scalars: dict[str, float]) -> list[Tracker]:
  """Log `scalars` at `step` to each tracker; returns those still working. One that fails is
  reported once and dropped: a tracker's outage must not end a training run."""
  working = []
  for tracker in trackers:
    try:
      tracker.write(step, scalars)
      working.append(tracker)
    except Exception as e:  # whatever the library raises (network, server, validation)
      warn(tracker, f'stopped at step {step}', e)
      close_trackers([tracker], quiet=True)
  return working


def close_trackers(trackers: list[Tracker], quiet: bool = False) -> None:
  for tracker in trackers:
    try:
      tracker.close()
    except Exception as e:
      if not quiet:
        warn(tracker, 'failed to close', e)
