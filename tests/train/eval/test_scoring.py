"""The batched scorer against unbatched forward passes of a tiny model: log-likelihoods, the
greedy flag, left truncation of long contexts and rolling windows over long documents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.pretrained import forward
from tests.helpers import tiny_config
from train.eval.scoring import Scorer, rolling_windows, shard_params
from train.loop import init_trainer

VOCAB = 40


@pytest.fixture(scope='module')
def scorer():
  cfg = tiny_config()
  cfg.mesh.data = -1  # the batch split over all 8 simulated devices
  trainer = init_trainer(cfg, VOCAB)
  params = shard_params(trainer.eval_model, jax.device_get(trainer.state.params), trainer.mesh)
  return Scorer(trainer.eval_model, {'params': params}, trainer.mesh, batch_size=8)


def row_logits(scorer, tokens):
  """Logits [t, v] of one row: a forward pass of its own, padded at the end to the model's
  context (one compilation; causal attention never looks at the padding)."""
  padded = jnp.asarray([list(tokens) + [0] * (scorer.max_len - len(tokens))])
  params = jax.device_get(scorer.variables['params'])
  return np.asarray(forward(params, padded, model=scorer.model)[0, :len(tokens)])


def logprobs(scorer, seq):
  """log p(seq[t] | seq[:t]) for t >= 1, f64 on the host."""
  logits = row_logits(scorer, seq[:-1]).astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return logp[np.arange(len(seq) - 1), seq[1:]]


def test_loglikelihood_matches_one_row_at_a_time(scorer):
  rng = np.random.default_rng(0)
  requests = [(rng.integers(0, VOCAB, rng.integers(1, 12)).tolist(),
               rng.integers(0, VOCAB, rng.integers(1, 5)).tolist()) for _ in range(21)]
  got = scorer.loglikelihood(requests)
  for (ctx, cont), (ll, _) in zip(requests, got):
    lp = logprobs(scorer, ctx + cont)
    assert ll == pytest.approx(lp[-len(cont):].sum(), abs=1e-4)
  assert scorer.truncated == 0


@pytest.mark.parametrize('scan', [False, True])
def test_choices_sharing_a_context_match_one_row_at_a_time(scorer, scan, monkeypatch):
  """Requests with one context (multiple choice) are scored from one KV cache of the context:
  the same figures as whole rows, for groups of uneven size (split past MAX_GROUP), with or
  without scanned layers."""
  monkeypatch.setattr('train.eval.scoring.MAX_GROUP', 3)
  if scan:
    cfg = tiny_config()
    cfg.mesh.data, cfg.model.scan_layers = -1, True
    trainer = init_trainer(cfg, VOCAB)
    params = shard_params(trainer.eval_model, jax.device_get(trainer.state.params), trainer.mesh)
    scorer = Scorer(trainer.eval_model, {'params': params}, trainer.mesh, batch_size=8)
  rng = np.random.default_rng(2)
  requests = []
  for _ in range(11):
    ctx = rng.integers(0, VOCAB, rng.integers(1, 11)).tolist()  # context + choice fit max_len (16)
    requests += [(ctx, rng.integers(0, VOCAB, rng.integers(1, 7)).tolist()) for _ in range(rng.integers(2, 6))]
  got = scorer.loglikelihood(requests)
  for (ctx, cont), (ll, greedy) in zip(requests, got):
    lp = logprobs(scorer, ctx + cont)
    assert ll == pytest.approx(lp[-len(cont):].sum(), abs=1e-4)
    argmax = row_logits(scorer, (ctx + cont)[:-1]).argmax(-1)[-len(cont):]
    assert greedy == bool((argmax == np.asarray(cont)).all())


def test_greedy_flag(scorer):
  ctx = [3, 7, 11]
  greedy = []
  for _ in range(3):  # the argmax chain, built one token at a time
    greedy.append(int(row_logits(scorer, ctx + greedy)[-1].argmax()))
  other = greedy[:2] + [(greedy[2] + 1) % VOCAB]
  (_, is_greedy), (_, not_greedy) = scorer.loglikelihood([(ctx, greedy), (ctx, other)])
  assert is_greedy and not not_greedy


def test_long_context_is_cut_from_the_left_and_counted(scorer):
  n = scorer.max_len
  ctx, cont = list(range(1, n + 10)), [5, 6]
  before = scorer.truncated
  (ll, _), = scorer.loglikelihood([(ctx, cont)])
  assert scorer.truncated == before + 1
  lp = logprobs(scorer, (ctx + cont)[-(n + 1):])
  assert ll == pytest.approx(lp[-2:].sum(), abs=1e-4)


def test_rolling_predicts_every_token_once_in_disjoint_windows(scorer):
  n, prefix = scorer.max_len, 1
  doc = np.random.default_rng(1).integers(2, VOCAB, int(3.5 * n)).tolist()
  windows = list(rolling_windows(doc, prefix, n))
  assert sum(len(cont) for _, cont in windows) == len(doc)
  want = logprobs(scorer, [prefix] + doc[:n]).sum()
  for start in range(n, len(doc), n):  # later chunks: the n tokens before each chunk's end as input
    end = min(start + n, len(doc))
    want += logprobs(scorer, doc[end - n - 1:end])[-(end - start):].sum()
  got, = scorer.loglikelihood_rolling([doc], prefix)
  assert got == pytest.approx(want, abs=1e-3)
