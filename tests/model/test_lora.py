"""LoRA: the adapted model starts equal to the base, trains only adapters, and merges exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import with_lora
from model.errors import UserError
from model.lora import count_params, merge_lora
from train.step import make_train_step
from train.trainer import init_trainer
from train.objectives import causal_lm_loss
from tests.helpers import random_batch, tiny_config

VOCAB = 64


def lora_config(targets='query,value', scan=False, rank=4):
  c = tiny_config(scan_layers=scan)
  c.lora.rank, c.lora.alpha, c.lora.targets = rank, 8.0, targets
  c.train.lr, c.train.warmup_steps, c.train.steps = 3e-2, 0, 40
  return c


def rule_batch(seed, mul, add):
  """Packed rows whose next token is a fixed function of the current one."""
  batch = random_batch(np.random.default_rng(seed), 8, 16, VOCAB)
  batch['targets'] = (batch['inputs'] * mul + add) % VOCAB
  return batch


def base_trainer(scan=False, steps=0):
  """A base model, pretrained for `steps` on one rule (a random init's tiny tied embeddings leave
  adapters no room to move the logits, unlike any real base model)."""
  c = tiny_config(scan_layers=scan)
  c.train.lr, c.train.warmup_steps = 1e-2, 0
  trainer = init_trainer(c, VOCAB, devices=jax.devices()[:1])
  step = make_train_step(trainer, causal_lm_loss)
  for _ in range(steps):
    trainer.state, _ = step(trainer.state, rule_batch(2, 5, 2), jax.random.PRNGKey(0))
  return trainer


@pytest.mark.parametrize('scan', [False, True])
def test_step0_equals_base_and_training_touches_only_adapters(scan):
  base = base_trainer(scan, steps=40)
  c = lora_config('all', scan)
  lora = init_trainer(c, VOCAB, devices=jax.devices()[:1], model_cfg=base.model_cfg,
                      init_params=base.state.params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 16)), jnp.int32)
  base_logits = base.model.apply({'params': base.state.params}, tokens)
  assert np.array_equal(lora.model.apply(lora.variables(), tokens), base_logits)
  # Only adapters are trainable: lora_a and lora_b of 7 projections in every (stacked if scanned) layer.
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(lora.state.params)}
  assert names == {'lora_a', 'lora_b'}
  layers = 1 if scan else base.model_cfg.n_layers
  assert len(jax.tree.leaves(lora.state.params)) == 7 * 2 * layers
  assert count_params(lora.state.params) < count_params(lora.frozen) / 5

  frozen_before = jax.tree.map(np.array, lora.frozen)
  step = make_train_step(lora, causal_lm_loss)
  batch = rule_batch(1, 3, 1)  # a new rule for the adapters to learn
  losses = []
  for _ in range(40):
    lora.state, m = step(lora.state, batch, jax.random.PRNGKey(0))
    losses.append(float(m['loss']))
  assert losses[-1] < 0.2 * losses[0]  # the adapters learned the new rule
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), frozen_before,
               lora.frozen)  # the base is bit-identical after training

  adapted = lora.model.apply(lora.variables(), tokens)
  assert not np.allclose(adapted, base_logits, atol=1e-3)
  merged = merge_lora(lora.frozen, lora.state.params, lora.model_cfg)
  np.testing.assert_allclose(base.model.apply({'params': merged}, tokens), adapted, atol=1e-5)
  # Without the 'lora' collection the adapted model is the base (the RLHF reference).
  assert np.array_equal(lora.model.apply({'params': lora.frozen}, tokens), base_logits)


def test_lora_targets_are_checked():
  base = base_trainer()
  for targets in ('qeury', 'gate,banana', ''):
    with pytest.raises(UserError, match='matches no layer'):
      with_lora(base.model_cfg, lora_config(targets).lora)
  gelu = tiny_config(mlp='gelu')
  gelu.lora.rank, gelu.lora.targets = 4, 'gate'
  with pytest.raises(UserError, match='gate matches no layer'):
    init_trainer(gelu, VOCAB, devices=jax.devices()[:1])
  cfg = with_lora(base.model_cfg, lora_config('query, out').lora)
  assert cfg.lora_targets == ('query', 'out') and cfg.lora_rank == 4


def test_pretrained_mismatch_is_an_error():
  base = base_trainer()
  bad = dict(base.state.params)
  bad.pop('final_norm')
  with pytest.raises(UserError, match='missing'):
    init_trainer(tiny_config(), VOCAB, devices=jax.devices()[:1], model_cfg=base.model_cfg,
                 init_params=bad)
  wide = init_trainer(tiny_config(d_model=64, d_ff=128), VOCAB, devices=jax.devices()[:1])
  with pytest.raises(UserError, match='shape'):
    init_trainer(tiny_config(), VOCAB, devices=jax.devices()[:1], model_cfg=base.model_cfg,
                 init_params=wide.state.params)
