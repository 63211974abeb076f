"""Chunked cross-entropy (train.loss_chunk): the same loss, metrics and gradients as the whole
logits, for tied and untied output layers, soft-capping, z-loss, prompt-masked (SFT) weights,
LoRA, seq2seq and masked LM, and through the step's loss; and no [batch, length, vocab] array.

Compilation dominates these tests: each comparison is one jitted program holding both sides, and
weights are drawn on the host (an init, jitted or eager, compiles for seconds)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import model_config, with_lora
from model.errors import UserError
from model.transformer import build_model
from train.objectives import causal_lm_loss, masked_lm_loss, seq2seq_loss
from train.step import training_loss
from train.trainer import with_frozen
from train.validate import validate
from tests.helpers import random_batch, tiny_config

VOCAB, T, Z = 48, 16, 0.3
KEY = jax.random.PRNGKey(0)


def build(cfg, vocab: int = VOCAB, length: int = T, lora: bool = False) -> nn.Module:
  """The one-layer model of `cfg`, with rank-4 adapters on every projection when `lora`."""
  cfg.model.n_layers, cfg.lora.rank, cfg.lora.targets = 1, 4 if lora else 0, 'all'
  return build_model(with_lora(model_config(cfg.model, vocab, length), cfg.lora))


def init(model: nn.Module, seed: int = 0):
  """Random weights of the model's shapes drawn on the host (no init program to compile), large
  enough that the logits are far from uniform (so z-loss and the soft cap matter); adapters too
  when the model has them (lora_b nonzero, unlike its init)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(KEY, jnp.zeros((1, T), jnp.int32))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype),
                      {'lora': {}, **shapes})


@pytest.fixture(scope='module')
def weights():
  """An untied decoder's weights and adapters; tied models (decoder, encoder) drop its lm_head."""
  return init(build(tiny_config(tie_embeddings=False), lora=True))


def tied(params):
  return {k: v for k, v in params.items() if k != 'lm_head'}


def decoder_batch(prompt: int = 0, rows: int = 8, length: int = T):
  """Packed random rows; the first `prompt` positions of each row weigh 0 (an SFT prompt)."""
  batch = random_batch(np.random.default_rng(0), rows, length, VOCAB)
  batch['weights'][:, :prompt] = 0.0
  return jax.tree.map(jnp.asarray, batch)


