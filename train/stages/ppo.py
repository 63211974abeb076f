"""Stages `ppo` and `grpo`: the policy, reference, critic and reward model built from the config,
then train/stages/rl_loop.py's iterations.

  python run.py --config=experiments/rlhf_synthetic.py:ppo --workdir=runs/rlhf/ppo \\
      --config.pretrained=runs/rlhf/base --config.rlhf.reward_model=runs/rlhf/reward

The policy starts from config.pretrained; the reference is that base (under LoRA the policy's own
frozen weights with the adapter off); the critic (PPO) is a ScalarModel started from the reward
model (rlhf.critic_from_reward) with its own optimizer at rlhf.critic_lr; rlhf.second_reward_model
adds the two-reward-model disagreement detector.
"""
from typing import Any

import jax
from ml_collections import ConfigDict

from model.errors import UserError
from train.stages.reward import RewardModel, load_reward_model, reward_trainer
from train.stages.rl_loop import RlRun, train_rl
from train.stages.rl_variants import VARIANTS
from train.stages.rollouts import PromptSource, reference_variables
from train.stages.sft import load_base
from train.trainer import Trainer, inference_params, init_trainer


def critic_trainer(cfg: ConfigDict, base: Any, reward: RewardModel) -> Trainer:
  """The critic: the reward model's weights (rlhf.critic_from_reward) or the base backbone with a
  fresh head, trained at rlhf.critic_lr with its own optimizer."""
  critic_cfg = ConfigDict(cfg.to_dict())
  critic_cfg.train.lr = cfg.rlhf.critic_lr or cfg.train.lr
  if not cfg.rlhf.critic_from_reward:
    return reward_trainer(critic_cfg, base.config, base.params)
  rm = reward.trainer
  full = inference_params(rm)
  critic = reward_trainer(critic_cfg, base.config,
                          {k: v for k, v in full.items() if k != 'score_head'})
  head = jax.device_put(full['score_head'], critic.state_sharding.params['score_head'],
                        may_alias=False)  # the critic's steps donate it; the reward model keeps its own
  critic.state = critic.state.replace(params={**critic.state.params, 'score_head': head})
  return critic


def rl_stage(cfg: ConfigDict, workdir: str, algo: str) -> None:
  r = cfg.rlhf
  if not r.reward_model:
    raise UserError(f'stage={algo} needs a reward model: set rlhf.reward_model to a stage=reward '
                    'workdir')
  base = load_base(cfg)
  tok = base.tokenizer
  policy = init_trainer(cfg, base.config.vocab_size, model_cfg=base.config, init_params=base.params)
  reward = load_reward_model(r.reward_model)
  second = load_reward_model(r.second_reward_model) if r.second_reward_model else None
  critic = critic_trainer(cfg, base, reward) if VARIANTS[algo].has_critic else None
  prompts = PromptSource(cfg, tok)
  run = RlRun(algo, policy, critic, reference_variables(policy, base.params), reward.scores, r,
              tok.eos_id, tok.pad_id, prompts.task, second.scores if second else None)
  summary = train_rl(run, prompts, workdir, cfg.train.steps, cfg.seed)
  for name in ('before', 'after'):
    print(f'{name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in summary[name].items()), flush=True)


def ppo_stage(cfg: ConfigDict, workdir: str) -> None:
  rl_stage(cfg, workdir, 'ppo')


def grpo_stage(cfg: ConfigDict, workdir: str) -> None:
  rl_stage(cfg, workdir, 'grpo')
