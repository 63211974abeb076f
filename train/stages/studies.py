"""Stages `sweep` and `scaling`: trials run as `run.py` subprocesses; results are gathered and fitted.

Each trial runs the experiment file `sweep.experiment` with stage=pretrain, the trial's overrides, and
every override the sweep itself was given on the command line (so `--config.train.steps=50` on the
sweep shortens every trial), except those of the sweep, scaling and hparams sections (the
`hparams` stage lives in train/stages/hparams.py).
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import time
from types import ModuleType
from typing import Any

from ml_collections import ConfigDict

from data.sources import load_source
from data.tokenizer import build_tokenizer
from experiments.studies import planning, sweep
from model.errors import UserError
from train.workdir import write_summary

NOT_INHERITED = ('stage', 'sweep.', 'scaling.', 'hparams.')  # sweep-level settings trials do not receive
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scipy', 'matplotlib', 'ml-collections', 'grain')


def load_experiment(path: str) -> ModuleType:
  """The experiment file as a module (its get_config() is the trials' base config)."""
  full = path if os.path.isabs(path) else os.path.join(sweep.REPO, path)
  if not path or not os.path.isfile(full):
    raise UserError(f'sweep.experiment={path!r} is not a config file; set it to the file trials run, '
                    'e.g. experiments/lr_sweep.py')
  spec = importlib.util.spec_from_file_location(f'experiment_{os.path.basename(path)[:-3]}', full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def inherited_overrides(cfg: ConfigDict, experiment_cfg: ConfigDict) -> dict[str, Any]:
  """Fields where this run's config differs from the experiment file's: its command-line overrides."""
  mine, base = flatten(cfg.to_dict()), flatten(experiment_cfg.to_dict())
  return {k: v for k, v in mine.items()
          if base.get(k) != v and not any(k == p or k.startswith(p) for p in NOT_INHERITED)}


def trial_base(cfg: ConfigDict, experiment: ModuleType) -> dict[str, Any]:
  """What every trial of this sweep gets before its own overrides: stage=pretrain, and this run's
  command-line overrides of the experiment file."""
  return {'stage': 'pretrain', **inherited_overrides(cfg, experiment.get_config())}


def print_acceptance(acceptance: dict[str, dict]) -> None:
  for name, check in acceptance.items():
    value = check.get('value', check.get('budgets', ''))
    print(f'acceptance {name}: {"PASS" if check["pass"] else "FAIL"} ({value})', flush=True)


def run_trials(cfg: ConfigDict, workdir: str, trials: list[sweep.Trial]) -> list[dict]:
  """Run (or, for launcher=emit, write cluster scripts for) the unfinished trials; gather all."""
  w = cfg.sweep
  os.makedirs(workdir, exist_ok=True)
  if w.launcher == 'local':
    sweep.run_local(trials, workdir, w.experiment, w.parallel, w.retries, w.cpus_per_trial)
  elif w.launcher == 'emit':
    commands, script = sweep.write_cluster_scripts(trials, workdir, w.experiment, w.parallel, w.slurm_header)
    print(f'wrote {commands} and {script}: run them (e.g. sbatch {script}), then rerun this command '
          'to gather the results', flush=True)
  else:
    raise UserError(f'sweep.launcher={w.launcher!r} is not one of local, emit')
  return sweep.gather(trials, workdir)


def report_failures(rows: list[dict], workdir: str) -> None:
  failed = [r['name'] for r in rows if r['state'] == 'failed']
  if failed:
    raise UserError(f'{len(failed)} trial(s) failed on every attempt: {", ".join(failed)}; see '
                    f'{workdir}/trials/NAME/run.log, fix, and rerun to retry them')


def sweep_stage(cfg: ConfigDict, workdir: str) -> None:
  """Trials from `sweep.trials(config)` in the experiment file -> trials/, results.csv, a plot."""
  module = load_experiment(cfg.sweep.experiment)
  define = getattr(module, cfg.sweep.trials, None)
  if not callable(define):
    raise UserError(f'{cfg.sweep.experiment} has no function {cfg.sweep.trials}(config) returning the '
                    'trials\' overrides; define it or set sweep.trials')
  base = trial_base(cfg, module)
  overrides = define(cfg)
  trials = sweep.make_trials([{**base, **o} for o in overrides], [sweep.trial_name(o) for o in overrides])
  rows = run_trials(cfg, workdir, trials)
  sweep.write_csv(rows, os.path.join(workdir, 'results.csv'))
  if cfg.sweep.plot_x and any(r['state'] == 'finished' for r in rows):
    from experiments.studies import plots  # matplotlib costs every run.py start ~1 s: load it on use
    plots.sweep_curves(rows, cfg.sweep.plot_x, os.path.join(workdir, 'results.png'),
                       panels=cfg.sweep.plot_panels)
  finished = sum(r['state'] == 'finished' for r in rows)
  print(f'sweep: {finished}/{len(rows)} trials finished; results in {workdir}/results.csv', flush=True)
  report_failures(rows, workdir)


# ---- scaling ----------------------------------------------------------------------------------

def wsd_trials(cfg: ConfigDict, workdir: str, base: dict, stables: list, cooldowns: list,
               flops: dict[str, float]) -> tuple[list[dict] | None, dict[str, str]]:
  """Run the stable runs, then every cooldown branched off its stable run's checkpoint; returns the
  merged rows and each run's folder (the stable runs' too: a cooldown's curve begins in its stable
  run), or None for the rows while the stable runs are unfinished (launcher=emit). `flops` is
  planning.compute_summary's, printed first."""
  from experiments.studies import scaling  # scipy: loaded on use
  stable_trials = sweep.make_trials([{**base, **r.overrides()} for r in stables], [r.name for r in stables])
  dirs = {t.name: sweep.trial_dir(workdir, t) for t in stable_trials}
  print(f'scaling (wsd): {len(stables)} stable runs and {len(cooldowns)} cooldowns over '
        f'{len(cfg.scaling.budgets)} budgets; {flops["wsd_flops"]:.3g} FLOPs against '
        f'{flops["one_run_per_point_flops"]:.3g} for the same points one run each '
        f'({flops["ratio"]:.0%})', flush=True)
  stable_rows = run_trials(cfg, workdir, stable_trials)
  if any(r['state'] != 'finished' for r in stable_rows):
    report_failures(stable_rows, workdir)
    print('scaling (wsd): the stable runs are not finished; rerun this command once they are, to '
          'run the cooldowns', flush=True)
    return None, dirs
  cooldown_trials = sweep.make_trials(
      [{**base, **r.overrides(), 'train.branch_from': f'{dirs[r.stable]}:{r.branch_step}'}
       for r in cooldowns], [r.name for r in cooldowns])
  dirs.update({t.name: sweep.trial_dir(workdir, t) for t in cooldown_trials})
  rows = run_trials(cfg, workdir, cooldown_trials)
  return scaling.merge_results([*stables, *cooldowns], stable_rows + rows), dirs


def corpus_facts(cfg: ConfigDict) -> tuple[dict, int]:
  """The corpus checksum (sha256 over every train and eval document) and the tokenizer's vocabulary."""
  source = load_source(cfg.data)
  digest = hashlib.sha256()
  for split, docs in (('train', source.train_docs), ('eval', source.eval_docs)):
    digest.update(split.encode())
    for doc in docs:
      digest.update(doc.encode('utf-8') + b'\0')
  tokenizer = build_tokenizer(cfg.data.tokenizer, source.train_docs)
  train_chars = sum(len(d) for d in source.train_docs)
  return {'source': cfg.data.source, 'sha256': digest.hexdigest(), 'train_docs': len(source.train_docs),
          'eval_docs': len(source.eval_docs), 'train_chars': train_chars}, tokenizer.vocab_size


def write_manifest(workdir: str, cfg: ConfigDict, corpus: dict, wall_minutes: float = 0.0) -> float:
  """manifest.json: config, package versions, machine, corpus checksum and the wall time of every
  invocation so far plus `wall_minutes`, which it returns. A rerun on a changed corpus is refused:
  its runs would not be comparable."""
  path = os.path.join(workdir, 'manifest.json')
  old = {'created': time.strftime('%Y-%m-%dT%H:%M:%S'), 'wall_minutes': 0.0, 'corpus': corpus}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  if old['corpus']['sha256'] != corpus['sha256']:
    raise UserError(f'the corpus of {cfg.data.source!r} changed since {workdir} was started (checksum '
                    f'{old["corpus"]["sha256"][:12]} -> {corpus["sha256"][:12]}); use a fresh --workdir')
  versions = {p: importlib.metadata.version(p) for p in PACKAGES}
  manifest = {'created': old['created'], 'updated': time.strftime('%Y-%m-%dT%H:%M:%S'),
              'wall_minutes': old.get('wall_minutes', 0.0) + wall_minutes,
              'python': platform.python_version(), 'packages': versions,
              'machine': {'platform': platform.platform(), 'cpus': os.cpu_count()},
              'corpus': corpus, 'config': cfg.to_dict()}
  write_summary(workdir, 'manifest.json', manifest, sort_keys=True)
  return manifest['wall_minutes']


def scaling_stage(cfg: ConfigDict, workdir: str) -> None:
  """Plan IsoFLOP runs, run them as a sweep, fit, and write manifest, CSVs, fits.json and plots."""
  from experiments.studies import plots, scaling  # scipy and matplotlib: loaded on use, not by every run.py
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  corpus, vocab_size = corpus_facts(cfg)
  write_manifest(workdir, cfg, corpus)
  base = trial_base(cfg, load_experiment(cfg.sweep.experiment))
  if cfg.scaling.design == 'wsd':
    stables, planned = planning.plan_wsd(cfg, vocab_size)
    compute = planning.compute_summary(stables, planned)
    rows, dirs = wsd_trials(cfg, workdir, base, stables, planned, compute)
    if rows is None:
      return
  elif cfg.scaling.design == 'isoflop':
    stables, planned = [], planning.plan(cfg, vocab_size)
    trials = sweep.make_trials([{**base, **p.overrides()} for p in planned], [p.name for p in planned])
    print(f'scaling: {len(planned)} runs planned over {len(cfg.scaling.budgets)} budgets; largest D = '
          f'{max(p.tokens for p in planned) / corpus["train_chars"]:.2f}× the train split (in '
          'characters)', flush=True)
    rows = scaling.merge_results(planned, run_trials(cfg, workdir, trials))
    dirs = {t.name: sweep.trial_dir(workdir, t) for t in trials}
  else:
    raise UserError(f'scaling.design={cfg.scaling.design!r} is not one of isoflop, wsd')
  sweep.write_csv(rows, os.path.join(workdir, 'runs.csv'))
  curves = scaling.train_curves(rows, dirs)
  result, draws = scaling.analyze(rows, curves, cfg.scaling, cfg.seed)
  if stables:
    result['compute'] = compute
    result['reference'] = scaling.reference(cfg.scaling.reference, result)
  budgets = sorted({p.budget for p in planned})
  sizes = [sum(p.role == 'isoflop' and p.budget == c for p in planned) for c in budgets]
  minutes = write_manifest(workdir, cfg, corpus, (time.time() - started) / 60)  # all invocations
  result['acceptance'] = scaling.acceptance(result, sizes, minutes)
  if stables:
    result['acceptance'].update(scaling.wsd_acceptance(result, minutes))
  sweep.write_csv(scaling.isoflop_rows(result['approach2']), os.path.join(workdir, 'isoflop.csv'))
  write_summary(workdir, 'fits.json', scaling.jsonable(result), indent=1, allow_nan=False)
  plots.scaling_plots(workdir, scaling.runs_for(rows, 'n_flops', cfg.scaling.metric), result, draws, curves)
  print_acceptance(result['acceptance'])
  report_failures(rows, workdir)
