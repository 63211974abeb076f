"""The RL iteration loop shared by stages `ppo` and `grpo` (train/stages/ppo.py builds the roles,
train/stages/rl_variants.py holds what each variant changes): rollouts from the policy, scores
from a reward, clipped policy updates against a KL penalty to the reference, the hacking
detectors, checkpoints and metrics.

One iteration (train.steps of them): sample rlhf.rollout_batch responses at rlhf.temperature (cut
at EOS or rlhf.response_len), score each sequence with the normalised reward model at its last
token (minus rlhf.no_eos_penalty if it never ended), then rlhf.epochs passes of minibatches of
train.batch_size. PPO: per-token reward -beta * KL(policy || reference) (k1 or k3) plus the score
on the last token, GAE with a critic, whitened advantages, clipped policy and value losses, fixed
or adaptive beta. GRPO: rlhf.group_size samples per prompt, advantages relative to the group, no
critic, a k3 KL loss term weighted by beta.

Every iteration writes metrics.jsonl (score, KL, score - beta * KL, entropy, clip fraction,
approximate KL, value loss, response length, EOS rate, the hacking detectors, and on the synthetic
task the gold score, target share and illegal transitions per response). rl_summary.json holds
the reference's and the final policy's sample reports (train/stages/rollouts.py) on held-out prompts.
"""
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data.preferences import ChainTask
from model.errors import UserError
from model.lora import merged_params
from train import checkpoint
from train.rl.hacking import HackingThresholds, hacking_alarms, reward_disagreement
from train.step import make_train_step
from train.mesh import global_batch, mesh_rules
from train.metrics import MetricWriter
from train.workdir import write_summary
from train.rl.ppo import ends_with
from train.rl.core import KL_ESTIMATORS, AdaptiveKL, FixedKL, kl_k1
from train.stages.rl_variants import VARIANTS, Variant
from train.stages.rollouts import (EVAL_KEY, ITERATION_KEY, PromptSource, Rows, gold_summary,
                                  rollout_rows, sample, sample_report, token_logprobs_of)
from train.trainer import Trainer

SUMMARY_FILE = 'rl_summary.json'


@dataclasses.dataclass
class RlRun:
  """The roles of one RL run: actor, critic (PPO only), reference variables and reward."""
  algo: str                                 # a key of VARIANTS: 'ppo' | 'grpo'
  policy: Trainer
  critic: Trainer | None
  reference: dict[str, Any]
  reward: Callable[[Rows], np.ndarray]      # normalised score [b] of rollout rows
  r: ConfigDict                             # config.rlhf
  eos_id: int
  pad_id: int
  task: ChainTask | None = None
  second_reward: Callable[[Rows], np.ndarray] | None = None

  @property
  def variant(self) -> Variant:
    return VARIANTS[self.algo]


def rollout(run: RlRun, prompts: list[np.ndarray], width: int, seed: int) -> Rows:
  """Samples of the policy as rollout rows, with the policy's log-probs and entropy and the
  reference's log-probs per token (all at rlhf.temperature) and the normalised scores."""
  r, p = run.r, run.policy
  variables = p.variables()
  with mesh_rules(p.mesh):
    tokens, lengths = sample(p.eval_model, merged_params(variables, p.model_cfg), prompts,
                             r.response_len, r.temperature, seed, run.eos_id, run.pad_id)
    rows = rollout_rows(prompts, tokens, lengths, run.pad_id, width)
    logp, entropy = token_logprobs_of(p.eval_model.apply, variables, rows, r.temperature)
    ref_logp, _ = token_logprobs_of(p.eval_model.apply, run.reference, rows, r.temperature)
  return {**rows, 'old_logprobs': np.asarray(logp), 'entropy': np.asarray(entropy),
          'ref_logprobs': np.asarray(ref_logp), 'scores': run.reward(rows),
          'finished': np.asarray(ends_with(rows['tokens'], rows['response_mask'], run.eos_id))}


