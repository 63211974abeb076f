"""RL pieces against hand computations and plain loops: GAE, KL, PPO/GRPO, Bradley-Terry, DPO,
score positions under left and right padding, alarms, and a reward model that learns gold pairs."""
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from data.preferences import GoldReward, prefers_first, symbol_token_ids
from data.synthetic import markov_chain
from data.tokenizer import CharTokenizer
from model.config import ModelConfig
from model.generate import generate
from model.heads import (build_scalar_model, gather_last, last_token_index, lm_backbone,
                         positions_from_mask, sequence_scores)
from model.sampling import Sampling, sample_logits
from model.transformer import build_model
from tests.helpers import tiny_config
from train.rl.hacking import HackingThresholds, hacking_alarms, reward_disagreement
from train.step import make_train_step
from train.trainer import init_trainer
from train.mesh import global_batch, mesh_rules
from train.rl.ppo import (clipped_policy_terms, ends_with, gae, group_advantages, grpo_loss,
                       join_rollout, ppo_policy_loss, ppo_value_loss, token_rewards)
from train.rl.preference import (bradley_terry, dpo_loss, pair_batch, response_logprobs,
                              reward_model_loss)
from train.rl.core import AdaptiveKL, FixedKL, kl_k1, kl_k3, sequence_logprobs, token_logprobs, whiten

VOCAB = 48


def tiny_cfg(**kw) -> ModelConfig:
  return ModelConfig(vocab_size=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                     d_ff=64, max_len=32, **kw)


def bigram(variables, tokens, positions, segment_ids, rngs=None):
  """A stand-in LM whose logits depend only on the current token, so log-probs are hand-computable."""
  return variables['params']['table'][tokens]


def bigram_logprobs(table: np.ndarray, row: np.ndarray) -> np.ndarray:
  """log p(row[i] | row[i-1]) for i >= 1, 0 at i = 0: the alignment train/rl/core.py documents."""
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  return np.array([0.0] + [logp[row[i - 1], row[i]] for i in range(1, len(row))])


# ---- GAE, rewards, whitening -------------------------------------------------------------------

def gae_loop(rewards, values, mask, gamma, lam):
  """The textbook recursion over the masked tokens only (a masked-out token is not a step)."""
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    steps = np.flatnonzero(mask[b])
    next_value = next_adv = 0.0
    for i in steps[::-1]:
      delta = rewards[b, i] + gamma * next_value - values[b, i]
      next_adv = adv[b, i] = delta + gamma * lam * next_adv
      next_value = values[b, i]
  return adv, (adv + values) * mask


def test_gae_scan_matches_python_loop():
  rng = np.random.default_rng(0)
  b, t = 6, 12
  rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
  mask = np.zeros((b, t))
  for row, (start, stop) in enumerate([(0, 12), (3, 9), (5, 6), (2, 12), (0, 0), (1, 4)]):
    mask[row, start:stop] = 1
  mask[3, 7] = 0  # a hole: an environment token inside the response
  for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
    adv, ret = gae(*(jnp.asarray(x, jnp.float32) for x in (rewards, values, mask)), gamma, lam)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)


def test_token_rewards_penalise_kl_and_score_the_last_response_token():
  mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], jnp.float32)
  tokens = jnp.array([[5, 6, 7, 2, 0], [5, 5, 6, 7, 8]])
  kl = jnp.full((2, 5), 0.5)
  finished = ends_with(tokens, mask, stop_id=2)
  np.testing.assert_array_equal(finished, [True, False])
  r = token_rewards(jnp.array([3.0, 3.0]), kl, mask, 0.1, finished, no_stop_penalty=1.0)
  np.testing.assert_allclose(r, [[0, -0.05, -0.05, 2.95, 0], [0, 0, -0.05, -0.05, 1.95]], atol=1e-6)


