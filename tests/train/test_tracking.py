"""Experiment trackers: a tiny pretraining run mirrors metrics.jsonl to wandb (offline) and MLflow
(SQLite in the workdir), read back by wandb's own reader (`wandb leet inspect`) and through MlflowClient; a
resumed run continues its tracker runs without repeating a step, a run from scratch starts new
ones; a missing library is one line; the run metadata carries the commit and package versions.

Nothing here reaches the network: wandb runs offline with an unroutable base URL, and both
libraries' telemetry is switched off before either is imported."""
import glob
import json
import math
import os
import platform
import subprocess
import sys
import urllib.parse

import jax
import pytest

from data.pipeline import build_dataset
from experiments import quickstart
from model.errors import UserError
from train import tracking
from train.loop import pretrain
from train.metrics import MetricWriter

for _name, _value in {'DO_NOT_TRACK': 'true', 'MLFLOW_DISABLE_TELEMETRY': 'true',
                      'WANDB_ERROR_REPORTING': 'false'}.items():
  os.environ.setdefault(_name, _value)  # at collection, before wandb or mlflow is imported

STEPS, LOG_EVERY = 20, 3


def offline_env(patch: pytest.MonkeyPatch, root) -> None:
  """wandb offline, quiet, without system sampling or console capture, its files under `root`."""
  patch.delenv('WANDB_API_KEY', raising=False)
  patch.delenv('MLFLOW_TRACKING_URI', raising=False)
  for name, value in {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_CONSOLE': 'off',
                      'WANDB_BASE_URL': 'http://127.0.0.1:9', 'WANDB_X_DISABLE_STATS': 'true',
                      'WANDB_CONFIG_DIR': f'{root}/config', 'WANDB_CACHE_DIR': f'{root}/cache',
                      'WANDB_DATA_DIR': f'{root}/data'}.items():
    patch.setenv(name, value)


def tracked_config(wandb: bool = True, mlflow: bool = True):
  cfg = quickstart.get_config()
  cfg.model.n_layers, cfg.model.d_model = 1, 32
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = STEPS, 8, 32
  cfg.train.warmup_steps, cfg.train.log_every = 5, LOG_EVERY
  cfg.data.synthetic.n_docs, cfg.data.synthetic.doc_len = 200, 31
  cfg.eval.every_steps, cfg.eval.max_batches, cfg.checkpoint.every_steps = 10, 2, 0
  cfg.metrics.wandb, cfg.metrics.mlflow = wandb, mlflow
  return cfg


def tracked_run(workdir: str, patch: pytest.MonkeyPatch, root) -> tuple:
  """A 20-step run with both trackers on: (config, metrics.jsonl rows)."""
  cfg = tracked_config()
  offline_env(patch, root)
  pretrain(cfg, workdir, build_dataset(cfg.data, cfg.seed, tokenizer_dir=f'{workdir}/tokenizer'))
  return cfg, jsonl_rows(workdir)


def jsonl_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def wandb_runs(workdir) -> list[dict]:
  """Each offline run folder of the workdir, oldest first: its id, config and history rows
  (without wandb's own `_` keys), read back by wandb's own reader (`wandb leet inspect --json`,
  the Go core's parser of the .wandb transaction log)."""
  runs = []
  for path in glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'run-*.wandb')):
    lines = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'wandb'), 'leet', 'inspect', '--json', path],
                           capture_output=True, text=True, check=True, timeout=120).stdout
    out = {'history': []}
    for record in map(json.loads, lines.splitlines()):
      if record['type'] == 'run':
        run = record['run']
        out.update(id=run['run_id'], config=run['config']['update'], start=run['start_time'])
      elif record['type'] == 'history':
        out['history'].append({k: v for k, v in record['history']['item'].items()
                               if not k.startswith('_')})
    runs.append(out)
  return sorted(runs, key=lambda r: r['start'])


