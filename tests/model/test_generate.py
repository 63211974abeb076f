"""KV-cache generation against full recomputation, stops, seeds, context limits and sharding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from model.config import ModelConfig
from model.errors import UserError
from model.generate import generate, generate_rows
from model.sampling import Sampling
from model.transformer import build_model, init_cache
from train.mesh import LOGICAL_RULES, MESH_AXES, mesh_rules

PROMPTS = [[1, 5, 7], [2, 3, 4, 5, 6, 9, 11, 12, 3, 8], [4]]  # different lengths: left padding
GREEDY = Sampling(temperature=0.0)


def tiny(scan: bool = False, **kw) -> tuple[ModelConfig, dict]:
  """A 2-layer GQA model whose weights are scaled up so logits are far from uniform."""
  cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, max_len=48, scan_layers=scan, **kw)
  boxed = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(lambda x: x * 4, nn.meta.unbox(boxed))
  return cfg, params


def full_logits(cfg: ModelConfig, params: dict, rows: list[list[int]]) -> list[np.ndarray]:
  """The oracle: one forward pass over each whole sequence, no cache. The model is causal, so its
  logits at position t are what recomputing the prefix 0..t from scratch at step t gives (and the
  right padding that batches the rows cannot change them)."""
  width = max(map(len, rows))
  batch = jnp.asarray([r + [0] * (width - len(r)) for r in rows], jnp.int32)
  logits = np.asarray(jax.jit(build_model(cfg).apply)({'params': params}, batch))
  return [row_logits[:len(r)] for row_logits, r in zip(logits, rows)]


@pytest.mark.parametrize('scan, stability', [(False, {}), (True, {}),
                                             (False, dict(qk_norm=True, attn_softcap=5.0,
                                                          logit_softcap=10.0)),
                                             (False, dict(qk_norm=True))])
def test_kv_cache_decoding_matches_recompute(scan, stability):
  """Prefill (left-padded batch) then one token per step through the cache, teacher-forced with a
  fixed continuation: every step's logits equal the full recomputation's up to f32 rounding, 5e-6
  of the largest logit (the two paths sum in other orders and the x4 weights make the softmax
  inputs large: 1.9e-6 measured on an AVX-512 CPU, where an absolute 1e-5 failed by 0.5%); with
  QK-norm and soft-capping too (the cache holds normed keys). A cache bug (a wrong slot,
  position or mask) moves logits by O(0.1)."""
  cfg, params = tiny(scan, **stability)
  model = build_model(cfg)
  rng = np.random.default_rng(0)
  steps = 6
  rows = [p + rng.integers(0, cfg.vocab_size, steps).tolist() for p in PROMPTS]
  width = max(map(len, PROMPTS))
  start = jnp.asarray([width - len(p) for p in PROMPTS], jnp.int32)
  tokens = jnp.asarray([[0] * (width - len(p)) + p for p in PROMPTS], jnp.int32)
  positions = jnp.maximum(jnp.arange(width)[None] - start[:, None], 0)
  decode = jax.jit(lambda p, tok, pos, cache: model.apply({'params': p}, tok, pos, cache,
                                                           method='decode'))
  logits, cache = decode(params, tokens, positions, init_cache(cfg, start, width + steps))
  cached = [np.asarray(logits)]
  for i in range(steps):
    token = jnp.asarray([[r[len(p) + i]] for r, p in zip(rows, PROMPTS)], jnp.int32)
    logits, cache = decode(params, token, (cache.index - cache.start)[:, None], cache)
    cached.append(np.asarray(logits))
  for b, (oracle, prompt) in enumerate(zip(full_logits(cfg, params, rows), PROMPTS)):
    got = np.concatenate([cached[0][b, width - len(prompt):]] + [c[b] for c in cached[1:]])
    want = oracle[:len(prompt) + steps]
    rel = 1e-5 if stability.get('attn_softcap') else 5e-6  # tanh of large logits: more roundings
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


@pytest.mark.parametrize('scan', [False, True])
def test_greedy_generation_matches_full_forward(scan):
  cfg, params = tiny(scan)
  out = generate(build_model(cfg), params, PROMPTS, max_new_tokens=8, rng=jax.random.PRNGKey(0),
                 sampling=GREEDY)
  tokens, logprobs, lengths = jax.device_get(tuple(out))
  assert tokens.shape == (3, 8) and lengths.tolist() == [8, 8, 8]
  oracles = full_logits(cfg, params, [p + t.tolist() for p, t in zip(PROMPTS, tokens)])
  for b, prompt in enumerate(PROMPTS):
    oracle = oracles[b][len(prompt) - 1:-1]
    np.testing.assert_array_equal(oracle.argmax(-1), tokens[b])
    expected = np.take_along_axis(jax.nn.log_softmax(oracle), tokens[b][:, None], -1)[:, 0]
    np.testing.assert_allclose(logprobs[b], expected, atol=1e-5)


def test_rows_stop_at_their_stop_token():
  cfg, params = tiny()
  model = build_model(cfg)
  free = generate(model, params, PROMPTS, max_new_tokens=8, rng=jax.random.PRNGKey(0),
                  sampling=GREEDY)
  stop = int(free.tokens[1, 2])  # row 1 emits this at step 2
  out = generate(model, params, PROMPTS, max_new_tokens=8, rng=jax.random.PRNGKey(0),
                 sampling=GREEDY, stop_ids=(stop,), pad_id=63)
  tokens, logprobs, lengths = jax.device_get(tuple(out))
  for b in range(3):
    row = free.tokens[b].tolist()
    n = row.index(stop) + 1 if stop in row else 8
    assert lengths[b] == n
    np.testing.assert_array_equal(tokens[b, :n], row[:n])
    assert (tokens[b, n:] == 63).all() and (logprobs[b, n:] == 0).all()


def test_sampling_is_reproducible_with_a_seed():
  cfg, params = tiny()
  model = build_model(cfg)
  run = lambda seed: np.asarray(generate(
      model, params, PROMPTS, max_new_tokens=12, rng=jax.random.PRNGKey(seed),
      sampling=Sampling(temperature=1.0, top_k=20, top_p=0.95, min_p=0.01)).tokens)
  np.testing.assert_array_equal(run(1), run(1))
  assert (run(1) != run(2)).any()


def test_generation_stops_at_the_context_length():
  cfg, params = tiny(pos_encoding='learned')  # a position table: overrunning it would be wrong
  out = generate(build_model(cfg), params, [[1] * 40, [2]], max_new_tokens=20,
                 rng=jax.random.PRNGKey(0), sampling=GREEDY)
  # The context holds the prompt and every generated token but the last (which is never fed):
  # 48 - 40 + 1 = 9 tokens, and greedy decoding equals argmax of one full 48-token forward.
  assert out.tokens.shape == (2, cfg.max_len - 40 + 1) and out.lengths.tolist() == [9, 9]
  generated = np.asarray(out.tokens[0]).tolist()
  logits = full_logits(cfg, params, [[1] * 40 + generated[:-1]])[0]
  assert len(logits) == cfg.max_len
  np.testing.assert_array_equal(logits[39:].argmax(-1), generated)


def test_prompt_longer_than_context_is_a_one_line_error():
  cfg, params = tiny()
  with pytest.raises(UserError) as e:
    generate(build_model(cfg), params, [[1, 2], [3] * 48], max_new_tokens=4,
             rng=jax.random.PRNGKey(0))
  assert 'prompt 1 is 48 tokens' in str(e.value) and '\n' not in str(e.value)


def test_sharded_generation_matches_single_device():
  cfg, params = tiny()
  model = build_model(cfg)
  sampling = Sampling(temperature=0.8, top_k=30)
  ref = generate(model, params, PROMPTS, max_new_tokens=6, rng=jax.random.PRNGKey(3),
                 sampling=sampling)
  mesh = jax.make_mesh((2, 2, 2, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  boxed = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 8), jnp.int32))['params'])
  with mesh_rules(mesh):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
    sharded = jax.device_put(params, shardings)
    assert len(sharded['blocks']['layers_0']['mlp']['up']['kernel'].sharding.device_set) == 8
    out = generate(model, sharded, PROMPTS, max_new_tokens=6, rng=jax.random.PRNGKey(3),
                   sampling=sampling)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)


def test_xla_attention_path_generates_the_same():
  cfg, params = tiny()
  run = lambda c: np.asarray(generate(build_model(c), params, PROMPTS, max_new_tokens=6,
                                      rng=jax.random.PRNGKey(0), sampling=GREEDY).logprobs)
  np.testing.assert_allclose(run(dataclasses.replace(cfg, attention='xla')), run(cfg), atol=1e-5)


@pytest.mark.parametrize('family, encoder_inputs, words', [
    ('encoder', None, 'family=encoder'),
    ('encoder_decoder', None, 'encoder_inputs'),
    ('decoder', [[5, 6]] * 3, 'encoder_inputs')])
def test_family_mismatch_is_a_one_line_error(family, encoder_inputs, words):
  """An encoder-only model cannot continue text; an encoder-decoder needs encoder inputs and a
  decoder takes none: each is one line naming the problem, not a shape error deep in the model."""
  cfg = ModelConfig(vocab_size=64, family=family, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, max_len=48, pos_encoding='learned')
  params = nn.meta.unbox(build_model(cfg).init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 8), jnp.int32))['params'])
  with pytest.raises(UserError) as e:
    generate(build_model(cfg), params, PROMPTS, max_new_tokens=4, rng=jax.random.PRNGKey(0),
             encoder_inputs=encoder_inputs)
  assert words in str(e.value) and '\n' not in str(e.value)


def test_generate_rows_equals_chunked_generate_cut_at_lengths():
  """The host-rows helper is the loop the stages had: chunks of generate with the same key (or
  the key folded with each chunk's first prompt index), each row cut at its length."""
  cfg, params = tiny()
  model = build_model(cfg)
  prompts = PROMPTS * 3
  sampling, stops = Sampling(temperature=1.0), tuple(range(0, 64, 4))  # stops often
  for fold in (False, True):
    rows = generate_rows(model, params, prompts, max_new_tokens=6, rng=jax.random.PRNGKey(5),
                         chunk_size=4, fold_chunk_start=fold, sampling=sampling, stop_ids=stops)
    expected_tokens, expected_logprobs = [], []
    for i in range(0, len(prompts), 4):
      key = jax.random.fold_in(jax.random.PRNGKey(5), i) if fold else jax.random.PRNGKey(5)
      out = generate(model, params, prompts[i:i + 4], max_new_tokens=6, rng=key,
                     sampling=sampling, stop_ids=stops)
      for t, lp, n in zip(np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)):
        expected_tokens.append(t[:n].tolist())
        expected_logprobs.append(lp[:n])
    assert [r.tolist() for r in rows.tokens] == expected_tokens
    assert any(len(r) < 6 for r in expected_tokens)  # some rows stopped early: cuts differ
    for got, want in zip(rows.logprobs, expected_logprobs):
      np.testing.assert_array_equal(got, want)
