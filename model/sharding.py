"""Logical-axis helpers shared by the layers and the kernels that run under shard_map: annotated
initialisers, and the mesh axes the active rules give a logical axis."""
import math
from typing import Callable

import flax.linen as nn
import jax

Init = Callable[..., jax.Array]


def param_init(stddev: float, axes: tuple[str | None, ...]) -> Init:
  """GPT-2 style normal init, annotated with logical axes."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros_init(axes: tuple[str | None, ...]) -> Init:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def mesh_axes(name: str, size: int) -> tuple[str, ...]:
  """The mesh axes the rules give logical axis `name`, or () when their product does not divide
  `size` (the one-row batch that initialises the model): a shard_map spec for that dimension."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = nn.logical_to_mesh_axes((name,))[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return names if size % math.prod(mesh.shape[n] for n in names) == 0 else ()
