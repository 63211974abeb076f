"""µP (model.parameterization=mup): the coordinate check across an 8x width range, dense and
mixture-of-experts, and µP at its base width is SP exactly."""
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


MOE = dict(mlp='moe', n_experts=4, top_k=2)


def trainer_for(width: int, parameterization: str, base: int = 32, lr: float = 3e-3,
                output_mult: float = 1.0, init_mult: float = 1.0, **model):
  c = tiny_config(d_model=width, n_heads=width // 8, n_kv_heads=width // 8, d_ff=2 * width,
                  parameterization=parameterization, mup_base_width=base,
                  mup_output_mult=output_mult, mup_init_mult=init_mult, **model)
  c.train.lr, c.train.warmup_steps = lr, 0
  return init_trainer(c, VOCAB, devices=jax.devices()[:1])


def block_stats(width: int, parameterization: str, **model) -> tuple[np.ndarray, np.ndarray]:
  """RMS of each block's output and (a mixture) each router's largest logit, on a fixed batch
  after 5 Adam steps."""
  trainer = trainer_for(width, parameterization, **model)
  train_metrics(trainer, causal_lm_loss, BATCHES, seed=0)
  b = BATCHES[0]
  with mesh_rules(trainer.mesh):
    batch = global_batch(b, trainer.mesh)
    apply = jax.jit(lambda params: trainer.model.apply(  # eager, a mixture takes ~10 s
        {'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
        rngs={'dropout': jax.random.PRNGKey(0)}, mutable=['intermediates'])[1])
    sown = apply(trainer.state.params)
  by_name = sown['intermediates']['blocks']
  blocks = [by_name[f'layers_{i}'] for i in range(len(by_name))]
  rms = np.array([float(b['act_rms'][0]) for b in blocks])
  router = np.array([float(b['mlp']['logit_max'][0]) for b in blocks if 'mlp' in b])
  return rms, router


@pytest.mark.slow
@pytest.mark.parametrize('model', [{}, MOE], ids=['dense', 'moe'])
def test_coordinate_check_mup_holds_activations_across_width_and_sp_drifts(model):
  """Block outputs: µP's RMS moves by under 1.5x over 8x width, SP's by over 3x. A mixture's
  router is a readout: under µP its largest logit does not grow with width (the learned part
  stays, the init part shrinks as 1/√m), under SP it grows over 3x (left unscaled, µP's did too)."""
  rms, router = {}, {}
  for p in ('mup', 'sp'):
    rms[p], router[p] = map(np.stack, zip(*[block_stats(w, p, **model) for w in WIDTHS]))
  ratio = {p: r.max(0) / r.min(0) for p, r in rms.items()}   # per layer, over widths
  assert (ratio['mup'] < 1.5).all(), ratio
  assert (ratio['sp'] > 3).any(), ratio
  if model:
    assert (router['mup'][-1] <= router['mup'][0]).all(), router
    assert (router['sp'][-1] > 3 * router['sp'][0]).all(), router


@pytest.mark.parametrize('model', [{}, MOE], ids=['dense', 'moe'])
def test_mup_at_its_base_width_is_sp_exactly(model):
  losses = [train_metrics(trainer_for(64, p, base=64, **model), causal_lm_loss, BATCHES[:3], seed=0)
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
  for field in ('mup_output_mult', 'mup_init_mult'):
    with pytest.raises(UserError, match=f'{field}=2.0 needs model.parameterization=mup'):
      model_config(tiny_config(**{field: 2.0}).model, VOCAB, 16)


def test_mup_scales_the_experts_as_hidden_matrices_and_the_router_as_a_readout():
  sp, mup = trainer_for(64, 'sp', **MOE), trainer_for(64, 'mup', base=16, **MOE)   # width_mult 4
  mlp = lambda params: jax.device_get(params['blocks']['layers_0']['mlp'])
  for name in ('gate', 'up', 'down'):
    assert np.std(mlp(mup.state.params)[name]) == pytest.approx(
        np.std(mlp(sp.state.params)[name]) / 2, rel=0.05), name
  assert np.std(mlp(mup.state.params)['router']) == pytest.approx(
      np.std(mlp(sp.state.params)['router']), rel=0.05)
  # the same weights: µP's first router logits are SP's / 4 (later layers see other mixtures)
  x = BATCHES[0]['inputs']
  router_max = lambda t: float(t.model.apply({'params': sp.state.params}, x, mutable=['intermediates'])[1][
      'intermediates']['blocks']['layers_0']['mlp']['logit_max'][0])
  assert router_max(mup) == pytest.approx(router_max(sp) / 4, rel=1e-6)
  # one Adam step from the same weights and gradients: experts move 1/4 as far, the router as far
  grads = jax.tree.map(np.ones_like, sp.state.params)
  step = {name: t.tx.update(grads, t.tx.init(sp.state.params), sp.state.params)[0]
          for name, t in (('sp', sp), ('mup', mup))}
  for name in ('gate', 'up', 'down'):
    np.testing.assert_allclose(mlp(step['mup'])[name], mlp(step['sp'])[name] / 4, rtol=1e-6)
  np.testing.assert_array_equal(mlp(step['mup'])['router'], mlp(step['sp'])['router'])
