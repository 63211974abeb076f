"""sample_logits on a known distribution: truncations keep the right tokens in the right ratios."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import Sampling, sample_logits

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def draw(s: Sampling, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n independent draws (tokens, log-probs) from LOGITS."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  tokens, logprobs = jax.jit(jax.vmap(lambda k: sample_logits(LOGITS, k, s)))(keys)
  return np.asarray(tokens[:, 0]), np.asarray(logprobs[:, 0])


@pytest.mark.parametrize('s,kept', [
    (Sampling(top_k=2), [0, 1]),
    (Sampling(top_p=0.75), [0, 1]),         # 0.5 < 0.75 <= 0.5 + 0.3
    (Sampling(top_p=0.85), [0, 1, 2]),
    (Sampling(min_p=0.25), [0, 1, 2]),      # p >= 0.25 * 0.5
    (Sampling(top_k=3, top_p=0.6), [0, 1]),
    (Sampling(), [0, 1, 2, 3]),
])
def test_truncation_keeps_the_right_tokens_in_proportion(s, kept):
  tokens, _ = draw(s)
  counts = np.bincount(tokens, minlength=4) / len(tokens)
  expected = np.zeros(4)
  expected[kept] = PROBS[kept] / PROBS[kept].sum()
  np.testing.assert_allclose(counts, expected, atol=0.03)
  assert set(np.unique(tokens)) == set(kept)


def test_logprobs_are_of_the_temperature_scaled_distribution_before_truncation():
  s = Sampling(temperature=0.5, top_k=2)
  tokens, logprobs = draw(s, n=64)
  scaled = np.log(PROBS) / 0.5
  expected = scaled - np.log(np.exp(scaled).sum())
  np.testing.assert_allclose(logprobs, expected[tokens], atol=1e-5)


def test_greedy_picks_the_argmax_with_its_logprob():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
  tokens, logprobs = sample_logits(logits, jax.random.PRNGKey(0), Sampling(temperature=0.0))
  assert tokens.tolist() == [1, 0]
  np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], atol=1e-6)


def test_same_key_same_draws_other_key_other_draws():
  a, _ = draw(Sampling(temperature=1.0), n=200, seed=1)
  b, _ = draw(Sampling(temperature=1.0), n=200, seed=1)
  c, _ = draw(Sampling(temperature=1.0), n=200, seed=2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
