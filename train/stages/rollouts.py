"""What the RLHF stages share: sampling responses from a policy, the reference policy, the rollout
layout at a fixed width, the task and its prompts (its pairs: train/stages/pairs.py), and the before/after report of a policy's
samples (KL and NLL under the reference, and the gold score where the task has one).

The reference is the base: under LoRA the policy's own frozen weights with the adapter switched
off (no second copy), else the weights `load_base` returned (the policy trains its own copy).
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from data.pairs import hh_pairs, prompts_of
from data.preferences import ChainTask, chain_task
from model.errors import UserError
from model.generate import generate_rows
from model.lora import merged_params
from model.sampling import Sampling
from train.rl.ppo import join_rollout
from train.rl.core import kl_k1, sequence_logprobs
from train.trainer import Trainer

Rows = dict[str, np.ndarray]
SAMPLE_CHUNK = 256  # prompts per generate call
EVAL_KEY, STATS_KEY, ITERATION_KEY = 0, 1, 2  # PromptSource.draw keys: report, normalisation, rollouts


def reference_variables(policy: Trainer, base_params: Any) -> dict[str, Any]:
  """The reference policy's variables: the frozen base (adapter off) under LoRA, else
  `base_params` laid out like the policy's weights (moved only where they live elsewhere)."""
  if policy.frozen is not None:
    return {'params': policy.frozen}
  return {'params': jax.device_put(base_params, policy.state_sharding.params)}


def sample(model: nn.Module, params: Any, prompts: list[np.ndarray] | np.ndarray, max_new: int,
           temperature: float, seed: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Responses to `prompts`: tokens [n, max_new] (EOS included where emitted, pad after) and
  lengths [n], generated in chunks of SAMPLE_CHUNK prompts."""
  rows = generate_rows(model, params, [list(p) for p in prompts], max_new_tokens=max_new,
                       rng=jax.random.PRNGKey(seed), chunk_size=SAMPLE_CHUNK, fold_chunk_start=True,
                       sampling=Sampling(temperature), stop_ids=(eos_id,), pad_id=pad_id).tokens
  tokens = np.full((len(rows), max_new), pad_id, np.int32)
  for out, row in zip(tokens, rows):
    out[:len(row)] = row
  return tokens, np.array([len(row) for row in rows], np.int32)


def sampler(model: nn.Module, params: Any, max_new: int, temperature: float, eos_id: int,
            pad_id: int) -> Callable[[list[np.ndarray] | np.ndarray, int], list[np.ndarray]]:
  """(prompts, seed) -> one response of the LM `params` (ids, EOS included when emitted) each."""
  def run(prompts, seed):
    tokens, lengths = sample(model, params, prompts, max_new, temperature, seed, eos_id, pad_id)
    return [row[:n] for row, n in zip(tokens, lengths)]
  return run


def rollout_rows(prompts: list[np.ndarray] | np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
                 pad_id: int, width: int) -> Rows:
  """train/rl/ppo.py's rollout layout, right-padded to `width` columns so every iteration's batch
  has one shape (one compilation)."""
  rows = join_rollout(prompts, tokens, lengths, pad_id)
  extra = width - rows['tokens'].shape[1]
  if extra < 0:
    raise UserError(f'rollouts of {rows["tokens"].shape[1]} tokens exceed the width {width}; '
                    'shorten the prompts or rlhf.response_len')
  return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == 'tokens' else 0)
          for k, v in rows.items()}


@functools.partial(jax.jit, static_argnames=('apply_fn', 'temperature'))
def token_logprobs_of(apply_fn: Callable, variables: Any, batch: Rows, temperature: float
                      ) -> tuple[jax.Array, jax.Array]:
  """(log-prob, entropy) of every token under `variables` at `temperature` (train/rl/core.py)."""
  return sequence_logprobs(apply_fn, variables, batch, temperature)


# ---- the task and its prompts --------------------------------------------------------------

def task_of(cfg: ConfigDict, tokenizer: Any) -> ChainTask | None:
  """The ground-truth task when rlhf.data is synthetic, else None."""
  if cfg.rlhf.data != 'synthetic':
    return None
  return chain_task(cfg.data.synthetic, cfg.rlhf.n_target, cfg.rlhf.illegal_penalty, tokenizer)


class PromptSource:
  """Prompts of rlhf.data, drawn by key: fresh chain prompts, or dialogues' prompts from the HH
  pairs (those that leave room for rlhf.response_len in train.seq_len). draw(n, *key) is a function
  of (config.seed, key), so a resumed run draws what the uninterrupted one would have."""

  def __init__(self, cfg: ConfigDict, tokenizer: Any):
    r = cfg.rlhf
    self.seed, self.prompt_len, self.task = cfg.seed, r.prompt_len, task_of(cfg, tokenizer)
    self.pool: list[np.ndarray] = []
    if self.task is not None:
      self.width = 1 + r.prompt_len
      return
    room = cfg.train.seq_len - r.response_len
    pairs = hh_pairs(r.data.removeprefix('hh:'), tokenizer, cfg.sft.template, cfg.train.seq_len,
                     r.pairs)
    self.pool = [p for p in prompts_of(pairs) if len(p) <= room]
    if not self.pool:
      raise UserError(f'no HH prompt fits in train.seq_len - rlhf.response_len = {room} tokens; '
                      'raise train.seq_len')
    self.width = max(map(len, self.pool))

  def draw(self, n: int, *key: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, 11, *key])
    if self.task is not None:
      return list(self.task.prompts(rng, n, self.prompt_len))
    return [self.pool[i] for i in rng.choice(len(self.pool), n, replace=n > len(self.pool))]


# ---- the report ---------------------------------------------------------------------------------

def sample_report(model: nn.Module, variables: dict[str, Any], reference: dict[str, Any],
                  eos: int, pad: int, task: ChainTask | None, prompts: list[np.ndarray],
                  r: ConfigDict, seed: int) -> dict[str, float]:
  """Statistics of one sample per prompt from the policy `variables` (at rlhf.temperature): KL to
  the reference (nats/response, k1 on the samples), NLL per token under the reference, length and
  EOS rate, and with a task the gold score, target-symbol share, legal rate and true-chain NLL.
  Run under the policy trainer's mesh."""
  tokens, lengths = sample(model, merged_params(variables, model.cfg), prompts, r.response_len,
                           r.temperature, seed, eos, pad)
  rows = rollout_rows(prompts, tokens, lengths, pad, max(map(len, prompts)) + r.response_len)
  logp, _ = token_logprobs_of(model.apply, variables, rows, r.temperature)
  ref_logp, _ = token_logprobs_of(model.apply, reference, rows, r.temperature)
  mask = rows['response_mask']
  out = {'kl': float((np.asarray(kl_k1(logp, ref_logp)) * mask).sum(1).mean()),
         'ref_nll': float(-(np.asarray(ref_logp) * mask).sum() / mask.sum()),
         'response_len': float(lengths.mean()), 'eos_rate': float((tokens == eos).any(1).mean())}
  if task is not None:
    responses = [t[:n] for t, n in zip(tokens, lengths)]
    out.update(gold_summary(task.measure(np.stack(prompts), responses)))
  return out


def gold_summary(m: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over responses of ChainTask.measure's figures; shares are over all symbols."""
  symbols = max(m['symbols'].sum(), 1.0)
  return {'gold': float(m['gold'].mean()), 'target_share': float(m['targets'].sum() / symbols),
          'legal_rate': float(1.0 - m['illegal'].sum() / symbols),
          'illegal_per_response': float(m['illegal'].mean()),
          'chain_nll': float(m['chain_nll'].sum() / symbols)}
