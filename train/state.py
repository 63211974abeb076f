"""Train state and the optax optimizer factory (schedules, clipping, weight-decay mask)."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model.errors import UserError

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the optimizer itself stays outside (pure functions)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


def lr_schedule(t: ConfigDict) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear / constant / warmup-stable-decay to lr·min_lr_ratio."""
  end = t.lr * t.min_lr_ratio
  warm = max(t.warmup_steps, 0)
  rest = max(t.steps - warm, 1)
  warmup = optax.linear_schedule(0.0, t.lr, max(warm, 1))
  if t.schedule == 'cosine':
    tail = optax.cosine_decay_schedule(t.lr, rest, alpha=t.min_lr_ratio)
  elif t.schedule == 'linear':
    tail = optax.linear_schedule(t.lr, end, rest)
  elif t.schedule == 'constant':
    tail = optax.constant_schedule(t.lr)
  elif t.schedule == 'wsd':
    decay = max(int(t.decay_fraction * t.steps), 1)
    tail = optax.join_schedules([optax.constant_schedule(t.lr), optax.linear_schedule(t.lr, end, decay)],
                                [max(rest - decay, 0)])
  else:
    raise UserError(f'train.schedule={t.schedule!r} is not one of cosine, linear, constant, wsd')
  if warm == 0:
    return tail
  return optax.join_schedules([warmup, tail], [warm])


def decay_mask(params: PyTree, decay_embeddings: bool) -> PyTree:
  """Weight decay on matmul kernels (and embeddings by choice); never on norms or biases."""
  def leaf(path, _):
    name = getattr(path[-1], 'key', str(path[-1]))
    return name == 'kernel' or (decay_embeddings and name == 'embedding')
  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(t: ConfigDict) -> optax.GradientTransformation:
  """The optimizer from `config.train`, with global-norm clipping first."""
  schedule = lr_schedule(t)
  mask = lambda p: decay_mask(p, t.decay_embeddings)
  mu_dtype = jnp.dtype(t.opt_state_dtype)
  if t.optimizer == 'adamw':
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask,
                      mu_dtype=mu_dtype)
  elif t.optimizer == 'lion':
    opt = optax.lion(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask,
                     mu_dtype=mu_dtype)
  elif t.optimizer == 'adafactor':
    opt = optax.adafactor(schedule, weight_decay_rate=t.weight_decay or None,
                          weight_decay_mask=mask, multiply_by_parameter_scale=False)
  else:
    raise UserError(f'train.optimizer={t.optimizer!r} is not one of adamw, adafactor, lion')
  if t.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), opt)
  return opt
