"""The RL variants as a table: what PPO and GRPO change in the shared loop (train/stages/rl_loop.py),
one row each, instead of `algo == ...` branches.

A row holds whether rollouts come in groups per prompt, how a rollout batch becomes advantages (and
the critic's returns), the actor's loss and the critic's (None: no critic is built or trained).
A new variant is one more row (and its STAGES entry): Dr. GRPO, for instance, is GRPO's row with
`group_targets(..., scale=False)` (centred, not divided by the group's std); DAPO is GRPO's row with
an asymmetric clip in its actor loss (and dynamic sampling in its targets).
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from train.mesh import mesh_rules
from train.objectives import LossFn
from train.rl.core import token_values, whiten
from train.rl.ppo import gae, group_advantages, grpo_loss, ppo_policy_loss, ppo_value_loss, token_rewards
from train.stages.rollouts import Rows
from train.trainer import Trainer

Objective = Callable[[Callable], LossFn]  # a loss factory of the model's apply function


@functools.partial(jax.jit, static_argnames=('apply_fn',))
def critic_values(apply_fn: Callable, variables: dict, rows: Rows) -> jax.Array:
  return token_values(apply_fn, variables, rows)


@functools.partial(jax.jit, static_argnames=('gamma', 'lam'))
def ppo_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                   lam: float) -> tuple[jax.Array, jax.Array]:
  """GAE advantages (whitened over the response tokens) and returns."""
  adv, returns = gae(rewards, values, mask, gamma, lam)
  return whiten(adv, mask), returns


def ppo_targets(critic: Trainer | None, r: ConfigDict, rows: Rows, penalty: np.ndarray,
                beta: float) -> Rows:
  """PPO's per-token rewards (score on the last token, -beta * KL on each), critic values, GAE
  advantages and returns."""
  mask = rows['response_mask']
  with mesh_rules(critic.mesh):
    values = critic_values(critic.eval_model.apply, critic.variables(), rows) * mask
  rewards = token_rewards(jnp.asarray(rows['scores']), penalty, mask, beta, rows['finished'],
                          r.no_eos_penalty)
  adv, returns = ppo_advantages(rewards, values, mask, r.gamma, r.lam)
  return {'advantages': np.asarray(adv), 'returns': np.asarray(returns),
          'old_values': np.asarray(values)}


def group_targets(critic: Trainer | None, r: ConfigDict, rows: Rows, penalty: np.ndarray,
                  beta: float, scale: bool = True) -> Rows:
  """GRPO's advantage per response: its penalised score relative to its prompt's group (the KL is
  a loss term, not a reward)."""
  total = rows['scores'] - r.no_eos_penalty * ~rows['finished']
  grouped = jnp.asarray(total).reshape(-1, r.group_size)
  return {'advantages': np.asarray(group_advantages(grouped, scale=scale).reshape(-1))}


@dataclasses.dataclass(frozen=True)
class Variant:
  """What one RL algorithm changes in the loop."""
  grouped: bool  # rlhf.group_size samples per prompt
  targets: Callable[[Trainer | None, ConfigDict, Rows, np.ndarray, float], Rows]
  actor_loss: Callable[[ConfigDict], Objective]
  critic_loss: Callable[[ConfigDict], Objective] | None = None

  @property
  def has_critic(self) -> bool:
    return self.critic_loss is not None


VARIANTS: dict[str, Variant] = {
    'ppo': Variant(
        grouped=False, targets=ppo_targets,
        actor_loss=lambda r: lambda apply_fn: ppo_policy_loss(apply_fn, r.clip_eps, r.entropy_coef,
                                                              r.temperature),
        critic_loss=lambda r: lambda apply_fn: ppo_value_loss(apply_fn, r.value_clip_eps)),
    'grpo': Variant(
        grouped=True, targets=group_targets,
        actor_loss=lambda r: lambda apply_fn: grpo_loss(apply_fn, r.clip_eps, r.beta, r.temperature)),
}
