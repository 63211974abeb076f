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
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from data.pairs import PairIterator, eval_batches
from train.loop import Trainer, init_trainer, run_training
from train.mesh import global_batch, mesh_rules
from train.rl.preference import dpo_loss, pair_batch, response_logprobs
from train.stages.reward import gold_accuracy
from train.stages.rollouts import (EVAL_KEY, PromptSource, preference_pairs, reference_variables,
                            sample_report)
from train.stages.sft import load_base

SUMMARY_FILE = 'dpo_summary.json'


@functools.partial(jax.jit, static_argnames='apply_fn')
def pair_logprobs(apply_fn: Callable, variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
  return response_logprobs(apply_fn, variables, batch)


def response_logprobs_of(trainer: Trainer, variables: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> np.ndarray:
  """Sequence log-probs [n, 2] of every pair's responses under `variables`."""
  size = trainer.cfg.train.batch_size
  out = []
  with mesh_rules(trainer.mesh):
    for batch in eval_batches(arrays, size):
      out.append(np.asarray(pair_logprobs(trainer.eval_model.apply, variables,
                                          global_batch(batch, trainer.mesh))))
  return np.concatenate(out)[:len(arrays['weights'])]


def dpo_stage(cfg: ConfigDict, workdir: str) -> None:
  r, t = cfg.rlhf, cfg.train
  base = load_base(cfg)
  tok = base.tokenizer
  train_pairs, eval_pairs = preference_pairs(cfg, base)
  trainer = init_trainer(cfg, base.config.vocab_size, model_cfg=base.config, init_params=base.params)
  reference = reference_variables(trainer, base.params)
  arrays = {}
  for name, pairs in (('train', train_pairs), ('eval', eval_pairs)):
    arrays[name] = pair_batch(pairs.chosen, pairs.rejected, pairs.prompt_lengths, t.seq_len,
                              tok.pad_id)
    arrays[name]['ref_logprobs'] = response_logprobs_of(trainer, reference, arrays[name])
  per_host = t.batch_size // jax.process_count()
  train_iter = PairIterator(arrays['train'], per_host, cfg.seed, jax.process_index(),
                            jax.process_count())
  evals = eval_batches(arrays['eval'], cfg.eval.batch_size or per_host)
  print(f'dpo data: {len(train_pairs.chosen)} train / {len(eval_pairs.chosen)} held-out pairs '
        f'({r.data}), beta {r.dpo_beta}', flush=True)
  metrics = run_training(trainer, functools.partial(dpo_loss, beta=r.dpo_beta), train_iter, evals,
                         workdir, {'train_pairs': len(train_pairs.chosen)})
  if metrics.get('preempted'):
    return
  prompts = PromptSource(cfg, tok)
  eval_prompts = prompts.draw(r.eval_prompts, EVAL_KEY)
  with mesh_rules(trainer.mesh):
    report = lambda variables: sample_report(trainer.eval_model, variables, reference, tok.eos_id,
                                             tok.pad_id, prompts.task, eval_prompts, r, cfg.seed)
    summary = {'before': report(reference), 'after': report(trainer.variables()),
               'implicit_accuracy': metrics['eval_accuracy'], 'eval_loss': metrics['eval_loss']}
  if eval_pairs.gold_margin is not None:
    implicit = response_logprobs_of(trainer, trainer.variables(), arrays['eval'])
    summary['implicit_gold_accuracy'] = gold_accuracy(implicit - arrays['eval']['ref_logprobs'],
                                                      eval_pairs)
  with open(os.path.join(workdir, SUMMARY_FILE), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  for name in ('before', 'after'):
    print(f'{name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary[name].items()), flush=True)
  print(f"implicit reward accuracy {summary['implicit_accuracy']:.4f} (held-out labels)"
        + (f", {summary['implicit_gold_accuracy']:.4f} (gold sign)"
           if 'implicit_gold_accuracy' in summary else ''), flush=True)
