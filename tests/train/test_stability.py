"""Stability tools and run statistics: QK-norm, soft-capping, z-loss, spike skipping, weight EMA,
Muon, and per-layer statistics against a reference computed outside the step."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model.config import model_config
from model.errors import UserError
from model.transformer import build_model
from train.mesh import global_batch, mesh_rules
from train.objectives import causal_lm_loss, masked_lm_loss, token_nll
from train.loop import eval_view
from train.stability import check_step, ema_params, spike_state
from train.state import muon_labels
from train.step import make_train_step
from train.trainer import init_trainer
from tests.helpers import random_batch, tiny_config

VOCAB = 48


def model_and_params(cfg, seed: int = 0):
  model = build_model(model_config(cfg.model, VOCAB, cfg.train.seq_len))
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 16)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens))
  return model, jax.device_get(params), tokens


def scale_leaf(params, layer: str, factor: float):
  """params with every layer's `layer` kernel (query, key) multiplied by `factor`."""
  def leaf(path, x):
    names = [getattr(k, 'key', None) for k in path]
    return x * factor if layer in names and names[-1] == 'kernel' else x
  return jax.tree_util.tree_map_with_path(leaf, params)


def test_qk_norm_makes_logits_independent_of_query_and_key_scale():
  """RMSNorm per head: scaling the query and key projections by 30 changes nothing with QK-norm
  and a lot without (the attention logits grow 900-fold)."""
  for qk_norm, changes in ((True, False), (False, True)):
    model, params, tokens = model_and_params(tiny_config(qk_norm=qk_norm))
    big = scale_leaf(scale_leaf(params, 'query', 30.0), 'key', 30.0)
    a, b = model.apply(params, tokens), model.apply(big, tokens)
    assert (np.abs(a - b).max() > 1e-2) == changes
    assert ('query_norm' in params['params']['blocks']['layers_0']['attn']) == qk_norm


def test_qk_norm_changes_the_logits():
  model, params, tokens = model_and_params(tiny_config(qk_norm=True))
  plain = build_model(model_config(tiny_config().model, VOCAB, 16))
  base = jax.tree.map(lambda x: x, params)
  for layer in base['params']['blocks'].values():
    del layer['attn']['query_norm'], layer['attn']['key_norm']
  assert np.abs(model.apply(params, tokens) - plain.apply(base, tokens)).max() > 1e-3


def test_logit_softcap_bounds_the_logits_as_tanh():
  model, params, tokens = model_and_params(tiny_config())
  big = jax.tree.map(lambda x: x * 8.0, params)  # logits of magnitude ~ tens
  raw = model.apply(big, tokens)
  capped_model = build_model(model_config(tiny_config(logit_softcap=5.0).model, VOCAB, 16))
  capped = capped_model.apply(big, tokens)
  assert np.abs(raw).max() > 10.0
  assert np.abs(capped).max() < 5.0
  np.testing.assert_allclose(capped, 5.0 * np.tanh(raw / 5.0), rtol=1e-5, atol=1e-5)


def test_attention_softcap_bounds_the_attention_logits():
  """The sown attention-logit maximum (run statistics) stays below the cap."""
  for cap in (0.0, 2.0):
    model, params, tokens = model_and_params(tiny_config(attn_softcap=cap))
    big = scale_leaf(scale_leaf(params, 'query', 30.0), 'key', 30.0)
    _, state = model.apply(big, tokens, mutable=['intermediates'])
    top = max(float(v) for p, v in jax.tree_util.tree_leaves_with_path(state['intermediates'])
              if 'logit_max' in jax.tree_util.keystr(p))
    assert (top <= 2.0) == (cap == 2.0), top


def test_attention_softcap_needs_the_einsum_path():
  with pytest.raises(UserError, match='attn_softcap'):
    model_config(tiny_config(attn_softcap=50.0, attention='xla').model, VOCAB, 16)


