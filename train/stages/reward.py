"""Stage `reward`: a Bradley-Terry reward model on preference pairs, and the loader PPO uses.

  python run.py --config=experiments/rlhf_synthetic.py:reward --workdir=runs/rlhf/reward \\
      --config.pretrained=runs/rlhf/base

The model is the base LM's backbone with a scalar head read at each row's last real token
(model/heads.py), all weights or LoRA adapters plus the head trained. Held-out pairwise accuracy
is the eval metric (and, on the synthetic task, accuracy against the sign of the gold margin).
After training, the scores of reference-policy samples fix the normalisation (mean 0, std 1),
stored beside the checkpoint in reward_stats.json, so PPO's reward starts centred at unit scale.
"""
import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from model.errors import UserError
from model.heads import build_scalar_model, lm_backbone, sequence_scores
from model.jsonio import read_json
from model.pretrained import Pretrained
from train import checkpoint
from train.mesh import mesh_rules
from train.rl.preference import normalize_scores, reward_model_loss, score_stats
from train.stages.pairs import gold_accuracy, load_pair_data, over_pairs, per_host_batch, train_on_pairs
from train.stages.rollouts import STATS_KEY, PromptSource, rollout_rows, sample
from train.stages.sft import load_base
from train.trainer import Trainer, init_trainer
from train.workdir import read_config, write_summary

STATS_FILE = 'reward_stats.json'
SUMMARY_FILE = 'reward_summary.json'


@dataclasses.dataclass
class RewardModel:
  """A trained reward model and its normalisation; `scores` gives normalised sequence rewards."""
  trainer: Trainer
  stats: tuple[float, float]

  def raw_scores(self, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The scalar at each row's last real token, for rows [..., t] (rollouts or pairs)."""
    t = self.trainer
    with mesh_rules(t.mesh):
      return np.asarray(score_rows(t.eval_model.apply, t.variables(), rows['tokens'],
                                   rows['positions'], rows['segment_ids']))

  def scores(self, rows: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(normalize_scores(self.raw_scores(rows), self.stats))


@functools.partial(jax.jit, static_argnames='apply_fn')
def score_rows(apply_fn: Callable, variables: Any, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
  return sequence_scores(apply_fn, variables, tokens, positions, segment_ids)


def reward_trainer(cfg: ConfigDict, base_config: Any, base_params: Any) -> Trainer:
  """The reward model (or a critic) on the base: its backbone and a fresh score head."""
  return init_trainer(cfg, base_config.vocab_size, model_cfg=base_config,
                      init_params=lm_backbone(base_params), build=build_scalar_model,
                      fresh=('score_head',))


def load_reward_model(workdir: str) -> RewardModel:
  """The reward model a stage=reward run left in `workdir`, with its normalisation."""
  fix = (f'{workdir} is not a finished reward run; set rlhf.reward_model to the workdir of a '
         'completed stage=reward run')
  stats = read_json(os.path.join(workdir, STATS_FILE), fix)
  cfg = read_config(workdir)
  if cfg.stage != 'reward':
    raise UserError(f'{workdir} was trained by stage={cfg.stage!r}, not reward; point '
                    'rlhf.reward_model at a reward run')
  base = load_base(cfg)
  trainer = reward_trainer(cfg, base.config, base.params)
  trainer.state, _ = checkpoint.restore_latest(workdir, trainer.state)
  return RewardModel(trainer, (stats['mean'], stats['std']))


def reward_stage(cfg: ConfigDict, workdir: str) -> None:
  base = load_base(cfg)
  data = load_pair_data(cfg, base)
  reference = reference_samples(cfg, base)
  trainer = reward_trainer(cfg, base.config, base.params)
  del base
  metrics = train_on_pairs(trainer, reward_model_loss, data, cfg, workdir)
  if metrics.get('preempted'):
    return
  model = RewardModel(trainer, (0.0, 1.0))
  mean, std = score_stats(model.scores(reference))
  write_summary(workdir, STATS_FILE, {'mean': mean, 'std': std, 'samples': len(reference['tokens'])})
  summary = {'eval_accuracy': metrics['eval_accuracy'], 'eval_loss': metrics['eval_loss'],
             'score_mean': mean, 'score_std': std}
  if data.eval.gold_margin is not None:
    scores = over_pairs(model.raw_scores, data.arrays['eval'], per_host_batch(cfg))
    summary['gold_accuracy'] = gold_accuracy(scores, data.eval)
  write_summary(workdir, SUMMARY_FILE, summary)
  print('reward model: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary.items()), flush=True)


def reference_samples(cfg: ConfigDict, base: Pretrained) -> dict[str, np.ndarray]:
  """rlhf.stats_samples responses of the base (the PPO reference) to fresh prompts, as rollout
  rows: the samples that fix the score normalisation."""
  r, tok = cfg.rlhf, base.tokenizer
  prompts = PromptSource(cfg, tok).draw(r.stats_samples, STATS_KEY)
  tokens, lengths = sample(base.model, base.params, prompts, r.response_len, r.temperature,
                           cfg.seed + 1, tok.eos_id, tok.pad_id)
  return rollout_rows(prompts, tokens, lengths, tok.pad_id, max(map(len, prompts)) + r.response_len)
