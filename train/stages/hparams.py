"""Stage `hparams`: the compute-optimal learning rate and batch size against compute (DeepSeek LLM
2024). Trials are planned by experiments/studies/hparams.py and run as a sweep (resumable,
`sweep.parallel` at a time); the workdir gets results.csv, hparams.json, manifest.json and plots."""
import os
import time

from ml_collections import ConfigDict

from experiments.studies import sweep
from train.stages.studies import (corpus_facts, load_experiment, print_acceptance, report_failures,
                                  run_trials, trial_base, write_manifest)
from train.workdir import write_summary


def hparams_stage(cfg: ConfigDict, workdir: str) -> None:
  """Plan every budget's (batch, lr) grid, run it, fit lr_opt(C) and B_opt(C), check the holdout."""
  from experiments.studies import hparams, plots, scaling  # scipy and matplotlib: loaded on use
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  corpus, vocab_size = corpus_facts(cfg)
  write_manifest(workdir, cfg, corpus)
  planned = hparams.plan(cfg, vocab_size)
  shared = trial_base(cfg, load_experiment(cfg.sweep.experiment))
  trials = sweep.make_trials([{**shared, **p.overrides()} for p in planned], [p.name for p in planned])
  print(f'hparams: {len(trials)} trials over {len(cfg.hparams.budgets)} budgets '
        f'({cfg.hparams.holdout} held out), {sum(p.flops for p in planned):.3g} FLOPs in all', flush=True)
  rows = scaling.merge_results(planned, run_trials(cfg, workdir, trials))
  sweep.write_csv(rows, os.path.join(workdir, 'results.csv'))
  result, draws = hparams.analyze(rows, cfg.hparams, cfg.seed)
  result['wall_minutes'] = write_manifest(workdir, cfg, corpus, (time.time() - started) / 60)
  result['acceptance'] = hparams.acceptance(result)
  write_summary(workdir, 'hparams.json', scaling.jsonable(result), indent=1, allow_nan=False)
  plots.hparams_plots(workdir, hparams.finished(rows, cfg.hparams.metric), result, draws)
  print_acceptance(result['acceptance'])
  report_failures(rows, workdir)
