"""Stage `dpo`: direct preference optimisation of the base on the reward stage's pairs.

  python run.py --config=experiments/rlhf_synthetic.py:dpo --workdir=runs/rlhf/dpo \\
      --config.pretrained=runs/rlhf/base

The pairs are those stage=reward trains on for the same seed and rlhf settings (synthetic: sampled
from the base; hh: the file's). The reference's response log-probs are computed once, before
training, and travel in the batches; the loss is -log sigmoid(beta * margin of implicit rewards).
The held-out implicit-reward accuracy (the eval metric) is logged with every eval, and
dpo_summary.json adds the reference's and the final policy's sample reports on held-out prompts
(with the synthetic task's gold figures) and the implicit rewards' accuracy against the gold sign.
"""
import functools
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from train.mesh import global_batch, mesh_rules
from train.workdir import write_summary
from train.rl.preference import dpo_loss, response_logprobs
from train.stages.pairs import gold_accuracy, load_pair_data, over_pairs, train_on_pairs
from train.stages.rollouts import EVAL_KEY, PromptSource, reference_variables, sample_report
from train.stages.sft import load_base
from train.trainer import Trainer, init_trainer

SUMMARY_FILE = 'dpo_summary.json'


@functools.partial(jax.jit, static_argnames='apply_fn')
def pair_logprobs(apply_fn: Callable, variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
  return response_logprobs(apply_fn, variables, batch)


def response_logprobs_of(trainer: Trainer, variables: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> np.ndarray:
  """Sequence log-probs [n, 2] of every pair's responses under `variables`."""
  logprobs = lambda batch: pair_logprobs(trainer.eval_model.apply, variables,
                                         global_batch(batch, trainer.mesh))
  with mesh_rules(trainer.mesh):
    return over_pairs(logprobs, arrays, trainer.cfg.train.batch_size)


def dpo_stage(cfg: ConfigDict, workdir: str) -> None:
  r = cfg.rlhf
  base = load_base(cfg)
  tok = base.tokenizer
  data = load_pair_data(cfg, base)
  trainer = init_trainer(cfg, base.config.vocab_size, model_cfg=base.config, init_params=base.params)
  reference = reference_variables(trainer, base.params)
  for rows in data.arrays.values():
    rows['ref_logprobs'] = response_logprobs_of(trainer, reference, rows)
  metrics = train_on_pairs(trainer, functools.partial(dpo_loss, beta=r.dpo_beta), data, cfg,
                           workdir, f', beta {r.dpo_beta}')
  if metrics.get('preempted'):
    return
  prompts = PromptSource(cfg, tok)
  eval_prompts = prompts.draw(r.eval_prompts, EVAL_KEY)
  with mesh_rules(trainer.mesh):
    report = lambda variables: sample_report(trainer.eval_model, variables, reference, tok.eos_id,
                                             tok.pad_id, prompts.task, eval_prompts, r, cfg.seed)
    summary = {'before': report(reference), 'after': report(trainer.variables()),
               'implicit_accuracy': metrics['eval_accuracy'], 'eval_loss': metrics['eval_loss']}
  if data.eval.gold_margin is not None:
    held_out = data.arrays['eval']
    implicit = response_logprobs_of(trainer, trainer.variables(), held_out)
    summary['implicit_gold_accuracy'] = gold_accuracy(implicit - held_out['ref_logprobs'], data.eval)
  write_summary(workdir, SUMMARY_FILE, summary)
  for name in ('before', 'after'):
    print(f'{name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary[name].items()), flush=True)
  print(f"implicit reward accuracy {summary['implicit_accuracy']:.4f} (held-out labels)"
        + (f", {summary['implicit_gold_accuracy']:.4f} (gold sign)"
           if 'implicit_gold_accuracy' in summary else ''), flush=True)
