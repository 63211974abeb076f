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
flags.DEFINE_string('profile', '', 'Also trace 3 steps with jax.profiler into this folder and print the '
                    '25 XLA ops that took longest (on GPU: the device kernels).')


def main(_):
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()  # the same XLA flags as run.py, before JAX starts
  F = flags.FLAGS
  report(measure(F.config, F.steps, F.warmup, F.vocab, F.measure_peak, F.stats_every, F.profile))


def random_batch(batch_size: int, seq_len: int, vocab: int) -> dict:
  """One packed-looking batch of random tokens: a single segment per row, every position weighted."""
  import numpy as np
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((batch_size, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
              weights=np.ones((batch_size, seq_len), np.float32))


def measure(cfg, steps: int, warmup: int, vocab: int = 0, measure_peak: bool = False,
            stats_every: int = 0, profile: str = '') -> dict:
  """Compile the train step for `cfg`, run `warmup` steps, then time `steps`: the figures `report`
  prints (step time, tokens/s, MFU, memory)."""
  import jax

  from train.step import compile_train_step
  from train.trainer import init_trainer
  from train.mesh import global_batch, mesh_rules
  from train.metrics import device_peak_flops, flops_per_token
  from train.objectives import causal_lm_loss

  vocab = vocab or cfg.model.vocab_size or 65
  t = cfg.train
  trainer = init_trainer(cfg, vocab)
  with mesh_rules(trainer.mesh):
    batch = global_batch(random_batch(t.batch_size, t.seq_len, vocab), trainer.mesh)
    objective = functools.partial(causal_lm_loss, loss_chunk=t.loss_chunk, z_loss=t.z_loss > 0)
    step = compile_train_step(trainer, objective, batch)
    key = jax.random.PRNGKey(0)
    state = trainer.state
    for _ in range(warmup):
      state, m = step(state, batch, key)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch, key)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    if stats_every:
      state = stats_overhead(trainer, objective, step, state, batch, key, stats_every, steps)
    if profile:
      state = trace_steps(step, state, batch, key, profile)
  stats = jax.devices()[0].memory_stats() or {}
  return {'step_s': dt, 'tokens': t.batch_size * t.seq_len,
          'flops_per_token': flops_per_token(trainer.model_cfg, t.seq_len),
          'peak_flops': device_peak_flops(measure_peak) * jax.device_count(),
          'params': sum(x.size for x in jax.tree.leaves(state.params)), 'model': trainer.model_cfg,
          'batch': (t.batch_size, t.seq_len),
          'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}',
          'device_peak_bytes': stats.get('peak_bytes_in_use')}  # accelerators only


def report(r: dict) -> None:
  m, (b, s), dt = r['model'], r['batch'], r['step_s']
  print(f'model: {r["params"] / 1e6:.2f}M params, {m.n_layers} layers, width {m.d_model}, batch {b} x {s}, '
        f'dtype {m.dtype}, {r["devices"]}')
  print(f'step time      {dt * 1e3:.1f} ms')
  print(f'tokens/s       {r["tokens"] / dt:,.0f}')
  print(f'model FLOP/s   {r["tokens"] * r["flops_per_token"] / dt / 1e9:.1f} GFLOP/s '
        f'({r["flops_per_token"] / 1e6:.2f} MFLOP/token)')
  print(f'MFU            {mfu(r):.1%} of {r["peak_flops"] / 1e9:.0f} GFLOP/s peak')
  print(f'peak host RSS  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
  if r['device_peak_bytes'] is not None:
    print(f'peak device memory {r["device_peak_bytes"] / 2**30:.2f} GiB')


def mfu(r: dict) -> float:
  return r['tokens'] * r['flops_per_token'] / r['step_s'] / r['peak_flops']


def trace_steps(step, state, batch, key, log_dir: str, steps: int = 3):
  """Trace `steps` steps and print the 25 ops with the most self time (train/profiling.py)."""
  from train.profiling import ProfileWindow
  window = ProfileWindow(1, steps, 25, log_dir, print)
  window.start()
  for i in range(1, steps + 1):
    window.mark(i)
    state, m = step(state, batch, key)
  window.stop(m)
  return state


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
  from model.errors import one_line_errors
  app.run(one_line_errors(main))
