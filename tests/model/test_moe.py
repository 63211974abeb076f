"""Mixture of experts (model/moe.py): routing, dispatch and losses against a dense loop over the
experts and hand-worked cases."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, model_config, with_lora
from model.errors import UserError
from model.moe import (MoeMlp, aux_losses, balance_loss, dispatch_masks, route, router_z_loss,
                       swiglu_experts)
from tests.helpers import tiny_config
from train.metrics import matmul_params

CFG = ModelConfig(vocab_size=64, mlp='moe', n_experts=8, top_k=2, d_model=32, d_ff=48, n_layers=2)


def layer(cfg: ModelConfig = CFG):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, cfg.d_model))
  params = nn.meta.unbox(MoeMlp(cfg).init(jax.random.PRNGKey(1), x))['params']
  return x, params


def dense_loop(params, x, top_k: int):
  """Every expert on every token, weighted by the router's renormalised top-k probability (0 for
  the experts a token is not routed to): the definition the routed layer must reproduce."""
  logits = jnp.einsum('btd,de->bte', x, params['router'])
  weights, experts = route(logits, top_k)
  out = jnp.zeros_like(x)
  for e in range(params['gate'].shape[0]):
    gate = (weights * (experts == e)).sum(-1)
    y = swiglu_experts(x, params['gate'][e], params['up'][e], params['down'][e], jnp.matmul)
    out = out + gate[..., None] * y
  return out


def relative_error(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_dropless_equals_a_dense_loop_over_experts():
  x, params = layer()
  # f32 rounding only: bit for bit with XLA's default CPU dots, while the Eigen dots the tests run
  # with (train/xla_flags.py) sum ragged_dot's masked [expert x embed] contraction in another order
  out = MoeMlp(CFG).apply({'params': params}, x)
  assert relative_error(out, dense_loop(params, x, CFG.top_k)) < 1e-6


def test_capacity_without_overflow_equals_dropless_and_overflow_drops_copies():
  x, params = layer()
  ample = dataclasses.replace(CFG, capacity_factor=CFG.n_experts / CFG.top_k)  # t slots each
  out = MoeMlp(ample).apply({'params': params}, x)
  assert relative_error(out, dense_loop(params, x, CFG.top_k)) < 1e-6
  tight = dataclasses.replace(CFG, capacity_factor=1.0)
  _, sown = MoeMlp(tight).apply({'params': params}, x, mutable=['moe'])
  assert 0 < float(sown['moe']['dropped'][0]) < 0.5


def test_slots_fill_first_choices_first_then_in_order():
  # one sequence of 3 tokens, 2 experts, top-2, 2 slots per expert
  experts = jnp.array([[[0, 1], [1, 0], [0, 1]]])
  weights = jnp.array([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]])
  dispatch, combine, dropped = dispatch_masks(experts, weights, n_experts=2, slots=2)
  # expert 0: first choices of tokens 0 and 2 take both slots; token 1's second choice is dropped
  # expert 1: token 1's first choice (slot 0), then token 0's second choice (slot 1); token 2's drops
  want = np.zeros((1, 3, 2, 2))
  want[0, 0, 0, 0] = want[0, 2, 0, 1] = want[0, 1, 1, 0] = want[0, 0, 1, 1] = 1
  np.testing.assert_array_equal(dispatch, want)
  np.testing.assert_allclose(combine[0, 0, 1, 1], 0.3)
  np.testing.assert_allclose(combine[0, 2, 0, 1], 0.9)
  assert float(dropped) == pytest.approx(2 / 6)


def test_balance_and_router_z_losses_match_their_definitions():
  even = jnp.zeros((4, 8))                        # uniform router, copies spread over all experts
  assert float(balance_loss(even, jnp.arange(8).reshape(4, 2))) == pytest.approx(1.0)
  skewed = jnp.zeros((4, 8)).at[:, 0].set(50.0)   # all probability and all copies on expert 0
  assert float(balance_loss(skewed, jnp.zeros((4, 1), jnp.int32))) == pytest.approx(8.0)
  logits = jnp.array([[0.0, np.log(3.0)]])        # log(1 + 3) squared
  assert float(router_z_loss(logits)) == pytest.approx(np.log(4.0) ** 2)
  sown = {'layers_0': {'mlp': {'balance': (2.0,), 'router_z': (3.0,)}},
          'layers_1': {'mlp': {'balance': (4.0,), 'router_z': (5.0,)}}}
  parts = aux_losses(sown, CFG)
  assert float(parts['moe_loss']) == pytest.approx(0.01 * 3.0 + 0.001 * 4.0)


def test_active_parameters_count_the_router_and_top_k_experts():
  dense = dataclasses.replace(CFG, mlp='swiglu', d_ff=2 * CFG.d_ff, n_experts=0)
  router = CFG.d_model * CFG.n_experts
  assert matmul_params(CFG) == matmul_params(dense) + CFG.n_layers * router


@pytest.mark.parametrize('field, value, message', [
    ('n_experts', 1, 'model.n_experts=1 must be at least 2'),
    ('top_k', 9, 'model.top_k=9 must be between 1 and model.n_experts=8'),
    ('capacity_factor', -1.0, r'model.capacity_factor=-1.0 must be >= 0'),
])
def test_bad_moe_fields_are_named(field, value, message):
  from train.validate import validate
  c = tiny_config(mlp='moe')
  c.model[field] = value
  with pytest.raises(UserError, match=message):
    validate(c)
    model_config(c.model, 64, 16)


def test_lora_refuses_the_stacked_expert_kernels():
  cfg = model_config(tiny_config(mlp='moe').model, 64, 16)
  lora = tiny_config().lora
  lora.rank, lora.targets = 4, 'up'
  with pytest.raises(UserError, match='up matches no layer'):
    with_lora(cfg, lora)


def test_scaling_studies_count_active_flops_and_all_parameters():
  from experiments.studies.planning import Shape, shape_cost
  c = tiny_config(mlp='moe', n_experts=4, top_k=1, d_ff=64)
  cost = shape_cost(c, Shape(2, 32, 4), 64)
  dense = tiny_config(d_ff=64)
  dense_cost = shape_cost(dense, Shape(2, 32, 4), 64)
  router = 2 * 32 * 4
  experts = 2 * 3 * 32 * 64  # per layer pair: gate, up, down of one expert
  assert cost.params == dense_cost.params + router + 3 * experts   # every expert is stored
  assert cost.flops_per_token == pytest.approx(dense_cost.flops_per_token + 6 * router)  # top-1 runs