def numeric(row: dict) -> dict:
  return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def close(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      math.isclose(a[k], b[k], rel_tol=1e-9) or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def head_commit() -> str:
  return subprocess.run(['git', '-C', tracking.CODE_ROOT, 'rev-parse', 'HEAD'], text=True,
                        capture_output=True, check=True).stdout.strip()


def test_a_run_mirrors_its_rows_and_metadata_to_wandb_and_mlflow(tmp_path, monkeypatch):
  """One training run for both trackers (a module fixture would train once per xdist worker)."""
  pytest.importorskip('wandb')
  pytest.importorskip('mlflow')
  workdir = str(tmp_path / 'run')
  cfg, rows = tracked_run(workdir, monkeypatch, tmp_path)
  assert [r['step'] for r in rows] == [3, 6, 9, 10, 12, 15, 18, 20]  # eval steps 10 and 20 too
  check_wandb(workdir, cfg, rows)
  check_mlflow(workdir, cfg, rows)


def check_wandb(workdir: str, cfg, rows: list[dict]) -> None:
  (wb,) = wandb_runs(workdir)
  assert wb['id'] == tracking.stored_id(workdir, 'wandb')
  assert len(wb['history']) == len(rows)
  for mine, theirs in zip(rows, wb['history']):
    assert close(numeric(mine), theirs), (mine, theirs)
  assert 'eval_loss' in wb['history'][3] and 'eval_loss' in wb['history'][-1]
  assert wb['config']['config'] == json.loads(json.dumps(cfg.to_dict()))
  assert wb['config']['git']['commit'] == head_commit()
  assert wb['config']['versions']['jax'] == jax.__version__
  with open(os.path.join(workdir, tracking.INFO_FILE)) as f:
    assert json.load(f)['git']['commit'] == head_commit()


def check_mlflow(workdir: str, cfg, rows: list[dict]) -> None:
  from mlflow import MlflowClient
  client = MlflowClient(tracking_uri=tracking.mlflow_uri(cfg.metrics, workdir))
  found = client.get_run(tracking.stored_id(workdir, 'mlflow'))
  assert found.info.status == 'FINISHED' and found.info.run_name == 'run'
  for key in numeric(rows[-1]).keys() - {'step'}:
    history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
    expected = [(r['step'], float(r[key])) for r in rows if key in r]
    assert [s for s, _ in history] == [s for s, _ in expected], key
    assert close(dict(history), dict(expected)), key
  assert found.data.params['train.steps'] == str(STEPS)
  assert found.data.params['model.d_model'] == '32'
  assert found.data.tags['mlflow.source.git.commit'] == head_commit()
  assert found.data.tags['version.flax']
  artifact = urllib.parse.urlparse(found.info.artifact_uri).path
  assert artifact.startswith(os.path.abspath(workdir))  # the default store keeps all in the workdir
  with open(os.path.join(artifact, tracking.INFO_FILE)) as f:
    assert json.load(f)['config'] == json.loads(json.dumps(cfg.to_dict()))


def test_resume_continues_tracker_runs_and_scratch_starts_new_ones(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  pytest.importorskip('mlflow')
  from mlflow import MlflowClient
  offline_env(monkeypatch, tmp_path)
  workdir, cfg = str(tmp_path / 'w'), tracked_config()
  os.makedirs(workdir)

  def write(steps, resume_step, **extra):
    writer = MetricWriter(workdir, resume_step=resume_step, config=cfg)
    for s in steps:
      writer.write(s, {'loss': 1.0 / s, 'note': 'text is not mirrored', **extra})
    writer.close()
    return tracking.stored_id(workdir, 'wandb'), tracking.stored_id(workdir, 'mlflow')

  first = write(range(1, 7), resume_step=0)
  assert write(range(4, 9), resume_step=3) == first  # resumed from step 3: rows 4..6 are redone
  assert write([8], resume_step=None, exact_match=0.5) == first  # a writer after training
  assert [r['step'] for r in jsonl_rows(workdir)] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
  runs = wandb_runs(workdir)
  assert [r['id'] for r in runs] == [first[0]] * 3
  assert [[h['step'] for h in r['history']] for r in runs] == [[1, 2, 3, 4, 5, 6], [7, 8], [8]]
  assert runs[2]['history'][0] == {'step': 8, 'loss': 1 / 8, 'exact_match': 0.5}
  client = MlflowClient(tracking_uri=tracking.mlflow_uri(cfg.metrics, workdir))
  steps = sorted(m.step for m in client.get_metric_history(first[1], 'loss'))
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 8]
  assert [m.step for m in client.get_metric_history(first[1], 'exact_match')] == [8]
  assert not client.get_metric_history(first[1], 'note')
  fresh = write([1], resume_step=0)  # from scratch: metrics.jsonl restarts, so do the trackers
  assert fresh[0] != first[0] and fresh[1] != first[1]


@pytest.mark.parametrize('library', ['wandb', 'mlflow'])
def test_missing_library_is_one_line_before_anything_is_written(tmp_path, monkeypatch, library):
  monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
  cfg = tracked_config(wandb=library == 'wandb', mlflow=library == 'mlflow')
  with pytest.raises(UserError) as e:
    MetricWriter(str(tmp_path), config=cfg)
  assert str(e.value) == f"metrics.{library}=True needs {library}: pip install '.[{library}]'"
  assert not os.listdir(tmp_path)  # nothing written: not metrics.jsonl, not run_info.json


def test_bad_wandb_mode_is_one_line(tmp_path):
  cfg = tracked_config(mlflow=False)
  cfg.metrics.wandb_mode = 'offlne'
  with pytest.raises(UserError) as e:
    MetricWriter(str(tmp_path), config=cfg)
  assert str(e.value) == "metrics.wandb_mode='offlne' is not one of offline, online"


def test_run_metadata_has_commit_and_versions(tmp_path, monkeypatch):
  meta = tracking.run_metadata(tracked_config())
  assert meta['config']['train']['steps'] == STEPS
  assert meta['git']['commit'] == head_commit() and isinstance(meta['git']['dirty'], bool)
  assert meta['versions']['jax'] == jax.__version__
  assert meta['versions']['python'] == platform.python_version()
  assert set(tracking.PACKAGES) <= meta['versions'].keys()
  assert tracking.git_state(str(tmp_path)) == {'commit': None, 'dirty': None}  # not a checkout
  monkeypatch.setenv('PATH', str(tmp_path))  # no git binary at all
  assert tracking.git_state() == {'commit': None, 'dirty': None}


def test_a_failing_tracker_warns_once_and_stops(capsys):
  class Broken:
    name, closed = 'broken', False

    def write(self, step, scalars):
      raise ConnectionError('server went away\nmore detail')

    def close(self):
      Broken.closed = True

  assert tracking.mirror([Broken()], 7, {'loss': 1.0}) == []
  assert Broken.closed
  assert capsys.readouterr().err == ('warning: broken stopped at step 7: server went away; '
                                     'metrics.jsonl has every row\n')
