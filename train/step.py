"""The jitted train and eval steps every stage runs: loss and gradients (accumulated over
micro-batches), the optimizer update, z-loss, spike skipping, and per-layer statistics."""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from model.config import ModelConfig
from model.errors import UserError
from model.moe import COLLECTION as MOE, aux_losses
from train.mesh import batch_sharding
from train.objectives import LossFn, batch_weight, objective_weight
from train.stability import spike_state
from train.state import TrainState, lr_schedule
from train.stats import activation_stats, combine_activation_stats, step_stats
from train.trainer import Trainer, with_frozen

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted step with the trainer's frozen base as its second argument, called without it."""
  fn: Any
  frozen: Any

  def __call__(self, first: Any, *rest: Any) -> Any:
    return self.fn(first, self.frozen, *rest)

  def lower(self, first: Any, *rest: Any) -> Any:
    return self.fn.lower(first, self.frozen, *rest)


def training_loss(objective: Callable[[Callable], LossFn], apply_fn: Callable, z_loss: float,
                  with_stats: bool, moe: ModelConfig | None = None) -> Callable:
  """(params, batch, rng) -> (loss to differentiate, (loss_sum, aux, activation statistics)).

  z_loss adds z_loss · aux['z_loss'] (the log(Z)^2 sum the objective returns when built with
  z_loss=True, train/objectives.py) to the loss differentiated; it is never part of `loss_sum`
  (nor of eval loss). On statistics steps the model call is wrapped to collect what the blocks
  sow into 'intermediates' (not a chunked objective's output-layer calls, which sow nothing).

  `moe` (the config of a mixture-of-experts model) adds its layers' auxiliary losses
  (model/moe.py aux_losses), weighted by the batch's scored tokens like every loss sum here, and
  logs their parts.
  """
  collections = [name for name, on in (('intermediates', with_stats), (MOE, moe is not None)) if on]

  def loss(params, batch: Batch, rng: jax.Array):
    seen: dict[str, Any] = {}

    def call(variables, *args, **kwargs):
      if not collections or kwargs.get('method') == 'logits':
        return apply_fn(variables, *args, **kwargs)
      out, state = apply_fn(variables, *args, mutable=collections, **kwargs)
      seen.update(state)
      return out

    loss_sum, aux = objective(call)(params, batch, rng)
    aux, total = dict(aux), loss_sum
    if z_loss:
      if 'z_loss' not in aux:
        raise UserError('train.z_loss applies to next-token objectives (pretrain of a decoder '
                        'or encoder-decoder, sft); set it to 0 for this stage')
      total = loss_sum + z_loss * aux['z_loss']
    if moe is not None:
      weight = aux['weight'] if 'weight' in aux else batch_weight(batch)
      parts = aux_losses(seen.get(MOE, {}), moe)
      total = total + weight * parts['moe_loss']
      aux.update({k: weight * v for k, v in parts.items()})  # sums, as every metric in aux
    acts = activation_stats(seen.get('intermediates', {})) if with_stats else {}
    return total, (loss_sum, aux, acts)
  return loss


