"""Train state and the optax optimizer factory (schedules, clipping, weight-decay mask, Muon,
spike skipping and weight EMA)."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model.errors import UserError
from train.stability import skip_spikes, weight_ema

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
    decay = t.decay_steps or max(int(t.decay_fraction * t.steps), 1)
    tail = optax.join_schedules([optax.constant_schedule(t.lr), cooldown(t, end, decay)],
                                [max(rest - decay, 0)])
  else:
    raise UserError(f'train.schedule={t.schedule!r} is not one of cosine, linear, constant, wsd')
  if warm == 0:
    return tail
  return optax.join_schedules([warmup, tail], [warm])


def cooldown(t: ConfigDict, end: float, steps: int) -> optax.Schedule:
  """The decay of a warmup-stable-decay schedule, lr -> end over `steps`: linear, or 1 - sqrt of
  its progress (Hägele et al. 2024: lower loss at the same length)."""
  if t.decay_shape == 'linear':
    return optax.linear_schedule(t.lr, end, steps)
  if t.decay_shape == 'sqrt':
    return lambda step: end + (t.lr - end) * (1 - jnp.sqrt(jnp.minimum(step, steps) / steps))
  raise UserError(f'train.decay_shape={t.decay_shape!r} is not one of linear, sqrt')


def key_names(path: tuple) -> list[str]:
  """The dict keys of a parameter's path; a logical-axes box (nn.Partitioned, present while the
  optimizer state is initialised) adds an attribute key that is dropped."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


# The layers' projection matrices, by name: (reduction axes, output axes) counted from the end, so
# a scanned stack's leading layer axis and a mixture's leading expert axis are batch axes. Dense
# projections are `NAME/kernel`; a mixture's experts are `mlp/gate|up|down` [experts, in, out].
PROJECTION_AXES = {'query': ((-3,), (-2, -1)), 'key': ((-3,), (-2, -1)), 'value': ((-3,), (-2, -1)),
                   'out': ((-3, -2), (-1,)), 'gate': ((-2,), (-1,)), 'up': ((-2,), (-1,)),
                   'down': ((-2,), (-1,))}
EXPERTS = ('gate', 'up', 'down')


def projection(names: list[str]) -> str | None:
  """The projection a parameter path names (query, ..., down), or None for anything else:
  embeddings, the output layer, a mixture's router, heads, norms, biases, LoRA adapters."""
  if len(names) > 1 and names[-1] == 'kernel' and names[-2] in PROJECTION_AXES:
    return names[-2]
  if len(names) > 1 and names[-2] == 'mlp' and names[-1] in EXPERTS:
    return names[-1]
  return None


def decay_mask(params: PyTree, decay_embeddings: bool) -> PyTree:
  """Weight decay on matmul kernels (a mixture's experts and router included, and embeddings by
  choice); never on norms or biases."""
  def leaf(path, _):
    names = key_names(path)
    return (names[-1] in ('kernel', 'router') or projection(names) is not None
            or (decay_embeddings and names[-1] == 'embedding'))
  return jax.tree_util.tree_map_with_path(leaf, params)


def muon_labels(params: PyTree) -> PyTree:
  """'muon' for the transformer layers' projection matrices (a mixture's experts each on its own),
  'adam' for everything else (Jordan et al. 2024)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'muon' if projection(key_names(path)) else 'adam', params)


def muon_dims(params: PyTree) -> PyTree:
  """Each Muon matrix's MuonDimensionNumbers (called on the Muon partition only)."""
  def leaf(path, _):
    reduction, output = PROJECTION_AXES[projection(key_names(path))]
    return optax.contrib.MuonDimensionNumbers(reduction, output)
  return jax.tree_util.tree_map_with_path(leaf, params)


def muon(t: ConfigDict, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
  """Muon at train.muon_lr (on train.lr's schedule) for the layers' matrices, AdamW with the
  usual decay mask for the rest."""
  scale = t.muon_lr / t.lr
  matrices = optax.contrib.muon(lambda step: schedule(step) * scale, beta=0.95,
                                weight_decay=t.weight_decay, mu_dtype=jnp.dtype(t.opt_state_dtype),
                                muon_weight_dimension_numbers=muon_dims)
  rest = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask)
  return optax.partition({'muon': matrices, 'adam': rest}, muon_labels)


def hidden_mask(params: PyTree) -> PyTree:
  """True for the layers' projection matrices (experts included), whose both sides grow with width."""
  return jax.tree_util.tree_map_with_path(lambda path, _: projection(key_names(path)) is not None,
                                          params)


def make_optimizer(t: ConfigDict, width_mult: float = 1.0) -> optax.GradientTransformation:
  """The optimizer from `config.train`: global-norm clipping first, then the update rule, inside
  the weight EMA and the spike guard when those are on (train/stability.py).

  `width_mult` (µP's, ModelConfig.width_mult) divides the updates of the hidden matrices: their
  learning rate is lr / width_mult (Adam's µP rule, Yang et al. 2022, table 3); embeddings,
  norms, biases and the readout keep lr. At 1 (SP) the optimizer is SP's exactly."""
  schedule = lr_schedule(t)
  mask = lambda p: decay_mask(p, t.decay_embeddings)
  mu_dtype = jnp.dtype(t.opt_state_dtype)
  if t.optimizer == 'adamw':
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask,
                      mu_dtype=mu_dtype)
  elif t.optimizer == 'muon':
    opt = muon(t, schedule, mask)
  elif t.optimizer == 'lion':
    opt = optax.lion(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask,
                     mu_dtype=mu_dtype)
  elif t.optimizer == 'adafactor':
    opt = optax.adafactor(schedule, weight_decay_rate=t.weight_decay or None,
                          weight_decay_mask=mask, multiply_by_parameter_scale=False)
  else:
    raise UserError(f'train.optimizer={t.optimizer!r} is not one of adamw, adafactor, lion, muon')
  if width_mult != 1.0:
    opt = optax.chain(opt, optax.masked(optax.scale(1.0 / width_mult), hidden_mask))
  if t.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.clip_norm), opt)
  if t.ema_decay > 0:
    opt = weight_ema(opt, t.ema_decay)
  if t.spike_threshold > 0:
    opt = skip_spikes(opt, t.spike_threshold, t.spike_warmup)
  return opt
