"""Ahead-of-time compilation for devices that are not run (train/aot.py): on 8 simulated CPU
devices here, on a TPU topology's compile-only devices where libtpu is installed."""
import importlib.util
import math

import jax
import numpy as np
import pytest

from model.errors import UserError
from train.aot import compile_step_memory, gpu_topology, libtpu_topology, topology_devices
from train.trainer import init_trainer
from tests.helpers import tiny_config

VOCAB = 64


def config():
  c = tiny_config(n_layers=1)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


def shard_bytes(tree) -> int:
  """Bytes of one device's shard of every array in `tree` (shapes with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def test_compiled_step_arguments_are_the_state_and_batch_shards():
  """The (2, 2, 2) step compiled from shapes alone: its per-device arguments are exactly one
  device's shards of the state (weights and Adam moments over fsdp x tensor), the batch (rows over
  data x fsdp) and the step key; the donated state is aliased to the outputs."""
  devices = topology_devices('cpu-8')
  mem = compile_step_memory(config(), VOCAB, devices)
  state = init_trainer(config(), VOCAB, devices=devices, shapes_only=True).state
  t = config().train
  batch_bytes = 5 * t.batch_size * t.seq_len * 4 // 4  # five int32/f32 fields, 4 row shards
  assert 0 <= mem.arguments - shard_bytes(state) - batch_bytes <= 8  # and the [2] uint32 key
  assert mem.aliased == shard_bytes(state) and mem.temporaries > 0
  assert mem.peak == mem.arguments + mem.outputs - mem.aliased + mem.temporaries + mem.code


def test_topology_names():
  assert [libtpu_topology(n) for n in ('v5e-16', 'v6e-8', 'v5p-16', 'v4-8', 'v5e:2x4')] == [
      'v5e:4x4', 'v6e:2x4', 'v5p:2x2x2', 'v4:2x2x1', 'v5e:2x4']
  for bad in ('v5e-12', 'v9-8', 'tpu'):
    with pytest.raises(UserError, match='not a known slice'):
      libtpu_topology(bad)
  with pytest.raises(UserError, match='xla_force_host_platform_device_count=64'):
    topology_devices('cpu-64')
  assert [gpu_topology(n) for n in ('h100', 'h100-4', 'h100-8', 'h100-32')] == [
      '1x1x1', '1x1x4', '1x1x8', '1x4x8']
  for bad in ('h100-12', 'h100-0', 'h100-x'):
    with pytest.raises(UserError, match='at most 8 or a multiple of 8'):
      gpu_topology(bad)


@pytest.mark.skipif(importlib.util.find_spec('jax_plugins') is not None
                    and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None,
                    reason="JAX's CUDA plugin is installed")
def test_h100_without_the_cuda_plugin_names_the_install():
  """Compiling for H100s needs JAX's CUDA plugin (not a GPU); without it, one line says how."""
  fix = r'pip install -e \. "jax\[cuda12\]==.*JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1'
  with pytest.raises(UserError, match=fix):
    topology_devices('h100-8')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='libtpu not installed')
@pytest.mark.parametrize('attention', ['xla', 'splash'])
def test_compiles_for_a_tpu_topology_without_a_tpu(attention):
  """With libtpu (the tpu-aot extra) the same step compiles for 4 compile-only v5e chips; splash
  as its Mosaic kernel (not interpreted: the mesh's devices are TPUs)."""
  devices = topology_devices('v5e-4')
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v5 lite'
  c = tiny_config(n_layers=1, attention=attention, head_dim=64)
  c.train.batch_size, c.train.seq_len = 4, 128
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 2
  assert compile_step_memory(c, VOCAB, devices).arguments > 0