def one_step(cfg, batch, objective=causal_lm_loss, with_stats=False, trainer=None):
  trainer = trainer or init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  before = jax.device_get(trainer.state)
  step = make_train_step(trainer, objective, with_stats)
  with mesh_rules(trainer.mesh):
    trainer.state, m = step(trainer.state, global_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
  return trainer, before, jax.device_get(m)


def test_z_loss_adds_log_z_squared_to_the_gradient_only():
  """The step's gradient is that of CE + z·mean(log Z^2) (reference: jax.grad outside the step);
  the logged loss stays the cross-entropy."""
  batch = random_batch(np.random.default_rng(0), 8, 16, VOCAB)
  cfg = tiny_config()
  cfg.train.z_loss, cfg.train.clip_norm, cfg.train.optimizer = 0.3, 0.0, 'adamw'
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  params = jax.device_get(trainer.state.params)
  model, w = trainer.model, batch['weights']

  def reference(p, z):
    logits = model.apply({'params': p}, batch['inputs'], batch['positions'], batch['segment_ids'])
    ce = (token_nll(logits, batch['targets']) * w).sum() / w.sum()
    zl = (jax.nn.logsumexp(logits, -1) ** 2 * w).sum() / w.sum()
    return ce + z * zl, (ce, zl)

  (_, (ce, zl)), g = jax.value_and_grad(reference, has_aux=True)(params, 0.3)
  _, _, m = one_step(cfg, batch, functools.partial(causal_lm_loss, z_loss=True), trainer=trainer)
  assert m['loss'] == pytest.approx(float(ce), rel=1e-6)
  assert m['z_loss'] == pytest.approx(float(zl), rel=1e-5)
  assert m['grad_norm'] == pytest.approx(float(optax.tree.norm(g)), rel=1e-5)
  _, g0 = jax.value_and_grad(reference, has_aux=True)(params, 0.0)
  assert abs(float(optax.tree.norm(g0)) - m['grad_norm']) > 1e-4  # the z term is really there


def test_z_loss_refuses_an_objective_it_does_not_fit():
  cfg = tiny_config(family='encoder')
  cfg.train.z_loss = 1e-4
  with pytest.raises(UserError, match='z_loss'):
    one_step(cfg, random_batch(np.random.default_rng(0), 8, 16, VOCAB),
             lambda f: masked_lm_loss(f, mask_id=0))


def test_a_spiking_step_leaves_the_weights_bit_identical():
  """Thirty steps memorise one batch (none skipped); that batch with every target wrong spikes
  the loss and is skipped, bit for bit; so is a NaN one; then an ordinary step trains again."""
  cfg = tiny_config()
  cfg.train.spike_threshold, cfg.train.spike_warmup, cfg.train.lr = 6.0, 5, 1e-2
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  step = make_train_step(trainer, causal_lm_loss)
  fixed = random_batch(np.random.default_rng(0), 8, 16, VOCAB)

  def run(batch):
    before = jax.device_get(trainer.state)
    with mesh_rules(trainer.mesh):
      trainer.state, m = step(trainer.state, global_batch(batch, trainer.mesh),
                              jax.random.PRNGKey(0))
    return before, jax.device_get(trainer.state), jax.device_get(m)

  for _ in range(30):
    _, _, m = run(fixed)
    assert m['skipped'] == 0.0
  before, after, m = run(dict(fixed, targets=(fixed['targets'] + 7) % VOCAB))
  assert m['skipped'] == 1.0 and m['skipped_total'] == 1 and m['skipped_in_a_row'] == 1
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
  for a, b in zip(jax.tree.leaves(spike_state(before.opt_state).inner),
                  jax.tree.leaves(spike_state(after.opt_state).inner)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert int(after.step) == int(before.step) + 1
  _, _, m = run(dict(fixed, weights=fixed['weights'] * np.nan))
  assert m['skipped'] == 1.0 and m['skipped_in_a_row'] == 2
  before, after, m = run(fixed)
  assert m['skipped'] == 0.0 and m['skipped_in_a_row'] == 0 and m['skipped_total'] == 2
  assert all(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))


def test_weight_ema_follows_its_recurrence():
  cfg = tiny_config()
  cfg.train.ema_decay = 0.9
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  ema = jax.device_get(trainer.state.params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    one_step(cfg, random_batch(rng, 8, 16, VOCAB), trainer=trainer)
    new = jax.device_get(trainer.state.params)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, new)
  got = jax.device_get(ema_params(trainer.state.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, ema)
  assert ema_params(init_trainer(tiny_config(), VOCAB, devices=jax.devices()[:1]).state.opt_state) is None


def test_muon_orthogonalises_the_layer_matrices_and_leaves_the_rest_to_adamw():
  """Muon's first update of a projection is its gradient orthogonalised: all singular values
  alike (Newton-Schulz brings them to about 1); AdamW's sign-like update has a spread."""
  cfg = tiny_config()
  cfg.train.optimizer, cfg.train.weight_decay, cfg.train.clip_norm = 'muon', 0.0, 0.0
  cfg.train.warmup_steps = 0
  batch = random_batch(np.random.default_rng(0), 8, 16, VOCAB)
  trainer, before, _ = one_step(cfg, batch)
  labels = muon_labels(before.params)
  assert labels['embed']['embedding'] == 'adam'
  assert labels['blocks']['layers_0']['attn']['query']['kernel'] == 'muon'
  assert labels['blocks']['layers_0']['attn_norm']['scale'] == 'adam'
  after = jax.device_get(trainer.state.params)
  up = lambda p: p['blocks']['layers_1']['mlp']['up']['kernel']
  s = np.linalg.svd(up(after) - up(before.params), compute_uv=False)
  assert s.max() / s.min() < 2.0, s
  cfg.train.optimizer = 'adamw'
  trainer, before, _ = one_step(cfg, batch)
  s = np.linalg.svd(up(jax.device_get(trainer.state.params)) - up(before.params), compute_uv=False)
  assert s.max() / s.min() > 3.0, s


def test_muon_orthogonalises_each_expert_of_a_mixture_and_leaves_the_router_to_adamw():
  cfg = tiny_config(mlp='moe', n_experts=4, top_k=2)
  cfg.train.optimizer, cfg.train.weight_decay, cfg.train.clip_norm = 'muon', 0.0, 0.0
  cfg.train.warmup_steps = 0
  trainer, before, _ = one_step(cfg, random_batch(np.random.default_rng(0), 8, 16, VOCAB))
  labels = muon_labels(before.params)['blocks']['layers_0']['mlp']
  assert labels == {'gate': 'muon', 'up': 'muon', 'down': 'muon', 'router': 'adam'}
  up = lambda p: p['blocks']['layers_1']['mlp']['up']   # [experts, d_model, d_ff]
  delta = up(jax.device_get(trainer.state.params)) - up(before.params)
  for e, update in enumerate(delta):
    s = np.linalg.svd(update, compute_uv=False)
    assert s.max() / s.min() < 2.0, (e, s)


def test_weight_decay_reaches_every_matmul_kernel_mixture_experts_and_router_included():
  """AdamW on zero gradients is its decay alone: every kernel (attention, output layer, a
  mixture's experts and router) shrinks by lr·wd; embeddings and norms stay."""
  cfg = tiny_config(mlp='moe', n_experts=4, top_k=2, tie_embeddings=False)
  cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps = 1e-2, 0.1, 0
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  params = jax.device_get(trainer.state.params)
  zeros = jax.tree.map(np.zeros_like, params)
  new = optax.apply_updates(params, trainer.tx.update(zeros, trainer.tx.init(params), params)[0])
  f64 = lambda x: np.asarray(x, np.float64)
  shrink = {'/'.join(k.key for k in path): 1 - np.sum(f64(b) * a) / np.sum(f64(a) * a)
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new))}
  layer = 'blocks/layers_0/'
  for name in ('mlp/gate', 'mlp/up', 'mlp/down', 'mlp/router', 'attn/query/kernel', 'lm_head/kernel'):
    assert shrink[name if name.startswith('lm_head') else layer + name] == pytest.approx(1e-3, rel=1e-3), name
  for name in ('embed/embedding', layer + 'attn_norm/scale', 'final_norm/scale'):
    assert shrink[name] == 0.0, name


