"""The training loop shared by every stage: one jitted step over a mesh, eval, metrics, checkpoints.

A stage differs only in its batch source and its loss function (train/objectives.py); the trainer
it runs on is built by train/trainer.py.
"""
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict
from tqdm import tqdm

from data.rows import TrainData
from model.errors import UserError
from train import checkpoint
from train.mesh import batch_sharding, global_batch, mesh_rules
from train.metrics import MetricWriter, device_peak_flops, flops_per_token
from train.objectives import LossFn, objective_for, objective_weight
from train.state import TrainState, lr_schedule
from train.trainer import Trainer, init_trainer, with_frozen

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


def make_train_step(trainer: Trainer, objective: Callable[[Callable], LossFn]) -> BoundStep:
  """One optimizer step, step(state, batch, rng); `objective` is a loss factory of the model's
  apply function (train/objectives.py). With grad_accum > 1 a lax.scan over micro-batches gives
  the same update. Gradients are taken only with respect to `state.params`."""
  t = trainer.cfg.train
  schedule, tx, accum = lr_schedule(t), trainer.tx, t.grad_accum
  data_sharding = batch_sharding(trainer.mesh)

  def step(state: TrainState, frozen: Any, batch: Batch, rng: jax.Array):
    apply_fn = with_frozen(trainer.model.apply, frozen, trainer.heads)
    grad_fn = jax.value_and_grad(objective(apply_fn), has_aux=True)
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      (loss_sum, aux), grads = grad_fn(state.params, batch, rng)
    else:
      # Strided split (row i goes to micro-batch i % accum) keeps every micro-batch spread over
      # all data-parallel devices instead of a contiguous block living on a few of them.
      micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        mb, i = xs
        mb = jax.lax.with_sharding_constraint(mb, data_sharding)
        out = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first, rng))
      ((loss_sum, aux), grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    aux = dict(aux)
    weight = jnp.maximum(objective_weight(aux, batch), 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss_sum / weight, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state.step), **{k: v / weight for k, v in aux.items()}}
    return TrainState(state.step + 1, params, opt_state), metrics

  jitted = jax.jit(step, in_shardings=(trainer.state_sharding, trainer.frozen_sharding,
                                       data_sharding, None),
                   out_shardings=(trainer.state_sharding, None), donate_argnums=0)
  return BoundStep(jitted, trainer.frozen)


def compile_train_step(trainer: Trainer, objective: Callable[[Callable], LossFn], batch: Batch
                       ) -> BoundStep:
  """Ahead-of-time compile of the train step for this batch's shapes; prints XLA's memory analysis
  (per device) so a researcher sees whether a run fits before it starts."""
  step = make_train_step(trainer, objective)
  compiled = step.lower(trainer.state, batch, jax.random.PRNGKey(0)).compile()
  mem = compiled.memory_analysis()
  if mem is not None and jax.process_index() == 0:
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


def evaluate(trainer: Trainer, eval_step, params, batches: list[dict], bytes_per_token: float
             ) -> dict[str, float]:
  """Loss over the whole held-out split, summed in float64 on the host."""
  totals: dict[str, float] = {}
  with mesh_rules(trainer.mesh):
    for batch in batches:
      for k, v in jax.device_get(eval_step(params, global_batch(batch, trainer.mesh))).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  weight = max(totals.pop('weight', 0.0), 1.0)
  loss = totals.pop('loss_sum', 0.0) / weight
  out = {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50.0)),
         **{f'eval_{k}': v / weight for k, v in totals.items()}}
  if bytes_per_token:
    out['eval_bpb'] = loss / math.log(2) / bytes_per_token
  return out


