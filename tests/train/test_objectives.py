"""The cross-entropy the objectives use is optax's, value and gradient, without a scatter."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.objectives import at_labels, token_nll
from train.rl.core import token_logprobs


def test_token_nll_is_optax_cross_entropy_and_its_gradient_has_no_scatter():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, 50)) * 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 7)))
  probe = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  ref = lambda l: optax.softmax_cross_entropy_with_integer_labels(l, targets)
  ours = lambda l: token_nll(l, targets)
  np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6, atol=1e-6)
  grad = lambda f: jax.grad(lambda l: (f(l) * probe).sum())
  np.testing.assert_allclose(grad(ours)(logits), grad(ref)(logits), rtol=1e-6, atol=1e-7)
  assert 'scatter' in jax.jit(grad(ref)).lower(logits).as_text()  # take_along_axis's transpose
  assert 'scatter' not in jax.jit(grad(ours)).lower(logits).as_text()


def test_at_labels_is_take_along_axis_and_rl_logprobs_follow():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 5, 30)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 30, (4, 5)))
  np.testing.assert_array_equal(at_labels(x, labels),
                                jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0])
  logp = jax.nn.log_softmax(x / 0.7, axis=-1)
  np.testing.assert_allclose(token_logprobs(x, labels, 0.7),
                             jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], rtol=1e-6)