def test_whiten_has_zero_mean_unit_std_over_the_mask():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, (4, 10)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 10)) < 0.6, jnp.float32)
  w = np.asarray(whiten(x, mask))
  m = np.asarray(mask) > 0
  np.testing.assert_allclose(w[m].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(w[m].std(), 1.0, atol=1e-4)
  assert (w[~m] == 0).all()
  kept = np.asarray(whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[m].mean(), np.asarray(x)[m].mean(), rtol=1e-5)


# ---- KL ----------------------------------------------------------------------------------------

def test_kl_estimators_vanish_at_the_reference_and_k3_is_nonnegative():
  rng = np.random.default_rng(0)
  logp = jnp.asarray(np.log(rng.random((3, 7))), jnp.float32)
  np.testing.assert_array_equal(kl_k1(logp, logp), 0.0)
  np.testing.assert_array_equal(kl_k3(logp, logp), 0.0)
  other = jnp.asarray(np.log(rng.random((3, 7))), jnp.float32)
  assert (kl_k3(logp, other) >= 0).all() and (kl_k3(logp, other) > 0).any()
  # both are unbiased for KL(p || q): check on samples of two categorical distributions
  p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
  x = rng.choice(3, 200_000, p=p)
  exact = (p * np.log(p / q)).sum()
  for kl in (kl_k1, kl_k3):
    np.testing.assert_allclose(kl(jnp.log(p[x]), jnp.log(q[x])).mean(), exact, rtol=0.02)


def test_adaptive_kl_moves_beta_towards_the_target():
  ctl = AdaptiveKL(target=6.0, horizon=10_000)
  assert ctl.update(0.1, kl=12.0, n_steps=256) > 0.1
  assert ctl.update(0.1, kl=3.0, n_steps=256) < 0.1
  np.testing.assert_allclose(ctl.update(0.1, kl=6.0, n_steps=256), 0.1)
  np.testing.assert_allclose(ctl.update(0.1, kl=1e6, n_steps=10_000), 0.12)  # error clipped at 20%
  assert FixedKL().update(0.1, kl=100.0, n_steps=256) == 0.1


# ---- log-probs ---------------------------------------------------------------------------------

def test_token_logprobs_match_the_sampler():
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 11)) * 3
  for temperature in (1.0, 0.7):
    tokens, logp = sample_logits(logits, jax.random.PRNGKey(1), Sampling(temperature=temperature))
    np.testing.assert_allclose(token_logprobs(logits, tokens, temperature), logp, rtol=1e-6)


def test_rollout_logprobs_match_generation():
  """Left-padded prompts + generated responses (join_rollout) through one forward pass give the
  log-probs the KV-cache sampler reported: the alignment PPO's ratio depends on."""
  cfg = tiny_cfg()
  model = build_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params'])
  params = jax.tree.map(lambda x: x * 4, params)
  prompts = [[1, 5, 7], [1, 3, 4, 5, 6, 9], [1]]
  out = generate(model, params, prompts, max_new_tokens=8, rng=jax.random.PRNGKey(2),
                 sampling=Sampling(temperature=0.8), stop_ids=(2,), pad_id=0)
  tokens, logprobs, lengths = (np.asarray(x) for x in out)
  batch = join_rollout(prompts, tokens, lengths, pad_id=0)
  logp, _ = jax.jit(lambda b: sequence_logprobs(model.apply, {'params': params}, b, 0.8))(batch)
  width = max(map(len, prompts))
  for row, n in enumerate(lengths):
    assert batch['response_mask'][row].sum() == n
    np.testing.assert_allclose(logp[row, width:width + n], logprobs[row, :n], atol=1e-4)


# ---- PPO and GRPO ------------------------------------------------------------------------------

def test_clipped_policy_loss_in_both_regimes():
  ratio = np.array([1.5, 1.5, 0.5, 0.5, 1.1, 3.0])
  adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0, 5.0])
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last token is padding
  old = np.log(np.full(6, 0.3))
  loss, m = clipped_policy_terms(jnp.asarray(old + np.log(ratio)), jnp.asarray(old),
                                 jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2)
  # ρ=1.5,A>0: clipped -1.2; ρ=1.5,A<0: 1.5; ρ=0.5,A>0: -0.5; ρ=0.5,A<0: clipped 0.8; ρ=1.1: -2.2
  np.testing.assert_allclose(loss, -1.2 + 1.5 - 0.5 + 0.8 - 2.2, rtol=1e-5)
  np.testing.assert_allclose(m['clip_frac'], 2.0)
  np.testing.assert_allclose(m['approx_kl'], ((ratio - 1 - np.log(ratio)) * mask).sum(), rtol=1e-5)