def mean_loss_and_grads(objective, apply_fn, params, batch):
  """(loss sum, metric sums) and the gradient of (CE + Z·z-loss) per scored token, as the step."""
  def loss(p):
    loss_sum, aux = objective(apply_fn)(p, batch, KEY)
    aux = dict(aux)
    weight = aux.pop('weight', batch['weights'].sum())
    return (loss_sum + Z * aux.get('z_loss', 0.0)) / weight, (loss_sum, aux)
  (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return sums, grads


def assert_close(whole, chunked):
  """Losses and metric sums equal to 1e-6 relative, gradients to 1e-5 absolute (not vacuous)."""
  (sums_a, grads_a), (sums_b, grads_b) = whole, chunked
  assert jax.tree.structure(sums_b) == jax.tree.structure(sums_a)
  for a, b in zip(jax.tree.leaves(sums_a), jax.tree.leaves(sums_b)):
    np.testing.assert_allclose(b, a, rtol=1e-6)
  assert jax.tree.structure(grads_b) == jax.tree.structure(grads_a)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
  assert max(np.abs(g).max() for g in jax.tree.leaves(grads_a)) > 1e-2


def assert_chunking_changes_nothing(objective, chunk, apply_fn, params, batch, **kw):
  """objective(apply_fn, **kw) without and with `chunk`, in one program."""
  both = jax.jit(lambda p: [mean_loss_and_grads(functools.partial(objective, loss_chunk=c, **kw),
                                                apply_fn, p, batch) for c in (0, chunk)])
  whole, chunked = jax.device_get(both(params))
  assert_close(whole, chunked)


@pytest.mark.parametrize('model, chunk, prompt', [
    (dict(), 4, 6),                                         # tied, 4 chunks; SFT prompt weights
    (dict(tie_embeddings=False, logit_softcap=3.0), 5, 0),  # untied, capped; last chunk padded
])
def test_chunked_decoder_loss_and_gradients_match_the_whole_logits(weights, model, chunk, prompt):
  """With z-loss: the z-loss sum (aux['z_loss']) and its gradient match too."""
  model = build(tiny_config(**model))
  params = tied(weights['params']) if model.cfg.tie_embeddings else weights['params']
  batch = decoder_batch(prompt)
  assert_chunking_changes_nothing(causal_lm_loss, chunk, model.apply, params, batch, z_loss=True)


def test_chunked_lora_adapter_gradients_match(weights):
  """LoRA: the frozen base merged in by with_frozen, gradients for the adapters only; a chunk
  longer than the rows is one chunk."""
  model = build(tiny_config(tie_embeddings=False), lora=True)
  assert_chunking_changes_nothing(causal_lm_loss, 64, with_frozen(model.apply, weights['params']),
                                  weights['lora'], decoder_batch(3))


def test_chunked_seq2seq_matches():
  """The encoder-decoder's decoder features (the encoder inputs as keywords) chunk the same way."""
  from tests.train.test_encdec import S, VOCAB as ENCDEC_VOCAB, encdec_config, seq2seq_batch
  model = build(encdec_config(n_decoder_layers=1), ENCDEC_VOCAB, S)
  batch = jax.tree.map(jnp.asarray, seq2seq_batch(0, rows=4))
  assert_chunking_changes_nothing(seq2seq_loss, 5, model.apply, init(model)['params'], batch,
                                  z_loss=True)


def test_chunked_masked_lm_matches(weights):
  """The encoder's masked LM (its own weight: the picked tokens) chunks the same way."""
  model = build(tiny_config(family='encoder'))
  assert_chunking_changes_nothing(masked_lm_loss, 8, model.apply, tied(weights['params']),
                                  decoder_batch(rows=4), mask_id=0)


def test_the_step_loss_takes_the_chunked_z_loss_and_keeps_the_statistics(weights):
  """train/step.py's loss: the chunked objective's z-loss equals the whole-logits objective's,
  and the per-layer statistics (sown by the features call) survive the output layer's calls
  inside the scan."""
  model, params, batch = build(tiny_config()), tied(weights['params']), decoder_batch(prompt=2)
  objectives = (functools.partial(causal_lm_loss, z_loss=True),
                functools.partial(causal_lm_loss, loss_chunk=4, z_loss=True))
  both = jax.jit(lambda p: [jax.value_and_grad(training_loss(o, model.apply, Z, True),
                                               has_aux=True)(p, batch, KEY) for o in objectives])
  (whole, grads_a), (chunked, grads_b) = jax.device_get(both(params))
  assert set(whole[1][1]) == {'accuracy', 'z_loss'} and 'act_rms/blocks/layers_0' in whole[1][2]
  weight = float(np.sum(batch['weights']))
  per_token = lambda g: jax.tree.map(lambda x: x / weight, g)  # as the step divides them
  assert_close((whole, per_token(grads_a)), (chunked, per_token(grads_b)))


def test_no_batch_length_vocab_array_in_the_chunked_program(weights):
  """The lowered loss-and-gradient program holds chunks of logits, never [b, t, v]."""
  objective = causal_lm_loss(build(tiny_config(), length=64).apply, loss_chunk=16, z_loss=True)
  batch = decoder_batch(rows=2, length=64)
  program = jax.jit(jax.grad(lambda p: objective(p, batch, KEY)[0])).lower(
      tied(weights['params'])).as_text()
  assert f'tensor<2x16x{VOCAB}xf32>' in program
  assert f'tensor<2x64x{VOCAB}xf32>' not in program


def test_loss_chunk_must_not_be_negative():
  cfg = tiny_config()
  cfg.train.loss_chunk = -1
  with pytest.raises(UserError, match='train.loss_chunk=-1 must be >= 0'):
    validate(cfg)