def make_train_step(trainer: Trainer, objective: Callable[[Callable], LossFn],
                    with_stats: bool = False) -> BoundStep:
  """One optimizer step, step(state, batch, rng); `objective` is a loss factory of the model's
  apply function (train/objectives.py). With grad_accum > 1 a lax.scan over micro-batches gives
  the same update. Gradients are taken only with respect to `state.params`.

  `with_stats` adds the per-layer statistics of train/stats.py to the metrics (the same step
  otherwise). With train.spike_threshold a spiking step leaves the state as it was, bit for bit,
  apart from the step counter and the detector's own counts (train/stability.py).
  """
  t = trainer.cfg.train
  schedule, tx, accum = lr_schedule(t), trainer.tx, t.grad_accum
  data_sharding = batch_sharding(trainer.mesh)

  def step(state: TrainState, frozen: Any, batch: Batch, rng: jax.Array):
    apply_fn = with_frozen(trainer.model.apply, frozen, trainer.heads)
    moe = trainer.model_cfg if trainer.model_cfg.mlp == 'moe' else None
    grad_fn = jax.value_and_grad(training_loss(objective, apply_fn, t.z_loss, with_stats, moe),
                                 has_aux=True)
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      (_, (loss_sum, aux, acts)), grads = grad_fn(state.params, batch, rng)
    else:
      # Strided split (row i goes to micro-batch i % accum) keeps every micro-batch spread over
      # all data-parallel devices instead of a contiguous block living on a few of them.
      micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        mb, i = xs
        mb = jax.lax.with_sharding_constraint(mb, data_sharding)
        (_, (loss_sum, aux, acts)), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        sums, acts_carry = carry
        sums = jax.tree.map(jnp.add, sums, (loss_sum, aux, grads))
        return (sums, combine_activation_stats(acts_carry, acts)), None

      first = jax.tree.map(lambda x: x[0], micro)
      (_, (loss0, aux0, acts0)), grads0 = jax.eval_shape(grad_fn, state.params, first, rng)
      zeros = jax.tree.map(jnp.zeros_like, (loss0, aux0, grads0))
      acts_init = {k: jnp.full_like(v, -jnp.inf if k.startswith('logit_max/') else 0.0)
                   for k, v in acts0.items()}
      ((loss_sum, aux, grads), acts), _ = jax.lax.scan(body, (zeros, acts_init),
                                                       (micro, jnp.arange(accum)))
      acts = {k: v if k.startswith('logit_max/') else v / accum for k, v in acts.items()}
    weight = jnp.maximum(objective_weight(aux, batch), 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss_sum / weight
    grad_norm = optax.tree.norm(grads)
    extra = {'loss': loss} if t.spike_threshold > 0 else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               **{k: v / weight for k, v in aux.items()}}
    if t.clip_norm > 0:
      metrics['clipped'] = (grad_norm > t.clip_norm).astype(jnp.float32)
    spikes = spike_state(opt_state)
    if spikes is not None:  # a skipped step keeps its weights exactly (p + 0 may flip a -0.0)
      params = jax.tree.map(lambda old, new: jnp.where(spikes.last, old, new), state.params, params)
      metrics.update(skipped=spikes.last.astype(jnp.float32), skipped_total=spikes.skipped,
                     skipped_in_a_row=spikes.in_a_row)
    if with_stats:
      metrics.update(step_stats(state.params, grads, updates, acts))
    return TrainState(state.step + 1, params, opt_state), metrics

  jitted = jax.jit(step, in_shardings=(trainer.state_sharding, trainer.frozen_sharding,
                                       data_sharding, None),
                   out_shardings=(trainer.state_sharding, None), donate_argnums=0)
  return BoundStep(jitted, trainer.frozen)


def compile_train_step(trainer: Trainer, objective: Callable[[Callable], LossFn], batch: Batch,
                       with_stats: bool = False) -> BoundStep:
  """Ahead-of-time compile of the train step for this batch's shapes; prints XLA's memory analysis
  (per device) so a researcher sees whether a run fits before it starts (not for the statistics
  step, compiled beside it)."""
  step = make_train_step(trainer, objective, with_stats)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))  # a shape: nothing runs (AOT for a topology)
  compiled = step.lower(trainer.state, batch, key).compile()
  mem = compiled.memory_analysis()
  if mem is not None and jax.process_index() == 0 and not with_stats:
    gib = lambda n: f'{n / 2**30:.3f} GiB'
    print(f'train step per device: arguments {gib(mem.argument_size_in_bytes)}, outputs '
          f'{gib(mem.output_size_in_bytes)}, temporaries {gib(mem.temp_size_in_bytes)}, '
          f'aliased (donated) {gib(mem.alias_size_in_bytes)}', flush=True)
  return BoundStep(compiled, trainer.frozen)


def make_eval_step(trainer: Trainer, objective: Callable[[Callable], LossFn]) -> BoundStep:
  """eval_step(params, batch) -> loss and metric sums with their weight, on the eval model."""
  def step(params, frozen, batch):
    loss_sum, aux = objective(with_frozen(trainer.eval_model.apply, frozen, trainer.heads))(
        params, batch, jax.random.PRNGKey(0))
    aux = dict(aux)
    return {'loss_sum': loss_sum, 'weight': objective_weight(aux, batch), **aux}
  jitted = jax.jit(step, in_shardings=(trainer.state_sharding.params, trainer.frozen_sharding,
                                       batch_sharding(trainer.mesh)))
  return BoundStep(jitted, trainer.frozen)