def rollout(rng: np.random.Generator, b: int = 3, t: int = 6, vocab: int = 5):
  tokens = rng.integers(0, vocab, (b, t))
  mask = np.zeros((b, t), np.float32)
  mask[:, 2:] = 1
  mask[1, 4:] = 0
  return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions_from_mask(np.ones((b, t)))),
              segment_ids=jnp.ones((b, t), jnp.int32), response_mask=jnp.asarray(mask))


def test_ppo_losses_on_a_bigram_policy():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 5)).astype(np.float32)
  batch = rollout(rng)
  mask = np.asarray(batch['response_mask'])
  logp = np.stack([bigram_logprobs(table, row) for row in np.asarray(batch['tokens'])])
  adv = rng.normal(size=logp.shape).astype(np.float32)
  params = {'table': jnp.asarray(table)}
  # on-policy (old == current): ratio 1, loss = -Σ A over response tokens, nothing clipped
  on_policy = {**batch, 'old_logprobs': jnp.asarray(logp), 'advantages': jnp.asarray(adv)}
  loss, m = ppo_policy_loss(bigram, entropy_coef=0.0)(params, on_policy, jax.random.PRNGKey(0))
  np.testing.assert_allclose(loss, -(adv * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(m['clip_frac'], 0.0)
  np.testing.assert_allclose(m['approx_kl'], 0.0, atol=1e-5)
  assert m['weight'] == mask.sum()
  # the critic: values[i] = v[tokens[i-1]] (a bigram critic), hand-computed clipped squared error
  v_table = rng.normal(size=5).astype(np.float32)
  values = np.concatenate([np.zeros((3, 1)), v_table[np.asarray(batch['tokens'])[:, :-1]]], 1)
  old = values + rng.normal(size=values.shape) * 0.5
  returns = rng.normal(size=values.shape)
  clipped = old + np.clip(values - old, -0.2, 0.2)
  want = 0.5 * (np.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum()
  critic = lambda variables, tokens, *_, rngs=None: variables['params']['v'][tokens]
  vbatch = {**batch, 'old_values': jnp.asarray(old, jnp.float32),
            'returns': jnp.asarray(returns, jnp.float32)}
  loss, m = ppo_value_loss(critic, clip_eps=0.2, vf_coef=0.5)({'v': jnp.asarray(v_table)}, vbatch,
                                                             jax.random.PRNGKey(0))
  np.testing.assert_allclose(m['value_loss'], want, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * want, rtol=1e-5)


def test_group_advantages_and_grpo_loss():
  rewards = jnp.array([[0.0, 1.0], [2.0, 2.0], [1.0, 2.0]])
  adv = group_advantages(rewards)
  np.testing.assert_allclose(adv, [[-1, 1], [0, 0], [-1, 1]], atol=1e-5)
  np.testing.assert_allclose(group_advantages(rewards, scale=False)[2], [-0.5, 0.5])
  rng = np.random.default_rng(1)
  table = rng.normal(size=(5, 5)).astype(np.float32)
  batch = rollout(rng)
  logp = np.stack([bigram_logprobs(table, row) for row in np.asarray(batch['tokens'])])
  ref = logp + rng.normal(size=logp.shape) * 0.3
  seq_adv = np.array([1.0, -0.5, 2.0], np.float32)
  batch = {**batch, 'old_logprobs': jnp.asarray(logp), 'ref_logprobs': jnp.asarray(ref),
           'advantages': jnp.asarray(seq_adv)}
  mask = np.asarray(batch['response_mask'])
  loss, m = grpo_loss(bigram, kl_coef=0.1)({'table': jnp.asarray(table)}, batch,
                                           jax.random.PRNGKey(0))
  k3 = np.exp(ref - logp) - 1 - (ref - logp)
  np.testing.assert_allclose(m['kl'], (k3 * mask).sum(), rtol=1e-4)
  np.testing.assert_allclose(loss, -(seq_adv[:, None] * mask).sum() + 0.1 * (k3 * mask).sum(),
                             rtol=1e-4)


# ---- reward model and DPO ----------------------------------------------------------------------

def test_score_index_is_the_last_real_token_under_left_and_right_padding():
  seg = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(last_token_index(seg), [2, 4, 4, 3])
  np.testing.assert_array_equal(gather_last(jnp.arange(20).reshape(4, 5), last_token_index(seg)),
                                [2, 9, 14, 18])
  np.testing.assert_array_equal(positions_from_mask(seg)[1], [0, 0, 0, 1, 2])


@pytest.mark.parametrize('pos_encoding', ['rope', 'learned'])
def test_reward_is_the_same_for_left_and_right_padding(pos_encoding):
  cfg = tiny_cfg(pos_encoding=pos_encoding)
  model = build_scalar_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params'])
  rows = [[1, 7, 9, 4, 2], [1, 5, 2], [1, 8, 8, 8, 8, 6, 2]]
  width = 9
  right = np.zeros((3, width), np.int32)
  left = np.zeros((3, width), np.int32)
  for i, r in enumerate(rows):
    right[i, :len(r)], left[i, width - len(r):] = r, r
  score = jax.jit(lambda tok: sequence_scores(model.apply, {'params': params}, tok,
                                              positions_from_mask(tok), (tok > 0).astype(jnp.int32)))
  np.testing.assert_allclose(score(left), score(right), atol=1e-5)
  alone = [float(score(np.array([r]))[0]) for r in rows]
  np.testing.assert_allclose(score(right), alone, atol=1e-5)


def scalar_trainer(cfg: ConfigDict):
  """A reward-model trainer whose backbone is a (freshly initialised) LM's, as the reward stage
  builds it from a pretrained checkpoint."""
  lm = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  scalar = init_trainer(cfg, VOCAB, devices=jax.devices()[:1], build=build_scalar_model,
                        init_params=lm_backbone(jax.device_get(lm.state.params)),
                        fresh=('score_head',))
  return lm, scalar


def test_scalar_model_loads_lm_params():
  cfg = tiny_config(tie_embeddings=False)
  lm, scalar = scalar_trainer(cfg)
  lm_params, params = jax.device_get((lm.state.params, scalar.state.params))
  assert set(params) == set(lm_params) - {'lm_head'} | {'score_head'}
  jax.tree.map(np.testing.assert_array_equal, params['blocks'], lm_params['blocks'])
  tokens = jnp.array([[1, 4, 6, 2]])
  hidden = lm.eval_model.apply({'params': lm_params}, tokens, method='features')
  head = params['score_head']
  np.testing.assert_allclose(scalar.eval_model.apply({'params': params}, tokens),
                             hidden @ head['kernel'][:, 0] + head['bias'][0], atol=1e-5)


def test_bradley_terry_by_hand():
  chosen, rejected = jnp.array([1.0, 0.0, 2.0, 5.0]), jnp.array([0.0, 1.0, 2.0, -5.0])
  weights = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last pair is padding
  loss, m = bradley_terry(chosen, rejected, weights)
  np.testing.assert_allclose(loss, np.log1p(np.exp(-1)) + np.log1p(np.exp(1)) + np.log(2), rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], 1.0)  # a tie is not a win
  np.testing.assert_allclose(m['margin'], 0.0)


def test_reward_model_loss_reads_each_rows_last_token():
  """A critic whose per-token value is v[token]: the reward is v of the EOS-ending row's last token."""
  v = jnp.array([0.0, 0.0, 0.0, 0.5, 1.5, -1.0], jnp.float32)
  critic = lambda variables, tokens, *_, rngs=None: variables['params']['v'][tokens]
  batch = pair_batch([[1, 3, 4], [1, 4, 5, 3]], [[1, 3, 5], [1, 4]], [2, 2], width=6, pad_id=0)
  loss, m = reward_model_loss(critic)({'v': v}, jax.tree.map(jnp.asarray, batch),
                                      jax.random.PRNGKey(0))
  margins = np.array([1.5 - -1.0, 0.5 - 1.5])
  np.testing.assert_allclose(loss, np.log1p(np.exp(-margins)).sum(), rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], 1.0)


def test_dpo_loss_by_hand():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(6, 6)).astype(np.float32)
  chosen, rejected = [[1, 3, 4, 5, 2], [1, 4, 3, 2]], [[1, 3, 5, 2], [1, 4, 4, 4, 5, 2]]
  batch = pair_batch(chosen, rejected, [2, 2], width=7, pad_id=0)
  np.testing.assert_array_equal(batch['response_mask'][0, 0], [0, 0, 1, 1, 1, 0, 0])
  seq = lambda row: bigram_logprobs(table, np.array(row))[2:].sum()  # response tokens only
  policy = np.array([[seq(c), seq(r)] for c, r in zip(chosen, rejected)])
  ref = np.array([[-4.0, -3.0], [-2.5, -6.0]], np.float32)
  beta = 0.5
  h = beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
  batch = {**jax.tree.map(jnp.asarray, batch), 'ref_logprobs': jnp.asarray(ref)}
  params = {'table': jnp.asarray(table)}
  np.testing.assert_allclose(response_logprobs(bigram, {'params': params}, batch), policy, rtol=1e-5)
  loss, m = dpo_loss(bigram, beta)(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(loss, np.log1p(np.exp(-h)).sum(), rtol=1e-5)
  np.testing.assert_allclose(m['accuracy'], (h > 0).sum())
  np.testing.assert_allclose(m['chosen_reward'], beta * (policy[:, 0] - ref[:, 0]).sum(), rtol=1e-5)
  np.testing.assert_allclose(m['margin'], h.sum(), rtol=1e-5)


@pytest.mark.parametrize('objective', ['dpo', 'reward'])
def test_pair_train_step_with_accumulation_equals_big_batch(objective):
  """Pair batches [b, 2, t] go through the loop's step: micro-batches keep pairs whole and the
  per-pair sums add up to the big batch's update."""
  rng = np.random.default_rng(0)
  rows = lambda: [[1, *rng.integers(4, VOCAB, rng.integers(3, 15))] for _ in range(8)]
  batch = pair_batch(rows(), rows(), [2] * 8, width=16, pad_id=0)
  batch['ref_logprobs'] = rng.normal(-20.0, 3.0, (8, 2)).astype(np.float32)
  batch['weights'][5] = 0.0  # a padding pair
  results = []
  for accum in (1, 4):
    cfg = tiny_config()
    cfg.train.grad_accum = accum
    if objective == 'dpo':
      trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
      step = make_train_step(trainer, functools.partial(dpo_loss, beta=0.5))
    else:
      _, trainer = scalar_trainer(cfg)
      step = make_train_step(trainer, reward_model_loss)
    with mesh_rules(trainer.mesh):
      state, m = step(trainer.state, global_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
    results.append(jax.device_get((m, state.params)))
  (m1, p1), (m4, p4) = results
  for k in ('loss', 'accuracy', 'margin', 'grad_norm'):
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p4)


# ---- alarms ------------------------------------------------------------------------------------

def test_hacking_alarms():
  th = HackingThresholds(max_kl=5.0, nll_margin=0.5, max_disagreement=0.3)
  assert hacking_alarms(th, kl=1.0, ref_nll=2.1, base_nll=2.0, disagreement=0.1) == []
  fired = hacking_alarms(th, kl=9.0, ref_nll=3.0, base_nll=2.0, disagreement=0.45)
  assert len(fired) == 3 and all('\n' not in a for a in fired)
  assert 'KL' in fired[0] and 'NLL' in fired[1] and 'disagree' in fired[2]
  s = np.array([0.1, 0.5, 0.3, 2.0])
  assert reward_disagreement(s, 3 * s + 1) == 0.0
  assert reward_disagreement(s, -s) == 1.0


# ---- learning: a reward model recovers the gold preference -------------------------------------

def gold_pairs(gold: GoldReward, symbol_ids: np.ndarray, tok: CharTokenizer, seed: int, n: int,
               prompt_len: int = 4, completion_len: int = 8, temperature: float = 0.5,
               epsilon: float = 0.1) -> tuple[np.ndarray, ...]:
  """n chain prompts, two continuations each (a step is a uniform random symbol with probability
  epsilon, so some break the chain), ordered by Bradley-Terry noise on the gold score: chosen and
  rejected ids [BOS, prompt, completion, EOS], prompt lengths, and the two gold scores."""
  chain, rng = gold.chain, np.random.default_rng(seed)
  prompts = chain.sample(rng, n, prompt_len)
  cumulative = np.cumsum(chain.transitions, axis=1)
  cumulative[:, -1] = 1.0

  def continuations() -> np.ndarray:
    out, prev = np.empty((n, completion_len), np.int64), np.asarray(prompts[:, -1], np.int64)
    for t in range(completion_len):
      step = (rng.random(n)[:, None] >= cumulative[prev]).sum(axis=1)
      out[:, t] = np.where(rng.random(n) < epsilon, rng.integers(0, len(chain.initial), n), step)
      prev = out[:, t]
    return out

  a, b = continuations(), continuations()
  gold_a, gold_b = (np.array([gold.score(r, c) for r, c in zip(rows, prompts[:, -1])]) for rows in (a, b))
  first = prefers_first(gold_a, gold_b, temperature, rng)
  ids = lambda rows: np.concatenate([np.full((n, 1), tok.bos_id), symbol_ids[prompts],
                                     symbol_ids[rows], np.full((n, 1), tok.eos_id)], axis=1).astype(np.int32)
  return (ids(np.where(first[:, None], a, b)), ids(np.where(first[:, None], b, a)),
          np.full(n, 1 + prompt_len), np.where(first, gold_a, gold_b), np.where(first, gold_b, gold_a))


def test_reward_model_learns_gold_preferences():
  """A tiny ScalarModel trained with Bradley-Terry on pairs labelled (with noise) by the gold score
  ranks held-out pairs like the gold score does."""
  start = time.perf_counter()
  chain = markov_chain(ConfigDict(dict(n_symbols=8, branching=3, concentration=0.5, seed=0)))
  target = np.zeros(8, bool)
  target[np.random.default_rng([0, 2]).choice(8, 3, replace=False)] = True
  gold = GoldReward(chain, target)
  tok = CharTokenizer(chain.alphabet)
  ids = symbol_token_ids(chain, tok)

  def batches(seed, n):
    *rows, gold_chosen, gold_rejected = gold_pairs(gold, ids, tok, seed, n)
    batch = pair_batch(*rows, width=14, pad_id=tok.pad_id)
    return jax.tree.map(jnp.asarray, batch), (gold_chosen, gold_rejected)

  train, _ = batches(0, 4096)
  held_out, (gold_chosen, gold_rejected) = batches(1, 512)
  cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, max_len=16)
  model = build_scalar_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 14), jnp.int32))['params'])
  loss_fn = reward_model_loss(model.apply)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, batch):
    mean_loss = lambda p: loss_fn(p, batch, jax.random.PRNGKey(0))[0] / batch['weights'].sum()
    grads = jax.grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(300):
    rows = np.arange(i * 64, (i + 1) * 64) % 4096
    params, opt_state = step(params, opt_state, jax.tree.map(lambda x: x[rows], train))
  rewards = sequence_scores(model.apply, {'params': params}, held_out['tokens'],
                            held_out['positions'], held_out['segment_ids'])
  decided = gold_chosen != gold_rejected
  agree = (np.asarray(rewards[:, 0] > rewards[:, 1]) == (gold_chosen > gold_rejected))
  accuracy = agree[decided].mean()
  assert accuracy >= 0.72, accuracy
  assert time.perf_counter() - start < 60