class _Preemption:
  """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run_training(trainer: Trainer, objective: Callable[[Callable], LossFn], train_iter: Iterator,
                 eval_batches: list[dict], workdir: str, info: dict[str, Any],
                 on_eval: Callable[[Trainer], dict[str, float]] | None = None) -> dict[str, float]:
  """Train from the latest checkpoint in `workdir` (or from scratch) to `train.steps`.

  `on_eval(trainer)` (e.g. a task suite, train/eval/) adds its metrics to every eval's.

  Metrics for step t are pulled to the host after step t+1 is dispatched, so logging never
  stalls the device. Returns the last logged metrics: with the final eval, or with
  'preempted': True when SIGTERM stopped the run early.
  """
  cfg, t = trainer.cfg, trainer.cfg.train
  manager = checkpoint.make_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  tokens_per_step = t.batch_size * t.seq_len
  flops_token = flops_per_token(trainer.model_cfg, t.seq_len, causal=trainer.model.causal)
  peak = device_peak_flops() * jax.device_count()
  bytes_per_token = info.get('eval_bytes_per_token', 0.0)

  start, tokens, flops = 0, 0, 0.0
  latest = manager.latest_step()
  if latest is not None:
    trainer.state, meta = checkpoint.restore(manager, latest, trainer.state, train_iter)
    start, tokens, flops = latest, meta['tokens'], meta['flops']
    print(f'resumed from {checkpoint.checkpoint_dir(workdir)}/{latest}', flush=True)

  eval_step = make_eval_step(trainer, objective)
  # rows after the checkpoint are redone: drop them (and the final row, which a finished run rewrites)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                        resume_step=min(start, t.steps - 1))
  rng = jax.random.PRNGKey(cfg.seed + 1)
  preempt = _Preemption()
  last: dict[str, float] = {}
  bar = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
             mininterval=1.0, disable=jax.process_index() != 0)
  pending = None  # (step, device metrics) of the step whose metrics are not yet on the host
  clock = time.perf_counter()

  def is_eval(step: int) -> bool:  # the final step's eval is written after the loop
    return bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and step != t.steps

  def flush() -> None:
    nonlocal pending, clock, tokens, flops, last
    if pending is None:
      return
    step, metrics = pending
    pending = None
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m['loss']):
      raise UserError(f'loss became {m["loss"]} at step {step}; lower train.lr, raise '
                      'train.warmup_steps or set train.clip_norm (no checkpoint of this step was kept)')
    now = time.perf_counter()
    dt, clock = now - clock, now
    tokens += tokens_per_step
    flops += tokens_per_step * flops_token
    last = {**m, 'tokens': tokens, 'flops': flops, 'step_time': dt,
            'tokens_per_sec': tokens_per_step / dt, 'mfu': tokens_per_step * flops_token / dt / peak}
    if step % t.log_every == 0 and step != t.steps and not is_eval(step):
      writer.write(step, last)  # eval steps (the final one too) are written once, with their eval
    bar.set_postfix(loss=f'{m["loss"]:.4f}', refresh=False)
    bar.update(1)

  def save(step: int) -> None:
    checkpoint.save(manager, step, trainer.state, {'step': step, 'tokens': tokens, 'flops': flops},
                    train_iter)

  try:
    with mesh_rules(trainer.mesh):
      train_step = None
      for step in range(start + 1, t.steps + 1):
        batch = global_batch(next(train_iter), trainer.mesh)
        if train_step is None:
          train_step = compile_train_step(trainer, objective, batch)
          clock = time.perf_counter()
        trainer.state, metrics = train_step(trainer.state, batch, rng)
        flush()
        pending = (step, metrics)
        is_ckpt = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if is_eval(step) or is_ckpt or preempt.requested:
          flush()  # this step's loss is checked before anything is saved
        if is_eval(step):
          last.update(evaluate(trainer, eval_step, trainer.state.params, eval_batches, bytes_per_token))
          last.update(on_eval(trainer) if on_eval else {})
          writer.write(step, last)
          bar.write(f'step {step}: eval_loss {last["eval_loss"]:.4f}')
          clock = time.perf_counter()  # eval time is not training time
        if (is_ckpt or preempt.requested) and step != t.steps:
          save(step)
        if preempt.requested:
          checkpoint.wait(manager)
          bar.write(f'SIGTERM: saved checkpoint at step {step}; rerun the same command to resume')
          return {**last, 'preempted': True}
      flush()
      if start < t.steps:
        save(t.steps)
      last.update(evaluate(trainer, eval_step, trainer.state.params, eval_batches, bytes_per_token))
      last.update(on_eval(trainer) if on_eval else {})
      writer.write(t.steps, last)
  finally:
    bar.close()
    preempt.restore()
    try:
      checkpoint.finish(manager)  # the last async save commits (or fails with one line) here
    finally:
      writer.close()
  return last


def pretrain(cfg: ConfigDict, workdir: str, dataset: TrainData,
             on_eval: Callable[[Trainer], dict[str, float]] | None = None
             ) -> tuple[Trainer, dict[str, float]]:
  """The family's pretraining objective (causal or masked LM) on `dataset` (data/pipeline.py,
  data/seq2seq.py, data/stream.py); returns the trainer and final metrics. `on_eval` as in
  `run_training`."""
  trainer = init_trainer(cfg, dataset.tokenizer.vocab_size)
  per_host = cfg.train.batch_size // jax.process_count()
  train_iter = dataset.train_iter(per_host, cfg.train.seq_len)
  eval_batches = dataset.eval_batches(cfg.eval.batch_size or per_host, cfg.train.seq_len,
                                      cfg.eval.max_batches)
  objective = objective_for(trainer.model_cfg.family, dataset.tokenizer.pad_id)
  try:
    return trainer, run_training(trainer, objective, train_iter, eval_batches, workdir, dataset.info,
                                 on_eval)
  finally:
    train_iter.close()  # stops a streaming loader's prefetch threads (data/stream.py)
