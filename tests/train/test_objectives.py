"""The cross-entropy the objectives use is optax's, value and gradient, without a scatter."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.objectives import token_nll


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
  bf16 = logits.astype(jnp.bfloat16)  # bf16 logits: the gradient comes back in bf16, as optax's
  assert grad(ours)(bf16).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad(ours)(bf16), np.float32),
                             np.asarray(grad(ref)(bf16.astype(jnp.float32)), np.float32), atol=0.01)
