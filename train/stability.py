"""Optimizer wrappers that keep long runs alive: skip steps whose loss or gradient norm spikes,
and keep an exponential moving average of the weights for evaluation.

Both are optax transformations around the configured optimizer, so their state lives in
`opt_state`: it is checkpointed, sharded and restored like the moments, and a resumed run skips
and averages exactly as the uninterrupted one.
"""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from model.errors import UserError

PyTree = Any
STAT_DECAY = 0.99   # running statistics of the spike detector: a window of about 100 steps
STD_FLOOR = 0.01    # std below 1% of the mean counts as 1% (a flat curve is not a hair trigger)


class SpikeState(NamedTuple):
  inner: PyTree
  count: jax.Array      # accepted steps in the running statistics
  mean: jax.Array       # [2] running (biased) means of (loss, grad norm)
  square: jax.Array     # [2] running (biased) means of their squares
  skipped: jax.Array    # steps skipped in all
  in_a_row: jax.Array   # steps skipped since the last accepted one
  last: jax.Array       # bool: the latest step was skipped


def _spiked(x: jax.Array, state: SpikeState, threshold: float, warmup: int) -> jax.Array:
  """Any of x = (loss, grad norm) non-finite, or more than `threshold` std devs above its mean."""
  debias = 1.0 - STAT_DECAY ** jnp.maximum(state.count, 1).astype(jnp.float32)
  mean = state.mean / debias
  std = jnp.sqrt(jnp.maximum(state.square / debias - mean ** 2, 0.0))
  std = jnp.maximum(std, STD_FLOOR * jnp.abs(mean))
  high = (state.count >= warmup) & jnp.any(x > mean + threshold * std)
  return high | ~jnp.all(jnp.isfinite(x))


def skip_spikes(inner: optax.GradientTransformation, threshold: float, warmup: int
                ) -> optax.GradientTransformationExtraArgs:
  """`inner`, except that a step whose loss (the `loss` extra argument; omitted: grad norm only)
  or gradient norm lies `threshold` running std devs above its running mean, after `warmup`
  accepted steps, or is not finite, gives zero updates and leaves every state untouched."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return SpikeState(inner.init(params), zero, jnp.zeros(2), jnp.zeros(2), zero, zero,
                      jnp.zeros((), bool))

  def update(updates, state, params=None, *, loss=None, **extra):
    norm = optax.tree.norm(updates)
    x = jnp.stack([norm if loss is None else jnp.asarray(loss, jnp.float32), norm])
    spike = _spiked(x, state, threshold, warmup)
    new_updates, new_inner = inner.update(updates, state.inner, params, **extra)
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(spike, o, n), old, new)
    mix = lambda avg, v: jnp.where(spike, avg, STAT_DECAY * avg + (1 - STAT_DECAY) * v)
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    state = SpikeState(keep(state.inner, new_inner), state.count + (~spike).astype(jnp.int32),
                       mix(state.mean, x), mix(state.square, x ** 2),
                       state.skipped + spike.astype(jnp.int32),
                       jnp.where(spike, state.in_a_row + 1, 0), spike)
    return jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), new_updates), state

  return optax.GradientTransformationExtraArgs(init, update)


class EmaState(NamedTuple):
  inner: PyTree
  ema: PyTree           # the averaged weights, shaped (and sharded) as the trained ones


def weight_ema(inner: optax.GradientTransformation, decay: float
               ) -> optax.GradientTransformationExtraArgs:
  """`inner`, also tracking ema <- decay·ema + (1 - decay)·params after each update (Polyak
  averaging; it starts at the initial weights)."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return EmaState(inner.init(params), jax.tree.map(jnp.array, params))

  def update(updates, state, params=None, **extra):
    updates, new_inner = inner.update(updates, state.inner, params, **extra)
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema, new)
    return updates, EmaState(new_inner, ema)

  return optax.GradientTransformationExtraArgs(init, update)


def _find(opt_state: PyTree, kind: type) -> Any:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
           if isinstance(s, kind)]
  return found[0] if found else None


def ema_params(opt_state: PyTree) -> PyTree | None:
  """The averaged weights kept by `weight_ema` in this optimizer state, or None."""
  state = _find(opt_state, EmaState)
  return None if state is None else state.ema


def spike_state(opt_state: PyTree) -> SpikeState | None:
  """The spike detector's state in this optimizer state, or None when skipping is off."""
  return _find(opt_state, SpikeState)


def check_step(metrics: dict[str, float], step: int, max_skips: int) -> None:
  """One line naming the fix when a step's loss is not finite (and the spike guard did not skip
  it) or the guard skipped `max_skips` steps in a row: the run diverged."""
  if not math.isfinite(metrics['loss']) and not metrics.get('skipped'):
    raise UserError(f'loss became {metrics["loss"]} at step {step}; lower train.lr, raise '
                    'train.warmup_steps, set train.clip_norm or train.spike_threshold (no '
                    'checkpoint of this step was kept)')
  if metrics.get('skipped_in_a_row', 0) >= max_skips:
    raise UserError(f'{int(metrics["skipped_in_a_row"])} steps in a row skipped as spikes at step '
                    f'{step} (train.max_skips={max_skips}): the run diverged; lower train.lr or '
                    'resume from an earlier checkpoint')