def flat_rms(tree, prefix):
  return {f'{prefix}/' + '/'.join(str(k.key) for k in path): float(np.sqrt(np.mean(np.square(x))))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('scan', [False, True])
def test_layer_statistics_match_a_reference_outside_the_step(scan):
  """RMS of parameters, gradients and updates per tensor, and each block's activation RMS,
  against jax.tree on the same params and grads outside the step (1e-5)."""
  cfg = tiny_config(scan_layers=scan)
  cfg.train.clip_norm = 0.0
  batch = random_batch(np.random.default_rng(0), 8, 16, VOCAB)
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  params = jax.device_get(trainer.state.params)
  grad_fn = jax.grad(lambda p: (lambda s, a: s / batch['weights'].sum())(*causal_lm_loss(
      trainer.model.apply)(p, batch, jax.random.PRNGKey(0))))
  grads = grad_fn(params)
  updates, _ = trainer.tx.update(grads, jax.device_get(trainer.state.opt_state), params)
  _, _, m = one_step(cfg, batch, with_stats=True, trainer=trainer)
  if scan:  # reference in the per-layer layout
    split = lambda t: {**t, 'blocks': {f'layers_{i}': jax.tree.map(lambda x: x[i], t['blocks']['layers']['block'])
                                       for i in range(2)}}
    params, grads, updates = split(params), split(grads), split(updates)
  ref = {**flat_rms(params, 'param_rms'), **flat_rms(grads, 'grad_rms'),
         **flat_rms(updates, 'update_rms')}
  for k, v in ref.items():
    assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
  model = build_model(model_config(tiny_config().model, VOCAB, 16))
  x = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                  method=lambda mdl, t, pos, seg: mdl.run_stack(mdl.blocks, t, pos, seg))
  assert m['act_rms/blocks/layers_1'] == pytest.approx(float(np.sqrt(np.mean(np.square(x)))), rel=1e-5)
  assert {'param_norm', 'update_norm', 'logit_max/blocks/layers_0/attn'} <= set(m)


def test_a_diverged_run_ends_with_one_line():
  check_step({'loss': float('nan'), 'skipped': 1.0, 'skipped_in_a_row': 3}, 7, max_skips=4)
  with pytest.raises(UserError, match='loss became nan at step 7'):
    check_step({'loss': float('nan')}, 7, max_skips=4)
  with pytest.raises(UserError, match='4 steps in a row skipped'):
    check_step({'loss': 9.0, 'skipped': 1.0, 'skipped_in_a_row': 4}, 7, max_skips=4)


def test_evaluation_sees_the_averaged_weights():
  cfg = tiny_config()
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  assert eval_view(trainer) is trainer
  cfg.train.ema_decay = 0.5
  trainer = init_trainer(cfg, VOCAB, devices=jax.devices()[:1])
  one_step(cfg, random_batch(np.random.default_rng(0), 8, 16, VOCAB), trainer=trainer)
  view = eval_view(trainer)
  assert view.state.params is ema_params(trainer.state.opt_state)
  assert view.state.step is trainer.state.step
