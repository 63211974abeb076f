"""Ahead-of-time compilation of a config's train step for devices that need not be attached: a TPU
topology's compile-only devices (libtpu builds them on any host, no TPU needed) or this host's CPU
devices. XLA's memory analysis then says, per device, whether the run fits before it starts.
"""
import dataclasses

import jax
import numpy as np
from ml_collections import ConfigDict

from model.errors import UserError
from train.mesh import batch_sharding, mesh_rules
from train.objectives import objective_for
from train.step import compile_train_step
from train.trainer import init_trainer

HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32,  # per device (chip)
           'NVIDIA H100 80GB HBM3': 80}
# XLA's description of an H100 SXM (xla/stream_executor DeviceDescription), for compiling without
# one: JAX's CUDA plugin builds compile-only devices from it (jax-ml/jax#28376).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# Cloud TPU slice sizes -> libtpu topology shapes: 2D tori (v5e, v6e) and 3D ones (v4, v5p).
SHAPES_2D = {4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
             256: '4x8x8', 512: '8x8x8'}
GENERATIONS = {'v5e': SHAPES_2D, 'v6e': SHAPES_2D, 'v4': SHAPES_3D, 'v5p': SHAPES_3D}


def libtpu_topology(name: str) -> str:
  """A libtpu topology name (v5e:4x4, v5p:2x2x2) for a Cloud TPU slice name: v5e-16 and v6e-8
  count chips, v4-16 and v5p-16 TensorCores (two per chip). libtpu names pass through."""
  if ':' in name:
    return name
  gen, _, size = name.partition('-')
  chips = int(size) // (2 if gen in ('v4', 'v5p') else 1) if size.isdigit() else 0
  shape = GENERATIONS.get(gen, {}).get(chips)
  if shape is None:
    raise UserError(f'--topology={name} is not a known slice; use GEN-SIZE with GEN one of '
                    f'{", ".join(GENERATIONS)} (e.g. v5e-16), a libtpu name (v5e:4x4) or cpu-N')
  return f'{gen}:{shape}'


def gpu_topology(name: str) -> str:
  """h100-N (N GPUs, 8 per host) -> the CUDA plugin's topology 'slices x hosts x devices'."""
  n = name.partition('-')[2] or '1'
  if not n.isdigit() or int(n) < 1 or (int(n) > 8 and int(n) % 8):
    raise UserError(f'--topology={name}: use h100-N with N GPUs, at most 8 or a multiple of 8 '
                    '(8 per host)')
  return f'1x{max(int(n) // 8, 1)}x{min(int(n), 8)}'


def cuda_devices(name: str) -> list[jax.Device]:
  """Compile-only H100s: no GPU needed, but JAX's CUDA plugin, whose start-up check for a GPU
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 turns off (XLA then cannot autotune: default kernels)."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform='cuda', target_config=H100_TARGET,
                                             topology=gpu_topology(name)).devices)
  except (NotImplementedError, RuntimeError) as e:
    raise UserError(f'cannot build GPU topology {name} ({str(e).splitlines()[0]}): in a separate '
                    f'environment pip install -e . "jax[cuda12]=={jax.__version__}" and run with '
                    'JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1') from e


def topology_devices(name: str) -> list[jax.Device]:
  """The devices to compile for: cpu-N (this host's first N CPU devices), h100-N (compile-only
  H100s, see cuda_devices) or a TPU topology's compile-only devices (needs the libtpu wheel; one
  device per chip, v4 as megacore)."""
  if name.startswith('h100'):
    return cuda_devices(name)
  if name.startswith('cpu'):
    n = int(name.partition('-')[2] or 1)
    devices = jax.devices('cpu')
    if n > len(devices):
      raise UserError(f'--topology={name} needs {n} CPU devices but {len(devices)} exist; set '
                      f'XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts')
    return devices[:n]
  from jax.experimental import topologies
  topology = libtpu_topology(name)
  kwargs = {'chip_config_name': 'megacore'} if topology.startswith('v4:') else {}
  try:
    return list(topologies.get_topology_desc(topology, 'tpu', **kwargs).devices)
  except RuntimeError as e:  # no libtpu: "JAX TPU support not installed; ..."
    raise UserError(f'cannot build TPU topology {topology}: {str(e).splitlines()[0]}; '
                    'pip install libtpu (or the tpu-aot extra)') from e


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's per-device bytes of the compiled train step; `peak` is what must fit in the device's
  memory at once (donated state is both argument and output, counted once)."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def compile_step_memory(cfg: ConfigDict, vocab_size: int, devices: list[jax.Device]) -> StepMemory:
  """Compile (never run) the pretraining step of a decoder config over `devices`, from the
  state's and batch's shapes and shardings only, and return its per-device memory."""
  if cfg.model.family != 'decoder':
    raise UserError(f'ahead-of-time compilation covers decoder pretraining; model.family='
                    f'{cfg.model.family} is not supported here')
  trainer = init_trainer(cfg, vocab_size, devices=devices, shapes_only=True)
  t = cfg.train
  fields = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32,
            'positions': np.int32, 'weights': np.float32}
  sharding = batch_sharding(trainer.mesh)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), dtype, sharding=sharding)
           for k, dtype in fields.items()}
  objective = objective_for('decoder', 0, loss_chunk=t.loss_chunk, z_loss=t.z_loss > 0)
  with mesh_rules(trainer.mesh):
    mem = compile_train_step(trainer, objective, batch).fn.memory_analysis()
  return StepMemory(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                    mem.alias_size_in_bytes, mem.generated_code_size_in_bytes)