def rollout_stats(run: RlRun, rows: Rows, penalty: np.ndarray, prompts: list[np.ndarray],
                  beta: float) -> dict[str, float]:
  """Per-iteration figures of the rollout: KL is k1 per response (the estimate of the sequence
  KL), kl_penalty the configured estimator's sum; NLL and entropy are per response token."""
  mask, scores = rows['response_mask'], rows['scores']
  per_token = lambda x: float((x * mask).sum() / mask.sum())
  lengths = mask.sum(1)
  kl_penalty = float(penalty.sum(1).mean())
  stats = {'score': float(scores.mean()),
           'kl': float((kl_k1(rows['old_logprobs'], rows['ref_logprobs']) * mask).sum(1).mean()),
           'kl_penalty': kl_penalty, 'objective': float(scores.mean()) - beta * kl_penalty,
           'entropy': per_token(rows['entropy']), 'ref_nll': -per_token(rows['ref_logprobs']),
           'response_len': float(lengths.mean()), 'eos_rate': float(rows['finished'].mean()),
           'beta': beta}
  if run.task is not None:
    responses = [row[m > 0] for row, m in zip(rows['tokens'], mask)]
    stats.update(gold_summary(run.task.measure(np.stack(prompts), responses)))
  if run.second_reward is not None:
    stats['disagreement'] = reward_disagreement(scores, run.second_reward(rows))
  return stats


def collect(run: RlRun, prompts: list[np.ndarray], width: int, seed: int, beta: float
            ) -> tuple[Rows, dict[str, float]]:
  """One rollout batch with everything the update needs, and its statistics."""
  rows = rollout(run, prompts, width, seed)
  mask = rows['response_mask']
  penalty = np.asarray(KL_ESTIMATORS[run.r.kl_estimator](rows['old_logprobs'],
                                                         rows['ref_logprobs'])) * mask
  targets = run.variant.targets(run.critic, run.r, rows, penalty, beta)
  stats = rollout_stats(run, rows, penalty, prompts, beta)
  keep = ('tokens', 'positions', 'segment_ids', 'response_mask', 'old_logprobs', 'ref_logprobs')
  return {**{k: rows[k] for k in keep}, **targets}, stats


def update(run: RlRun, steps: tuple[Callable, Callable | None], batch: Rows, seed: int
           ) -> dict[str, float]:
  """rlhf.epochs passes of shuffled minibatches (train.batch_size rows): one actor step and, for
  PPO, one critic step each. Returns the mean of the steps' metrics, named actor_* and critic_*
  (apart from the rollout's own statistics of the same names, e.g. entropy and kl)."""
  size, n = run.policy.cfg.train.batch_size, len(batch['tokens'])
  rng, key = np.random.default_rng(seed), jax.random.PRNGKey(seed)
  roles = [(t, step, name) for t, step, name in zip((run.policy, run.critic), steps,
                                                     ('actor_', 'critic_')) if step is not None]
  totals: dict[str, list[jax.Array]] = {}
  for _ in range(run.r.epochs):
    order = rng.permutation(n)
    for start in range(0, n, size):
      mini = {k: v[order[start:start + size]] for k, v in batch.items()}
      for trainer, step, prefix in roles:
        with mesh_rules(trainer.mesh):
          trainer.state, m = step(trainer.state, global_batch(mini, trainer.mesh), key)
        for k, v in m.items():
          totals.setdefault(prefix + k, []).append(v)
  # One fetch per iteration (the steps stay queued on the device), stacked per metric.
  fetched = jax.device_get({k: jnp.stack(v) for k, v in totals.items()})
  return {k: float(np.mean([float(x) for x in v])) for k, v in fetched.items()}


def train_steps(run: RlRun) -> tuple[Callable, Callable | None]:
  """The actor's (and, for a variant with a critic, the critic's) jitted train step."""
  v, r = run.variant, run.r
  critic = make_train_step(run.critic, v.critic_loss(r)) if v.has_critic else None
  return make_train_step(run.policy, v.actor_loss(r)), critic


def check_settings(r: ConfigDict, variant: Variant, batch_size: int) -> None:
  if r.rollout_batch % batch_size:
    raise UserError(f'train.batch_size={batch_size} (the minibatch) must divide '
                    f'rlhf.rollout_batch={r.rollout_batch}')
  if variant.grouped and (r.group_size < 2 or r.rollout_batch % r.group_size):
    raise UserError(f'rlhf.group_size={r.group_size} must be at least 2 and divide '
                    f'rlhf.rollout_batch={r.rollout_batch}')
  if r.kl_estimator not in KL_ESTIMATORS:
    raise UserError(f'rlhf.kl_estimator={r.kl_estimator!r} is not one of {", ".join(KL_ESTIMATORS)}')


