"""PPO (Ziegler et al. 2019; Ouyang et al. 2022) and GRPO (Shao et al. 2024) as pure pieces:
rollout layout, per-token rewards, GAE, and loss factories that follow train/objectives.py's
contract (loss SUM over response tokens, metric sums, aux['weight'] = response tokens).

Rollout batch ([b, t] each, aligned to tokens as train/rl/core.py describes):
  tokens       int32  prompt (left-padded) then response (right-padded)
  positions    int32  0.. over real tokens
  segment_ids  int32  1 on real tokens, 0 on padding
  response_mask f32   1 on generated tokens (stop token included)
  old_logprobs f32    log-probs under the policy that sampled the rollout
  advantages   f32    [b, t] for PPO (GAE, whitened); [b] per sequence for GRPO
  returns, old_values f32   critic targets and the critic's values at rollout time (PPO)
  ref_logprobs f32    reference log-probs (GRPO's KL term)
The actor and the critic are separate models with separate optimizers: two train steps.
"""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.heads import gather_last, last_token_index, positions_from_mask
from train.objectives import Batch, LossFn
from train.rl.core import kl_k3, masked_sum, sequence_logprobs, token_values

Array = jax.Array


def join_rollout(prompts: Sequence[Sequence[int]], responses: np.ndarray, lengths: np.ndarray,
                 pad_id: int) -> dict[str, np.ndarray]:
  """Prompts (token lists) and model/generate.py's output (tokens [b, n], lengths [b]) -> the
  rollout layout above, width max prompt + n: prompts left-padded so responses start together."""
  width = max(len(p) for p in prompts)
  b, n = responses.shape
  tokens = np.full((b, width + n), pad_id, np.int32)
  real = np.zeros((b, width + n), np.int32)
  response = np.zeros((b, width + n), np.float32)
  for i, prompt in enumerate(prompts):
    tokens[i, width - len(prompt):width] = prompt
    tokens[i, width:width + lengths[i]] = responses[i, :lengths[i]]
    real[i, width - len(prompt):width + lengths[i]] = 1
    response[i, width:width + lengths[i]] = 1
  return dict(tokens=tokens, positions=positions_from_mask(real), segment_ids=real,
              response_mask=response)


def ends_with(tokens: Array, response_mask: Array, stop_id: int) -> Array:
  """[b] bool: the response's last token is `stop_id` (it finished rather than ran out of room)."""
  return gather_last(tokens, last_token_index(response_mask)) == stop_id


