"""Training throughput for a config: tokens/s, step time, MFU against the device peak, memory.

  python benchmarks/train_throughput.py --config=experiments/shakespeare_char.py --steps=50
  python benchmarks/train_throughput.py --config=experiments/quickstart.py --config.model.d_model=384

Random token batches (no data pipeline, so only the model and optimizer are timed); the first
steps are warm-up and not counted. The peak on CPU is a measured jit'ed f32 matmul (cached).
"""
import functools
import resource
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'experiments/quickstart.py', 'Experiment config.',
                                lock_config=True)
flags.DEFINE_integer('steps', 30, 'Timed steps.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
flags.DEFINE_bool('measure_peak', False, 'Measure the CPU matmul peak again (keeps the best seen).')
flags.DEFINE_integer('stats_every', 0, 'Also time the run with per-layer statistics every k steps '
                     '(metrics.stats_every) against without, interleaved, metrics pulled every step.')
flags.DEFINE_integer('vocab', 0, 'Vocabulary size (0 = model.vocab_size or 65, as Shakespeare chars).')


def main(_):
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()  # the same XLA flags as run.py, before JAX starts
  import jax
  import numpy as np

  from train.step import compile_train_step
  from train.trainer import init_trainer
  from train.mesh import global_batch, mesh_rules
  from train.metrics import device_peak_flops, flops_per_token
  from train.objectives import causal_lm_loss

  cfg, F = flags.FLAGS.config, flags.FLAGS
  vocab = F.vocab or cfg.model.vocab_size or 65
  t = cfg.train
  trainer = init_trainer(cfg, vocab)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (t.batch_size, t.seq_len + 1)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               segment_ids=np.ones((t.batch_size, t.seq_len), np.int32),
               positions=np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (t.batch_size, t.seq_len)),
               weights=np.ones((t.batch_size, t.seq_len), np.float32))
  with mesh_rules(trainer.mesh):
    batch = global_batch(batch, trainer.mesh)
    objective = functools.partial(causal_lm_loss, loss_chunk=t.loss_chunk, z_loss=t.z_loss > 0)
    step = compile_train_step(trainer, objective, batch)
    key = jax.random.PRNGKey(0)
    state = trainer.state
    for _ in range(F.warmup):
      state, m = step(state, batch, key)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(F.steps):
      state, m = step(state, batch, key)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / F.steps
    if F.stats_every:
      state = stats_overhead(trainer, objective, step, state, batch, key, F.stats_every, F.steps)
  tokens_per_step = t.batch_size * t.seq_len
  fpt = flops_per_token(trainer.model_cfg, t.seq_len)
  peak = device_peak_flops(F.measure_peak) * jax.device_count()
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'model: {n_params / 1e6:.2f}M params, {trainer.model_cfg.n_layers} layers, width '
        f'{trainer.model_cfg.d_model}, batch {t.batch_size} x {t.seq_len}, dtype {trainer.model_cfg.dtype}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  print(f'step time      {dt * 1e3:.1f} ms')
  print(f'tokens/s       {tokens_per_step / dt:,.0f}')
  print(f'model FLOP/s   {tokens_per_step * fpt / dt / 1e9:.1f} GFLOP/s ({fpt / 1e6:.2f} MFLOP/token)')
  print(f'MFU            {tokens_per_step * fpt / dt / peak:.1%} of {peak / 1e9:.0f} GFLOP/s peak')
  print(f'peak host RSS  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:  # accelerators only
    print(f'peak device memory {stats["peak_bytes_in_use"] / 2**30:.2f} GiB')


def stats_overhead(trainer, objective, step, state, batch, key, every: int, steps: int):
  """Blocks of `every` steps, without statistics and with them on the block's last step,
  alternated; prints the median time per step of each and the overhead."""
  import jax
  import numpy as np

  from train.step import compile_train_step
  stats_step = compile_train_step(trainer, objective, batch, with_stats=True)
  plain, with_stats = [step] * every, [step] * (every - 1) + [stats_step]
  times = {'plain': [], 'stats': []}
  for i in range(max(steps // every, 2) * 2 + 2):
    name, fns = ('plain', plain) if i % 2 == 0 else ('stats', with_stats)
    t0 = time.perf_counter()
    for fn in fns:
      state, m = fn(state, batch, key)
      jax.device_get(m)  # as the loop does, one step behind
    if i >= 2:  # the first pair warms up
      times[name].append((time.perf_counter() - t0) / every)
  a, b = np.median(times['plain']), np.median(times['stats'])
  print(f'stats every {every}: {b * 1e3:.2f} ms/step vs {a * 1e3:.2f} without '
        f'({(b / a - 1):+.1%}; {len(times["stats"])} blocks each)')
  return state


if __name__ == '__main__':
  app.run(main)
