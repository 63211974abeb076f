"""µP (model.parameterization=mup): the coordinate check across an 8x width range, and µP at its
base width is SP exactly."""
import jax
import numpy as np
import pytest

from model.config import model_config
from model.errors import UserError
from train.loop import init_trainer
from train.mesh import global_batch, mesh_rules
from train.objectives import causal_lm_loss
from tests.helpers import random_batch, tiny_config, train_metrics

VOCAB = 64
WIDTHS = (32, 96, 256)  # 8x
BATCHES = [random_batch(np.random.default_rng(i), 8, 16, VOCAB) for i in range(5)]


def trainer_for(width: int, parameterization: str, base: int = 32, lr: float = 3e-3,
                output_mult: float = 1.0, init_mult: float = 1.0):
  c = tiny_config(d_model=width, n_heads=width // 8, n_kv_heads=width // 8, d_ff=2 * width,
                  parameterization=parameterization, mup_base_width=base,
                  mup_output_mult=output_mult, mup_init_mult=init_mult)
  c.train.lr, c.train.warmup_steps = lr, 0
  return init_trainer(c, VOCAB, devices=jax.devices()[:1])


def layer_rms(width: int, parameterization: str) -> np.ndarray:
  """RMS of each block's output on a fixed batch after 5 Adam steps."""
  trainer = trainer_for(width, parameterization)
  train_metrics(trainer, causal_lm_loss, BATCHES, seed=0)
  b = BATCHES[0]
  with mesh_rules(trainer.mesh):
    batch = global_batch(b, trainer.mesh)
    _, sown = trainer.model.apply({'params': trainer.state.params}, batch['inputs'],
                                  batch['positions'], batch['segment_ids'],
                                  rngs={'dropout': jax.random.PRNGKey(0)}, mutable=['intermediates'])
  blocks = sown['intermediates']['blocks']
  return np.array([float(blocks[f'layers_{i}']['act_rms'][0]) for i in range(len(blocks))])


@pytest.mark.slow
def test_coordinate_check_mup_holds_activations_across_width_and_sp_drifts():
  ratio = {}
  for p in ('mup', 'sp'):
    rms = np.stack([layer_rms(w, p) for w in WIDTHS])   # [widths, layers]
    ratio[p] = rms.max(0) / rms.min(0)
  assert (ratio['mup'] < 1.5).all(), ratio
  assert (ratio['sp'] > 3).any(), ratio


def test_mup_at_its_base_width_is_sp_exactly():
  losses = [train_metrics(trainer_for(64, p, base=64), causal_lm_loss, BATCHES[:3], seed=0)
            for p in ('sp', 'mup')]
  np.testing.assert_array_equal(*losses)


def test_mup_scales_hidden_init_and_updates_and_the_logits_by_the_width_multiplier():
  sp, mup = trainer_for(64, 'sp'), trainer_for(64, 'mup', base=16)   # width_mult 4
  kernel = lambda t: np.asarray(t.state.params['blocks']['layers_0']['mlp']['up']['kernel'])
  assert kernel(mup).std() == pytest.approx(kernel(sp).std() / 2, rel=0.05)
  emb = lambda t: np.asarray(t.state.params['embed']['embedding'])
  assert emb(mup).std() == pytest.approx(emb(sp).std(), rel=0.05)
  # the same weights: µP's logits are SP's / 4
  x = BATCHES[0]['inputs']
  logits = lambda t: t.model.apply({'params': sp.state.params}, x)
  np.testing.assert_allclose(logits(mup), logits(sp) / 4, rtol=1e-5, atol=1e-7)
  # one Adam step from the same weights and gradients: hidden kernels move 1/4 as far
  grads = jax.tree.map(np.ones_like, sp.state.params)
  step = {}
  for name, t in (('sp', sp), ('mup', mup)):
    updates, _ = t.tx.update(grads, t.tx.init(sp.state.params), sp.state.params)
    step[name] = updates
  up = lambda u: np.abs(np.asarray(u['blocks']['layers_0']['mlp']['up']['kernel'])).max()
  assert up(step['mup']) == pytest.approx(up(step['sp']) / 4, rel=1e-6)
  e = lambda u: np.asarray(u['embed']['embedding'])
  np.testing.assert_array_equal(e(step['mup']), e(step['sp']))


def test_mup_base_width_multipliers_scale_the_logits_and_the_projection_init_and_are_mup_only():
  sp = trainer_for(64, 'sp')
  mup = trainer_for(64, 'mup', base=16, output_mult=3.0, init_mult=3.0)  # each / width_mult 4
  x = BATCHES[0]['inputs']
  logits = lambda t: t.model.apply({'params': sp.state.params}, x)
  np.testing.assert_allclose(logits(mup), logits(sp) * 0.75, rtol=1e-5, atol=1e-7)
  for path in (('attn', 'query'), ('attn', 'out'), ('mlp', 'down')):  # 0.02 and 0.02/√(2L) alike
    kernel = lambda t: np.asarray(t.state.params['blocks']['layers_0'][path[0]][path[1]]['kernel'])
    assert kernel(mup).std() == pytest.approx(kernel(sp).std() * 1.5, rel=0.05), path
  with pytest.raises(UserError, match='experts of model.mlp=moe are not covered'):
    model_config(tiny_config(parameterization='mup', mlp='moe', n_experts=4).model, VOCAB, 16)
  for field in ('mup_output_mult', 'mup_init_mult'):
    with pytest.raises(UserError, match=f'{field}=2.0 needs model.parameterization=mup'):
      model_config(tiny_config(**{field: 2.0}).model, VOCAB, 16)
