"""Learning from preference pairs: the Bradley-Terry reward model and DPO (Rafailov et al. 2023),
as loss factories with train/objectives.py's contract (sums over pairs; the denominator is
batch['weights'].sum(), the number of real pairs).

Pair batch: the pair is its own axis, so the loop's micro-batch split never separates a chosen
row from its rejected row, and padding pairs have weight 0.
  tokens        [b, 2, t] int32  [BOS, prompt, response, EOS], right-padded; [:, 0] is the chosen
                                 row, [:, 1] the rejected one
  positions     [b, 2, t] int32  0.. over real tokens
  segment_ids   [b, 2, t] int32  1 on real tokens, 0 on padding
  response_mask [b, 2, t] f32    1 on response tokens (EOS included): what DPO scores
  weights       [b]       f32    1 per real pair
  ref_logprobs  [b, 2]    f32    DPO only: the reference's `response_logprobs`, precomputed
"""
from typing import Any, Callable, Sequence

import jax
import numpy as np

from model.errors import UserError
from model.heads import positions_from_mask, sequence_scores
from train.objectives import Batch, LossFn
from train.rl.core import sequence_logprobs

Array = jax.Array


def pair_batch(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
               prompt_lengths: Sequence[int], width: int, pad_id: int) -> dict[str, np.ndarray]:
  """The pair batch above from whole sequences; prompt_lengths[i] tokens (BOS and prompt) open
  both rows of pair i and are not response."""
  b = len(chosen)
  tokens = np.full((b, 2, width), pad_id, np.int32)
  real = np.zeros((b, 2, width), np.int32)
  response = np.zeros((b, 2, width), np.float32)
  for i, (pair, n_prompt) in enumerate(zip(zip(chosen, rejected), prompt_lengths)):
    for j, row in enumerate(pair):
      if len(row) > width:
        raise UserError(f'preference pair {i} has a {len(row)}-token sequence; raise the width '
                        f'({width}) or shorten the prompt or response')
      tokens[i, j, :len(row)] = row
      real[i, j, :len(row)] = 1
      response[i, j, n_prompt:len(row)] = 1
  return dict(tokens=tokens, positions=positions_from_mask(real), segment_ids=real,
              response_mask=response, weights=np.ones(b, np.float32))


def bradley_terry(chosen: Array, rejected: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  """-log σ(chosen - rejected) summed over pairs, and the sums of pairwise accuracy (strictly
  preferred), margin, and each side's value."""
  margin = chosen - rejected
  return -(jax.nn.log_sigmoid(margin) * weights).sum(), {
      'accuracy': ((margin > 0) * weights).sum(), 'margin': (margin * weights).sum(),
      'chosen_reward': (chosen * weights).sum(), 'rejected_reward': (rejected * weights).sum()}


def reward_model_loss(apply_fn: Callable[..., Array]) -> LossFn:
  """Bradley-Terry on the reward at each row's last real token (the EOS); apply_fn is a
  model/heads.py ScalarModel's."""
  def loss(params: Any, batch: Batch, rng: Array):
    rewards = sequence_scores(apply_fn, {'params': params}, batch['tokens'], batch['positions'],
                              batch['segment_ids'], rngs={'dropout': rng})
    return bradley_terry(rewards[:, 0], rewards[:, 1], batch['weights'])
  return loss


def response_logprobs(apply_fn: Callable[..., Array], variables: Any, batch: Batch,
                      **kwargs) -> Array:
  """Sequence log-prob [b, 2] of each row's response tokens under `variables`; with
  {'params': base} this is DPO's ref_logprobs (computed once, before training)."""
  logp, _ = sequence_logprobs(apply_fn, variables, batch, **kwargs)
  return (logp * batch['response_mask']).sum(-1)


def dpo_loss(apply_fn: Callable[..., Array], beta: float = 0.1) -> LossFn:
  """-log σ(β·((log π_c - log π_ref,c) - (log π_r - log π_ref,r))) per pair; the implicit rewards
  β·(log π - log π_ref) give the metrics (accuracy, margin, chosen/rejected reward)."""
  def loss(params: Any, batch: Batch, rng: Array):
    logp = response_logprobs(apply_fn, {'params': params}, batch, rngs={'dropout': rng})
    implicit = beta * (logp - batch['ref_logprobs'])
    return bradley_terry(implicit[:, 0], implicit[:, 1], batch['weights'])
  return loss


def score_stats(scores: np.ndarray) -> tuple[float, float]:
  """(mean, std) of reward-model scores on reference-policy samples: what `normalize_scores`
  removes, so the PPO reward starts centred with unit scale whatever the reward model's offset."""
  scores = np.asarray(scores, np.float64)
  return float(scores.mean()), float(scores.std())


def normalize_scores(scores: Array, stats: tuple[float, float], eps: float = 1e-8) -> Array:
  mean, std = stats
  return (scores - mean) / (std + eps)