class Checkpoints:
  """The actor's checkpoints in the workdir (so load_pretrained reads the policy), the critic's in
  workdir/critic; the metadata carries beta, which the adaptive controller changes."""

  def __init__(self, workdir: str, keep: int):
    self.managers = {role: checkpoint.make_manager(path, keep, False)
                     for role, path in (('policy', workdir), ('critic', os.path.join(workdir, 'critic')))}

  def restore(self, run: RlRun, beta: float) -> tuple[int, float]:
    """(iteration, beta) of the latest checkpoint, restored into the run; (0, beta) if none."""
    latest = self.managers['policy'].latest_step()
    if latest is None:
      return 0, beta
    run.policy.state, meta = checkpoint.restore(self.managers['policy'], latest, run.policy.state)
    if run.critic is not None:
      run.critic.state, _ = checkpoint.restore(self.managers['critic'], latest, run.critic.state)
    print(f'resumed from iteration {latest}', flush=True)
    return latest, meta['beta']

  def save(self, run: RlRun, step: int, beta: float) -> None:
    checkpoint.save(self.managers['policy'], step, run.policy.state, {'step': step, 'beta': beta})
    if run.critic is not None:
      checkpoint.save(self.managers['critic'], step, run.critic.state, {'step': step})

  def close(self) -> None:
    for m in self.managers.values():
      m.wait_until_finished()
      m.close()


def iteration_seed(seed: int, step: int) -> int:
  return seed * 100_003 + step


def train_rl(run: RlRun, prompts: PromptSource, workdir: str, steps: int, seed: int
             ) -> dict[str, Any]:
  """Iterations 1..steps (resuming from workdir's checkpoint), with the hacking detectors; returns
  the summary also written to rl_summary.json."""
  r, policy = run.r, run.policy
  check_settings(r, run.variant, policy.cfg.train.batch_size)
  thresholds = HackingThresholds(r.max_kl, r.nll_margin, r.max_disagreement)
  controller = AdaptiveKL(r.kl_target, r.kl_horizon) if r.kl_target > 0 else FixedKL()
  eval_prompts = prompts.draw(r.eval_prompts, EVAL_KEY)
  report = lambda variables: sample_report(policy.eval_model, variables, run.reference, run.eos_id,
                                           run.pad_id, run.task, eval_prompts, r, seed)
  with mesh_rules(policy.mesh):
    before = report(run.reference)
  ckpt = Checkpoints(workdir, policy.cfg.checkpoint.keep)
  start, beta = ckpt.restore(run, r.beta)
  group = r.group_size if run.variant.grouped else 1
  width = prompts.width + r.response_len
  step_fns = train_steps(run)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, config=policy.cfg)
  streak, first_alarm, stopped, step = 0, None, None, start
  try:
    for step in range(start + 1, steps + 1):
      batch_prompts = [p for p in prompts.draw(r.rollout_batch // group, ITERATION_KEY, step)
                       for _ in range(group)]
      batch, stats = collect(run, batch_prompts, width, iteration_seed(seed, step), beta)
      stats.update(update(run, step_fns, batch, iteration_seed(seed, step)))
      alarms = hacking_alarms(thresholds, stats['kl'], stats['ref_nll'], before['ref_nll'],
                              stats.get('disagreement'))
      stats['alarms'] = len(alarms)
      streak = streak + 1 if alarms else 0
      writer.write(step, stats)
      if step % policy.cfg.train.log_every == 0 or step == steps:
        print(iteration_line(step, stats), flush=True)
      beta = controller.update(beta, stats['kl'], r.rollout_batch)
      if streak == r.hacking_patience:  # sustained: report it once
        first_alarm = step if first_alarm is None else first_alarm
        print(f'iteration {step}: hacking alarm: ' + ' | '.join(alarms), flush=True)
      if streak >= r.hacking_patience and r.stop_on_hacking:
        stopped = alarms
        break
      if policy.cfg.checkpoint.every_steps and step % policy.cfg.checkpoint.every_steps == 0:
        ckpt.save(run, step, beta)
    if step > start:
      ckpt.save(run, step, beta)
  finally:
    writer.close()
    ckpt.close()
  with mesh_rules(policy.mesh):
    after = report(policy.variables())
  summary = {'algo': run.algo, 'before': before, 'after': after, 'iterations': step,
             'first_alarm': first_alarm, 'stopped': stopped}
  write_summary(workdir, SUMMARY_FILE, summary)
  return summary


def iteration_line(step: int, s: dict[str, float]) -> str:
  keys = ('score', 'kl', 'objective', 'entropy', 'gold', 'target_share', 'illegal_per_response',
          'response_len', 'eos_rate', 'actor_clip_frac', 'critic_value_loss', 'alarms')
  return f'iteration {step}: ' + ', '.join(f'{k} {s[k]:.3f}' for k in keys if k in s)
