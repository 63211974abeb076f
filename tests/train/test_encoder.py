"""Encoder family with the masked-LM objective: BERT corruption statistics, bidirectional and
padding masks, sharded == one device (8 fake CPUs), and exact resume from a checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint
from train.loop import init_trainer
from train.objectives import mask_tokens, masked_lm_loss
from tests.helpers import random_batch, tiny_config, train_metrics

VOCAB, PAD = 64, 0
BATCHES = [random_batch(np.random.default_rng(i), 16, 16, VOCAB) for i in range(8)]


def encoder_trainer(mesh=(1, 1, 1)):
  c = tiny_config(family='encoder', n_heads=8, n_kv_heads=8, d_model=64, d_ff=128,
                  pos_encoding='learned', norm='layernorm', norm_position='post', mlp='gelu_exact',
                  use_bias=True, embed_norm=True, type_vocab_size=2)
  c.train.batch_size = 16
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return init_trainer(c, VOCAB, devices=jax.devices()[:int(np.prod(mesh))])


def train_losses(trainer, batches):
  """MLM losses of consecutive steps; masks come from the step rng (seed, step)."""
  return train_metrics(trainer, lambda apply_fn: masked_lm_loss(apply_fn, PAD),
                       [BATCHES[i] for i in batches], seed=1, names=('loss', 'accuracy'))


def test_mask_tokens_follows_bert_recipe():
  inputs = jnp.full((64, 512), 7, jnp.int32)
  eligible = jnp.arange(512)[None, :] < 400
  corrupted, picked = mask_tokens(jax.random.PRNGKey(0), inputs, eligible, mask_id=1, vocab=1000)
  picked, corrupted = np.asarray(picked), np.asarray(corrupted)
  assert not picked[:, 400:].any()
  assert picked[:, :400].mean() == pytest.approx(0.15, abs=0.01)
  changed = corrupted[picked]
  assert (changed == 1).mean() == pytest.approx(0.8, abs=0.02)
  assert ((changed != 1) & (changed != 7)).mean() == pytest.approx(0.1, abs=0.02)
  assert (corrupted[~picked] == 7).all()


def test_encoder_sees_both_directions_but_not_padding():
  trainer = encoder_trainer()
  apply = lambda tokens, seg: trainer.eval_model.apply({'params': trainer.state.params}, tokens,
                                                       None, seg)
  tokens = jnp.arange(3, 11)[None]
  seg = jnp.array([[1] * 6 + [0] * 2])
  base = apply(tokens, seg)
  later = apply(tokens.at[0, 5].set(40), seg)          # a later real token changes earlier outputs
  assert not np.allclose(base[0, 0], later[0, 0])
  padded = apply(tokens.at[0, 7].set(40), seg)          # padding changes no real token
  np.testing.assert_array_equal(base[0, :6], padded[0, :6])


def test_encoder_sharded_equals_single_device():
  """data x fsdp x tensor = 2 x 2 x 2: the same MLM losses and accuracies, step by step."""
  np.testing.assert_allclose(train_losses(encoder_trainer((2, 2, 2)), range(4)),
                             train_losses(encoder_trainer(), range(4)), rtol=1e-5)


def test_encoder_resume_is_exact(tmp_path):
  """Saved after 3 steps, restored into a fresh trainer: the next steps match bit for bit."""
  source = encoder_trainer()
  train_losses(source, range(3))
  manager = checkpoint.make_manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(manager, 3, source.state, {'tokens': 0, 'flops': 0.0})
  manager.wait_until_finished()
  expected = train_losses(source, range(3, 6))
  target = encoder_trainer()
  target.state, _ = checkpoint.restore(manager, 3, target.state)
  np.testing.assert_array_equal(train_losses(target, range(3, 6)), expected)