def token_rewards(scores: Array, kl: Array, response_mask: Array, beta: float | Array,
                  finished: Array, no_stop_penalty: float = 0.0) -> Array:
  """Per-token rewards [b, t]: -β·kl on every response token, plus the sequence score [b] on the
  last response token, lowered by `no_stop_penalty` where the response did not finish."""
  scores = scores - no_stop_penalty * (~finished).astype(jnp.float32)
  last = jax.nn.one_hot(last_token_index(response_mask), kl.shape[-1], dtype=jnp.float32)
  return (-beta * kl + scores[:, None] * last) * response_mask


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float
        ) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over the masked tokens [b, t], a
  reverse lax.scan over time. Unmasked tokens are not time steps: the step after a response token
  is the next masked token, or the end (value 0). Returns (advantages, returns = adv + values)."""
  mask = mask.astype(jnp.float32)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    real = m > 0
    return (jnp.where(real, v, next_value), jnp.where(real, adv, next_adv)), adv * m

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def clipped_policy_terms(logp: Array, old_logp: Array, advantages: Array, mask: Array,
                         clip_eps: float) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate summed over masked tokens: max(-A·ρ, -A·clip(ρ, 1±ε)), ρ = π/π_old.
  Metric sums: clip_frac (tokens where the clipped term is the larger, so the gradient is zero)
  and approx_kl ((ρ - 1) - log ρ, the k3 estimate of KL(π_old || π))."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  return masked_sum(jnp.maximum(unclipped, clipped), mask), {
      'clip_frac': masked_sum((clipped > unclipped).astype(jnp.float32), mask),
      'approx_kl': masked_sum(jnp.expm1(log_ratio) - log_ratio, mask)}


def ppo_policy_loss(apply_fn: Callable[..., Array], clip_eps: float = 0.2,
                    entropy_coef: float = 0.0, temperature: float = 1.0) -> LossFn:
  """The actor's loss on a rollout batch: clipped surrogate - entropy_coef·entropy per response
  token. `temperature` must be the sampling temperature, so π_old and π are the same policy."""
  def loss(params: Any, batch: Batch, rng: Array):
    logp, entropy = sequence_logprobs(apply_fn, {'params': params}, batch, temperature,
                                      rngs={'dropout': rng})
    mask = batch['response_mask']
    pg, metrics = clipped_policy_terms(logp, batch['old_logprobs'], batch['advantages'], mask,
                                       clip_eps)
    ent = masked_sum(entropy, mask)
    return pg - entropy_coef * ent, {**metrics, 'policy_loss': pg, 'entropy': ent,
                                     'weight': mask.sum()}
  return loss


def ppo_value_loss(apply_fn: Callable[..., Array], clip_eps: float = 0.2,
                   vf_coef: float = 0.5) -> LossFn:
  """The critic's loss: vf_coef · ½ max((V - R)², (V_clip - R)²) per response token, with
  V_clip = V_old + clip(V - V_old, ±ε) (the PPO2 value clip). apply_fn is a ScalarModel's."""
  def loss(params: Any, batch: Batch, rng: Array):
    values = token_values(apply_fn, {'params': params}, batch, rngs={'dropout': rng})
    old, returns, mask = batch['old_values'], batch['returns'], batch['response_mask']
    clipped = old + jnp.clip(values - old, -clip_eps, clip_eps)
    unclipped_err, clipped_err = jnp.square(values - returns), jnp.square(clipped - returns)
    value_loss = 0.5 * masked_sum(jnp.maximum(unclipped_err, clipped_err), mask)
    return vf_coef * value_loss, {
        'value_loss': value_loss,
        'value_clip_frac': masked_sum((clipped_err > unclipped_err).astype(jnp.float32), mask),
        'weight': mask.sum()}
  return loss


def group_advantages(rewards: Array, eps: float = 1e-6, scale: bool = True) -> Array:
  """GRPO: each reward [n_prompts, group] relative to its prompt's group, (r - mean) / (std + eps)
  (population std); `scale=False` only centres (Dr. GRPO: no bias towards easy prompts)."""
  centred = rewards - rewards.mean(axis=-1, keepdims=True)
  return centred / (rewards.std(axis=-1, keepdims=True) + eps) if scale else centred


def grpo_loss(apply_fn: Callable[..., Array], clip_eps: float = 0.2, kl_coef: float = 0.0,
              temperature: float = 1.0) -> LossFn:
  """GRPO: PPO's clipped surrogate with one advantage per sequence (batch['advantages'] [b], from
  `group_advantages`) on every response token, no critic, plus kl_coef · k3 KL to the reference
  (batch['ref_logprobs']) when kl_coef > 0. Normalised per response token over the whole batch
  (DAPO's token-level mean: long responses are not down-weighted, micro-batches add exactly)."""
  def loss(params: Any, batch: Batch, rng: Array):
    logp, entropy = sequence_logprobs(apply_fn, {'params': params}, batch, temperature,
                                      rngs={'dropout': rng})
    mask = batch['response_mask']
    advantages = jnp.broadcast_to(batch['advantages'][:, None], mask.shape)
    pg, metrics = clipped_policy_terms(logp, batch['old_logprobs'], advantages, mask, clip_eps)
    metrics = {**metrics, 'policy_loss': pg, 'entropy': masked_sum(entropy, mask),
               'weight': mask.sum()}
    if not kl_coef:
      return pg, metrics
    kl = masked_sum(kl_k3(logp, batch['ref_logprobs']), mask)
    return pg + kl_coef * kl, {**metrics, 'kl': kl}
  return loss
