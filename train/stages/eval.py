"""Stage `eval`: run the task suite `eval.tasks` on a model and write WORKDIR/eval_results.json.

  python run.py --config=experiments/quickstart.py --workdir=runs/qs_eval --config.stage=eval \\
    --config.pretrained=runs/quickstart --config.eval.tasks='markov=bpb:synthetic,mc=choice:synthetic'

`config.pretrained` is any source `load_pretrained` opens (a workdir trained here, a GGUF, a Hugging
Face folder, package:NAME); --workdir is a new folder for the results. `eval_hook` is the same
suite as a training-loop callback: pretraining logs its metrics as eval/NAME/METRIC at every eval.
"""
from typing import Callable

from ml_collections import ConfigDict

from model.errors import UserError
from model.pretrained import load_pretrained
from model.tokenizer import Tokenizer
from train.eval.scoring import shard_params
from train.eval.tasks import Results, build_suite, evaluators, flat
from train.trainer import Trainer
from train.mesh import make_mesh
from train.workdir import write_summary

RESULTS_FILE = 'eval_results.json'


def eval_hook(cfg: ConfigDict, tokenizer: Tokenizer) -> Callable[[Trainer], dict[str, float]] | None:
  """`run_training`'s on_eval for `eval.tasks` (None when there are none); files are read now."""
  if not cfg.eval.tasks:
    return None
  if cfg.model.family != 'decoder':
    raise UserError(f'eval.tasks score a causal LM; model.family={cfg.model.family!r} has none, '
                    "set eval.tasks=''")
  suite = build_suite(cfg.eval, tokenizer, cfg.data.synthetic)

  def on_eval(trainer: Trainer) -> dict[str, float]:
    scorer, generator = evaluators(trainer.eval_model, trainer.variables(), trainer.model_cfg,
                                   trainer.mesh, cfg.eval)
    return flat(suite.run(scorer, generator))
  return on_eval


def print_results(results: Results) -> None:
  for name, metrics in results.items():
    print(f'{name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()), flush=True)


def eval_stage(cfg: ConfigDict, workdir: str) -> None:
  if not cfg.pretrained:
    raise UserError('stage=eval evaluates config.pretrained: set it to a workdir, a .gguf file, a '
                    'Hugging Face folder or package:NAME')
  if not cfg.eval.tasks:
    raise UserError("stage=eval needs eval.tasks, e.g. --config.eval.tasks='quiz=choice:FILE.jsonl'")
  lm = load_pretrained(cfg.pretrained)
  if lm.tokenizer is None or lm.config.family != 'decoder':
    raise UserError(f'{cfg.pretrained} is not a causal LM with a tokenizer; stage=eval scores one')
  suite = build_suite(cfg.eval, lm.tokenizer, cfg.data.synthetic)
  mesh = make_mesh(cfg.mesh)
  model = lm.build(lm.config, True)
  variables = {'params': shard_params(model, lm.params, mesh)}
  del lm.params  # the mesh holds the only copy
  scorer, generator = evaluators(model, variables, lm.config, mesh, cfg.eval)
  results = suite.run(scorer, generator)
  print_results(results)
  write_summary(workdir, RESULTS_FILE,
                {'pretrained': cfg.pretrained, 'results': results, 'flat': flat(results, '')})
