"""The RLHF stages' machinery on tiny models: KL is exactly 0 at the first PPO step, the LoRA
reference is the base, the hacking alarms fire without a KL penalty and stay quiet with the
default one, pair iterators resume exactly, and the four stages run end to end."""
import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from data.pairs import PairIterator, eval_batches
from experiments import rlhf_synthetic
from experiments.base import get_config
from model.heads import build_scalar_model, lm_backbone
from model.transformer import build_model
from tests.helpers import tiny_config
from train.loop import init_trainer
from train.mesh import global_batch, mesh_rules
from train.stages.rl_loop import RlRun, collect, train_rl, train_steps, update
from train.stages import STAGES
from train.stages.rollouts import reference_variables, rollout_rows, token_logprobs_of

VOCAB, PAD = 16, 0
EOS = VOCAB  # no token: every response runs to rlhf.response_len
TARGET = np.array([5, 6, 7, 8])  # the tokens the exploitable reward counts


@dataclasses.dataclass(frozen=True)
class RandomPrompts:
  """PromptSource's interface: BOS-free random prompts of 4 tokens, drawn by key."""
  width: int = 4

  def draw(self, n, *key):
    rng = np.random.default_rng([7, *key])
    return list(rng.integers(3, VOCAB, (n, self.width)).astype(np.int32))


def target_count(rows):
  """An exploitable reward: 0.1 per target token in the response, whatever it costs in fluency
  (with the default beta = 0.2 the optimum multiplies a target token's odds by e^0.5, a KL of
  ~0.3 nats/response; with beta = 0 nothing stops the policy)."""
  hits = np.isin(rows['tokens'], TARGET) * rows['response_mask']
  return 0.1 * hits.sum(1)


def rl_config(lora: bool = False, beta: float | None = None):
  cfg = tiny_config()
  cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 16, 1e-3, 0
  cfg.train.schedule, cfg.train.weight_decay = 'constant', 0.0
  r = cfg.rlhf
  r.rollout_batch, r.epochs, r.response_len, r.eval_prompts = 32, 2, 8, 32
  r.no_eos_penalty = 0.0
  r.beta = r.beta if beta is None else beta
  if lora:
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8.0, 'all'
  return cfg


def base_params(cfg):
  """A peaked random LM (weights scaled up), standing in for a pretrained base."""
  plain = rl_config()
  params = init_trainer(plain, VOCAB, devices=jax.devices()[:1]).state.params
  return jax.tree.map(lambda x: np.asarray(x) * 3.0, jax.device_get(params))


def tiny_run(cfg, params, reward=target_count) -> RlRun:
  devices = jax.devices()[:1]
  policy = init_trainer(cfg, VOCAB, devices, init_params=params)
  critic = init_trainer(rl_config(), VOCAB, devices, init_params=lm_backbone(params),
                        build=build_scalar_model, fresh=('score_head',))
  return RlRun('ppo', policy, critic, reference_variables(policy, params), reward, cfg.rlhf, EOS,
               PAD)


def assert_first_step_kl_is_zero(run: RlRun) -> None:
  """Policy == reference before any update: not small, exactly 0, and so is the penalty."""
  batch, stats = collect(run, RandomPrompts().draw(32, 0), 4 + 8, seed=0, beta=0.1)
  assert stats['kl'] == 0.0 and stats['kl_penalty'] == 0.0
  assert stats['objective'] == stats['score']
  assert batch['response_mask'].sum() == 32 * 8


def test_kl_is_exactly_zero_at_the_first_ppo_step():
  cfg = rl_config()
  assert_first_step_kl_is_zero(tiny_run(cfg, base_params(cfg)))


def test_ppo_update_fetches_metrics_once_per_iteration(monkeypatch):
  """rlhf.epochs x minibatches of actor and critic steps, one device_get for all their metrics;
  the means equal those of fetching after every step (from the same start)."""
  cfg = rl_config()
  params = base_params(cfg)
  run = tiny_run(cfg, params)
  batch, _ = collect(run, RandomPrompts().draw(32, 0), 4 + 8, seed=0, beta=0.1)
  steps = train_steps(run)
  calls = []
  fetch = jax.device_get
  monkeypatch.setattr(jax, 'device_get', lambda x: calls.append(1) or fetch(x))
  means = update(run, steps, batch, seed=3)
  monkeypatch.undo()
  assert len(calls) == 1 and len(means) > 4 and 'critic_loss' in means
  fresh = tiny_run(cfg, params)  # the same start (the steps donated the first run's buffers)
  rng, key, totals = np.random.default_rng(3), jax.random.PRNGKey(3), {}
  for _ in range(cfg.rlhf.epochs):
    order = rng.permutation(len(batch['tokens']))
    for i in range(0, len(order), cfg.train.batch_size):
      mini = {k: v[order[i:i + cfg.train.batch_size]] for k, v in batch.items()}
      for trainer, step, prefix in ((fresh.policy, steps[0], 'actor_'), (fresh.critic, steps[1], 'critic_')):
        with mesh_rules(trainer.mesh):
          trainer.state, m = step(trainer.state, global_batch(mini, trainer.mesh), key)
        for k, v in jax.device_get(m).items():
          totals.setdefault(prefix + k, []).append(float(v))
  assert means == {k: float(np.mean(v)) for k, v in totals.items()}


