"""Device mesh, the logical-axis rule table, and multi-host start-up.

Mesh axes are ('data', 'fsdp', 'tensor', 'expert'). Parameters and activations have separate
logical names so weights can be sharded over fsdp while activations shard the batch (ZeRO-3 style).
The expert axis holds a share of the experts of each mixture-of-experts layer (model/moe.py) and,
everywhere else, a share of the batch, as data parallelism does.
"""
import contextlib
from typing import Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from model.config import ModelConfig
from model.errors import UserError
from train.launch import launched_multiprocess

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
BATCH_AXES = ('data', 'fsdp', 'expert')

# logical name -> mesh axes. Names absent here are replicated.
LOGICAL_RULES = (
    # parameters
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('length', None),
    ('layers', None),
    ('expert', 'expert'),
    # activations
    ('act_batch', BATCH_AXES),
    ('act_batch_no_expert', ('data', 'fsdp')),  # token groups while the expert axis holds experts
    ('act_expert', 'expert'),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh) -> Iterator[Mesh]:
  """`mesh` entered together with the logical-axis rules: what every jit, init and generate over
  sharded weights runs under, so a logical name always resolves to the same mesh axes."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield mesh


def maybe_initialize_distributed(m: ConfigDict) -> None:
  """jax.distributed.initialize() when this is one of several processes: explicitly with
  mesh.coordinator, or auto-detected on a TPU pod slice / SLURM job / JAX_COORDINATOR_ADDRESS."""
  if jax.distributed.is_initialized():
    return
  if m.coordinator:
    jax.distributed.initialize(m.coordinator, num_processes=m.num_processes or None,
                               process_id=None if m.process_id < 0 else m.process_id)
  elif launched_multiprocess(m):
    jax.distributed.initialize()


def mesh_shape(m: ConfigDict, n_devices: int) -> tuple[int, int, int, int]:
  """Resolve one -1 entry to the remaining devices and check the product."""
  shape = [m.data, m.fsdp, m.tensor, m.expert]
  if shape.count(-1) > 1:
    raise UserError('at most one of mesh.data, mesh.fsdp, mesh.tensor, mesh.expert may be -1')
  if any(s == 0 or s < -1 for s in shape):
    raise UserError(f'mesh sizes must be positive or -1, got data={m.data} fsdp={m.fsdp} '
                    f'tensor={m.tensor} expert={shape[3]}')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      raise UserError(f'{n_devices} devices cannot be split into mesh {shape}; adjust mesh.*')
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    raise UserError(f'mesh data×fsdp×tensor×expert = {shape} uses {int(np.prod(shape))} devices but '
                    f'{n_devices} are present; make the product equal {n_devices} or use -1')
  return tuple(shape)


def make_mesh(m: ConfigDict, devices: list[jax.Device] | None = None) -> Mesh:
  """Mesh over all devices (or the given subset, e.g. one device for a reference run)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(m, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_divisibility(cfg: ModelConfig, mesh: Mesh, batch_size: int, grad_accum: int) -> None:
  """Every sharded dimension must divide by its mesh axes; name the field that does not."""
  tensor, fsdp, expert = mesh.shape['tensor'], mesh.shape['fsdp'], mesh.shape['expert']
  batch_ways = mesh.shape['data'] * fsdp * expert
  checks = [('model.n_heads', cfg.n_heads, tensor, 'mesh.tensor'),
            ('model.n_kv_heads', cfg.n_kv_heads, tensor, 'mesh.tensor'),
            ('model.d_ff', cfg.d_ff, tensor, 'mesh.tensor'),
            ('model.vocab_size', cfg.vocab_size, tensor, 'mesh.tensor'),
            ('model.d_model', cfg.d_model, fsdp, 'mesh.fsdp'),
            ('model.n_experts', cfg.n_experts if cfg.mlp == 'moe' else 0, expert, 'mesh.expert'),
            ('train.batch_size / train.grad_accum', batch_size // grad_accum, batch_ways,
             'mesh.data × mesh.fsdp × mesh.expert')]
  for field, size, ways, axis in checks:
    if size % ways:
      raise UserError(f'{field}={size} is not divisible by {axis}={ways}; change one of them')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of the global batch split over (data, fsdp, expert); the sequence dimension replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each host's slice of the batch into global arrays sharded over (data, fsdp, expert)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
