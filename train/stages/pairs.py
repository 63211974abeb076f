"""What stages `reward` and `dpo` share: rlhf.data's preference pairs (train and held-out) as pair
rows at train.seq_len, the training run over them, and a pair scorer's accuracy against the gold
sign on the synthetic task."""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from data.pairs import PairIterator, Pairs, eval_batches, hh_pairs, split_pairs, synthetic_pairs
from model.errors import UserError
from model.pretrained import Pretrained
from train.loop import run_training
from train.rl.preference import pair_batch
from train.stages.rollouts import Rows, sampler, task_of
from train.trainer import Trainer


def preference_pairs(cfg: ConfigDict, base: Pretrained) -> tuple[Pairs, Pairs]:
  """(train, held-out) pairs of rlhf.data; synthetic ones are sampled from the base."""
  r, tok = cfg.rlhf, base.tokenizer
  if r.data == 'synthetic':
    sample_base = sampler(base.model, base.params, r.response_len, r.temperature, tok.eos_id,
                          tok.pad_id)
    pairs = synthetic_pairs(task_of(cfg, tok), sample_base, r.pairs, r.prompt_len,
                            r.label_temperature, cfg.seed)
  elif r.data.startswith('hh:'):
    pairs = hh_pairs(r.data.removeprefix('hh:'), tok, cfg.sft.template, cfg.train.seq_len, r.pairs)
  else:
    raise UserError(f"rlhf.data={r.data!r} is not valid; use synthetic or hh:GLOB")
  return split_pairs(pairs, r.eval_pairs)


@dataclasses.dataclass
class PairData:
  """The (train, held-out) pairs and their rows (train/rl/preference.py `pair_batch`) under 'train'
  and 'eval'; a stage may add per-pair columns to the rows before training (DPO: the reference's
  log-probs)."""
  train: Pairs
  eval: Pairs
  arrays: dict[str, Rows]


def load_pair_data(cfg: ConfigDict, base: Pretrained) -> PairData:
  train, held_out = preference_pairs(cfg, base)
  arrays = {name: pair_batch(p.chosen, p.rejected, p.prompt_lengths, cfg.train.seq_len,
                             base.tokenizer.pad_id)
            for name, p in (('train', train), ('eval', held_out))}
  return PairData(train, held_out, arrays)


def per_host_batch(cfg: ConfigDict) -> int:
  """Pairs per host in a train batch (and the default eval batch)."""
  return cfg.train.batch_size // jax.process_count()


def train_on_pairs(trainer: Trainer, objective: Callable, data: PairData, cfg: ConfigDict,
                   workdir: str, note: str = '') -> dict[str, float]:
  """The training loop over the pairs: this host's shard of the shuffled train pairs (resumable),
  the held-out pairs as eval batches padded with weight 0; prints a line about the data first."""
  per_host = per_host_batch(cfg)
  train_iter = PairIterator(data.arrays['train'], per_host, cfg.seed, jax.process_index(),
                            jax.process_count())
  evals = eval_batches(data.arrays['eval'], cfg.eval.batch_size or per_host)
  print(f'{cfg.stage} data: {len(data.train.chosen)} train / {len(data.eval.chosen)} held-out pairs '
        f'({cfg.rlhf.data}){note}', flush=True)
  return run_training(trainer, objective, train_iter, evals, workdir,
                      {'train_pairs': len(data.train.chosen)})


def over_pairs(fn: Callable[[Rows], Any], arrays: Rows, batch_size: int) -> np.ndarray:
  """`fn` of every pair's rows, in batches of `batch_size` pairs (the last padded): [n, ...]."""
  return np.concatenate([np.asarray(fn(b)) for b in eval_batches(arrays, batch_size)]
                        )[:len(arrays['weights'])]


def gold_accuracy(scores: np.ndarray, pairs: Pairs) -> float:
  """Share of held-out pairs with a gold winner that `scores` [n, 2] (chosen, rejected) order like
  the gold score."""
  decided = pairs.gold_margin != 0
  agree = (scores[:, 0] > scores[:, 1]) == (pairs.gold_margin > 0)
  return float(agree[decided].mean())