def test_lora_reference_is_the_base_with_the_adapter_off():
  cfg = rl_config(lora=True)
  params = base_params(cfg)
  run = tiny_run(cfg, params)
  policy = run.policy
  assert run.reference['params'] is policy.frozen  # no second copy of the weights
  assert_first_step_kl_is_zero(run)  # the adapter starts at exactly zero
  # move the adapters away from zero, as training does
  rng = np.random.default_rng(0)
  policy.state = policy.state.replace(params=jax.tree.map(
      lambda x: x + 0.3 * rng.normal(size=x.shape).astype(x.dtype), policy.state.params))
  prompts = RandomPrompts().draw(8, 1)
  tokens = np.random.default_rng(1).integers(3, VOCAB, (8, 6)).astype(np.int32)
  rows = rollout_rows(prompts, tokens, np.full(8, 6), PAD, 10)
  base_model = build_model(dataclasses.replace(policy.model_cfg, lora_rank=0, lora_targets=()))
  with mesh_rules(policy.mesh):
    ref, _ = token_logprobs_of(policy.eval_model.apply, run.reference, rows, 1.0)
    base, _ = token_logprobs_of(base_model.apply, {'params': params}, rows, 1.0)
    adapted, _ = token_logprobs_of(policy.eval_model.apply, policy.variables(), rows, 1.0)
  np.testing.assert_allclose(ref, base, atol=1e-6)
  assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-2


def test_hacking_alarms_fire_without_kl_penalty_and_stay_quiet_with_it(tmp_path):
  """An exploitable reward (count target tokens): with beta = 0 the policy buys reward with KL and
  reference NLL until the alarms fire; with the default beta the same run stays within them."""
  default_beta = get_config().rlhf.beta
  summaries = {}
  for beta in (0.0, default_beta):
    cfg = rl_config(beta=beta)
    run = tiny_run(cfg, base_params(cfg))
    summaries[beta] = train_rl(run, RandomPrompts(), str(tmp_path / f'beta{beta}'), steps=25,
                               seed=0)
  hacked, kept = summaries[0.0], summaries[default_beta]
  assert hacked['first_alarm'] is not None, hacked
  assert hacked['after']['kl'] > get_config().rlhf.max_kl
  assert kept['first_alarm'] is None, kept
  assert kept['after']['kl'] < get_config().rlhf.max_kl


def test_trainer_never_shares_buffers_with_the_pretrained_weights():
  """The policy's state is donated at every step; had it kept the base's buffers (jax replicates a
  one-device array over a mesh by reusing it), the reference would be freed under PPO's feet."""
  cfg = rl_config()
  cfg.mesh.data = -1  # all 8 simulated devices
  params = jax.tree.map(jax.numpy.asarray, base_params(cfg))
  policy = init_trainer(cfg, VOCAB, init_params=params)
  buffers = lambda tree: {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
                          for s in x.addressable_shards}
  assert not buffers(policy.state.params) & buffers(params)


def test_pair_iterator_resumes_exactly_and_eval_batches_pad_with_weight_zero():
  arrays = {'tokens': np.arange(10 * 3).reshape(10, 3), 'weights': np.ones(10, np.float32)}
  it = PairIterator(arrays, 4, seed=3)
  seen = [next(it)['tokens'][:, 0] for _ in range(3)]
  state = it.get_state()
  ahead = [next(it)['tokens'][:, 0] for _ in range(4)]
  again = PairIterator(arrays, 4, seed=3)
  again.set_state(state)
  np.testing.assert_array_equal(np.stack([next(again)['tokens'][:, 0] for _ in range(4)]),
                                np.stack(ahead))
  assert len(set(np.concatenate(seen[:2]).tolist())) == 8  # no pair twice within an epoch
  batches = eval_batches(arrays, 4)
  assert len(batches) == 3 and batches[-1]['weights'].tolist() == [1, 1, 0, 0]


def run_stage(stage: str, workdir, **overrides):
  """What run.py does for a stage (config.json, then the STAGES entry), in this process so the
  stages share compilations; 8 simulated devices, so batches are sharded 8 ways."""
  cfg = rlhf_synthetic.get_config(stage)
  for key, value in {**TINY, **overrides}.items():
    section, _, field = key.rpartition('.')
    (cfg[section] if section else cfg)[field] = value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f)
  STAGES[stage](cfg, str(workdir))


TINY = {'model.n_layers': 1, 'model.d_model': 32, 'train.batch_size': 8,
        'data.synthetic.n_docs': 400, 'rlhf.pairs': 64, 'rlhf.eval_pairs': 16,
        'rlhf.stats_samples': 16, 'rlhf.eval_prompts': 16, 'rlhf.rollout_batch': 16}


@pytest.mark.slow
def test_stages_run_end_to_end(tmp_path):
  """pretrain -> reward -> ppo -> dpo on the synthetic task, each a few steps."""
  base, rm = tmp_path / 'base', tmp_path / 'reward'
  run_stage('pretrain', base, **{'train.steps': 20})
  run_stage('reward', rm, pretrained=str(base), **{'train.steps': 4})
  stats = json.load(open(rm / 'reward_stats.json'))
  assert stats['std'] > 0 and stats['samples'] == 16
  run_stage('ppo', tmp_path / 'ppo', pretrained=str(base),
            **{'rlhf.reward_model': str(rm), 'train.steps': 2})
  rows = [json.loads(line) for line in open(tmp_path / 'ppo' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2]
  for key in ('score', 'kl', 'objective', 'entropy', 'actor_clip_frac', 'actor_approx_kl',
              'critic_value_loss', 'response_len', 'eos_rate', 'gold', 'illegal_per_response',
              'alarms'):
    assert key in rows[0], key
  run_stage('dpo', tmp_path / 'dpo', pretrained=str(base), **{'train.steps': 4, 'train.log_every': 1})
  summary = json.load(open(tmp_path / 'dpo' / 'dpo_summary.json'))
  assert summary['before']['kl'] == 0.0
  first = json.loads(open(tmp_path / 'dpo' / 'metrics.jsonl').readline())
  assert first['step'] == 1 and abs(first['loss'] - math.log(2)) < 1e-5  # policy == reference
