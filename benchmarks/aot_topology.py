"""Compile a config's train step for a TPU slice from this host (no TPU needed) and print XLA's
per-device memory and whether it fits the chip's HBM: a run's fit, known before the chips are.

  pip install -e '.[tpu-aot]'   # jax[tpu]'s libtpu (213 MB wheel): compile-only TPU devices
  python benchmarks/aot_topology.py --config=experiments/gpt2_small.py --topology=v5e-16 \
      --config.model.attention=splash
  python benchmarks/aot_topology.py --config=experiments/quickstart.py --topology=cpu-8

--topology: a Cloud TPU slice (v5e-16, v6e-8 count chips; v4-16, v5p-16 TensorCores), a libtpu
topology (v5e:4x4, v5p:2x2x2), h100-N (N H100s, 8 per host), or cpu-N: N simulated CPU devices,
the same code path without libtpu. The config's mesh (-1 = the rest) is laid over the topology's
devices. H100s need JAX's CUDA plugin but no GPU, in an environment of their own (the plugin
complains at every start without a GPU):

  pip install -e . "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # in that venv
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/aot_topology.py --topology=h100-8

Without a device XLA cannot autotune, so the GPU kernels are its defaults (memory is what counts).
model.cudnn_segments > 1 cannot compile there (JAX asks the local GPU whether it is a Hopper).
"""
import os
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'experiments/gpt2_small.py', 'Experiment config.',
                                lock_config=True)
flags.DEFINE_string('topology', 'v5e-16', 'TPU slice (v5e-16), libtpu topology (v5e:4x4), h100-N or '
                    'cpu-N.')
flags.DEFINE_integer('vocab', 0, 'Vocabulary size (0 = model.vocab_size or 256 bytes).')


def main(_):
  F = flags.FLAGS
  if F.topology.startswith('cpu'):  # before JAX starts: the simulated devices and CPU only
    n = F.topology.partition('-')[2] or '1'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={n}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # TPU devices here are compile-only
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()
  from model.errors import UserError
  from train.aot import HBM_GIB, compile_step_memory, topology_devices

  cfg = F.config
  if cfg.model.attention == 'cudnn' and not F.topology.startswith(('cpu', 'h100')):
    raise UserError('model.attention=cudnn is a GPU kernel; compile for TPU with '
                    '--config.model.attention=splash (or xla)')
  t0 = time.perf_counter()
  devices = topology_devices(F.topology)
  kind = devices[0].device_kind
  print(f'topology {F.topology}: {len(devices)} x {kind} ({time.perf_counter() - t0:.1f} s)')
  t0 = time.perf_counter()
  mem = compile_step_memory(cfg, F.vocab or cfg.model.vocab_size or 256, devices)
  m, t = cfg.model, cfg.train
  gib = lambda n: f'{n / 2**30:.3f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'
  print(f'compiled in {time.perf_counter() - t0:.1f} s: {m.n_layers} layers, width {m.d_model}, '
        f'{m.attention} attention, {m.dtype}, batch {t.batch_size} x {t.seq_len}, remat {m.remat}, '
        f'mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor} '
        f'expert={cfg.mesh.expert}')
  print(f'per device: arguments {gib(mem.arguments)}, outputs {gib(mem.outputs)}, temporaries '
        f'{gib(mem.temporaries)}, aliased {gib(mem.aliased)}, code {gib(mem.code)}; '
        f'peak {gib(mem.peak)}')
  hbm = HBM_GIB.get(kind)
  if hbm is None:
    print(f'{kind}: no HBM figure (host memory)')
  else:
    verdict = 'fits' if mem.peak <= hbm * 2**30 else 'does NOT fit'
    print(f'{verdict} in {hbm} GiB of HBM per {kind} ({mem.peak / (hbm * 2**30):.0%})')


if __name__ == '__main__':
  from model.errors import one_line_errors
  app.run(one_line_errors(main))
