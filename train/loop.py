"""The training loop shared by every stage: one jitted step over a mesh, eval, metrics, checkpoints.

A stage differs only in its batch source and its loss function (train/objectives.py); the trainer
it runs on is built by train/trainer.py, its jitted steps by train/step.py.
"""
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from data.rows import TrainData
from train import checkpoint
from train.goodput import Stopwatch, goodput_line, goodput_metrics
from train.mesh import global_batch, mesh_rules
from train.metrics import MetricWriter, device_peak_flops, flops_per_token
from train.objectives import LossFn, objective_for
from train.profiling import profile_window
from train.stability import check_step, ema_params
from train.step import compile_train_step, make_eval_step
from train.trainer import Trainer, init_trainer

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


def eval_view(trainer: Trainer) -> Trainer:
  """The trainer as evaluation sees it: with its EMA weights when train.ema_decay > 0."""
  ema = ema_params(trainer.state.opt_state)
  if ema is None:
    return trainer
  return dataclasses.replace(trainer, state=trainer.state.replace(params=ema))


def run_training(trainer: Trainer, objective: Callable[[Callable], LossFn], train_iter: Iterator,
                 eval_batches: list[dict], workdir: str, info: dict[str, Any],
                 on_eval: Callable[[Trainer], dict[str, float]] | None = None) -> dict[str, float]:
  """Train from the latest checkpoint in `workdir` (or from scratch) to `train.steps`.

  `on_eval(trainer)` (e.g. a task suite, train/eval/) adds its metrics to every eval's.

  Metrics for step t are pulled to the host after step t+1 is dispatched, so logging never
  stalls the device. Returns the last logged metrics: with the final eval, or with
  'preempted': True when SIGTERM stopped the run early. Both carry the goodput figures
  (train/goodput.py) and, after a profile window (train/profiling.py), its `profile_dir`.
  """
  watch = Stopwatch('startup')  # every second of this call is charged to one category
  cfg, t = trainer.cfg, trainer.cfg.train
  manager = checkpoint.make_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  tokens_per_step = t.batch_size * t.seq_len
  flops_token = flops_per_token(trainer.model_cfg, t.seq_len, causal=trainer.model.causal)
  peak = device_peak_flops() * jax.device_count()
  bytes_per_token = info.get('eval_bytes_per_token', 0.0)

  start, tokens, flops = 0, 0, 0.0
  latest = manager.latest_step()
  if latest is not None:
    with watch.charge('restore'):
      trainer.state, meta = checkpoint.restore(manager, latest, trainer.state, train_iter)
    start, tokens, flops = latest, meta['tokens'], meta['flops']
    print(f'resumed from {checkpoint.checkpoint_dir(workdir)}/{latest}', flush=True)

  eval_step = make_eval_step(trainer, objective)
  # rows after the checkpoint are redone: drop them (and the final row, which a finished run rewrites)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                        resume_step=min(start, t.steps - 1), config=cfg)
  rng = jax.random.PRNGKey(cfg.seed + 1)
  preempt = _Preemption()
  last: dict[str, float] = {}
  bar = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
             mininterval=1.0, disable=jax.process_index() != 0)
  echo = bar.write if jax.process_index() == 0 else lambda line: None
  window = profile_window(cfg.profile, workdir, start, t.steps, echo)
  pending = None  # (step, device metrics) of the step whose metrics are not yet on the host
  clipped = 0.0   # steps whose gradient was clipped
  clock = time.perf_counter()

  def is_stats(step: int) -> bool:  # per-layer statistics (train/stats.py) on this step
    return bool(cfg.metrics.stats_every) and step % cfg.metrics.stats_every == 0

  def is_eval(step: int) -> bool:  # the final step's eval is written after the loop
    return bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and step != t.steps

  def flush(log: bool = True) -> None:
    """Pull the pending step's metrics (waiting for it), check the loss, and log (`log`)."""
    nonlocal pending, clock, tokens, flops, last, clipped
    if pending is None:
      return
    step, metrics = pending
    pending = None
    watch.switch('step')
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    watch.switch('other')
    check_step(m, step, t.max_skips)
    clipped += m.get('clipped', 0.0)
    now = time.perf_counter()
    dt, clock = now - clock, now
    tokens += tokens_per_step
    flops += tokens_per_step * flops_token
    last = {**m, 'tokens': tokens, 'flops': flops, 'step_time': dt,
            'tokens_per_sec': tokens_per_step / dt, 'mfu': tokens_per_step * flops_token / dt / peak}
    if 'clipped' in m:  # over the steps this process ran
      last['clipped_fraction'] = clipped / (step - start)
    if (log and (step % t.log_every == 0 or is_stats(step)) and step != t.steps
        and not is_eval(step)):
      writer.write(step, last)  # eval steps (the final one too) are written once, with their eval
    bar.set_postfix(loss=f'{m["loss"]:.4f}', refresh=False)
    bar.update(1)

  def run_eval(view: Trainer) -> dict[str, float]:
    out = evaluate(view, eval_step, view.state.params, eval_batches, bytes_per_token)
    return {**out, **(on_eval(view) if on_eval else {})}

  def save(step: int) -> None:
    checkpoint.save(manager, step, trainer.state, {'step': step, 'tokens': tokens, 'flops': flops},
                    train_iter)

  def with_goodput(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with the goodput figures so far (printed in one line) and the profile's folder."""
    watch.switch('other')
    seconds = watch.seconds()
    echo(goodput_line(seconds))
    return {**row, **goodput_metrics(seconds),
            **({'profile_dir': window.run_dir} if window.run_dir else {})}

  try:
    with mesh_rules(trainer.mesh):
      train_step = stats_step = None
      for step in range(start + 1, t.steps + 1):
        if window.begins(step):
          flush()  # no step in flight: the trace holds the window's steps only
          watch.switch('profile')
          window.start()
        window.mark(step)
        watch.switch('data')
        batch = global_batch(next(train_iter), trainer.mesh)
        if train_step is None:
          watch.switch('compile')
          train_step = compile_train_step(trainer, objective, batch)
          clock = time.perf_counter()
        if is_stats(step) and stats_step is None:
          watch.switch('compile')
          stats_step = compile_train_step(trainer, objective, batch, with_stats=True)
          clock = time.perf_counter()
        watch.switch('step')
        trainer.state, metrics = (stats_step if is_stats(step) else train_step)(trainer.state,
                                                                                batch, rng)
        flush()
        pending = (step, metrics)
        watch.switch('other')
        stopping = preempt.requested  # read once: this step's row is written on the way out
        is_ckpt = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                   or step in cfg.checkpoint.at_steps)
        if is_eval(step) or is_ckpt or stopping or window.ends(step):
          flush(log=not stopping)  # this step's loss is checked before anything is saved
        if window.ends(step):
          with watch.charge('profile'):
            window.stop(trainer.state)
          clock = time.perf_counter()  # the profiler's time is not training time
        if is_eval(step):
          with watch.charge('eval'):
            last.update(run_eval(eval_view(trainer)))
          if not stopping:
            writer.write(step, last)
          bar.write(f'step {step}: eval_loss {last["eval_loss"]:.4f}')
          clock = time.perf_counter()  # eval time is not training time
        if (is_ckpt or stopping) and step != t.steps:
          watch.switch('checkpoint')
          save(step)
        if stopping:
          if window.tracing:  # a window cut short keeps its trace
            watch.switch('profile')
            window.stop(trainer.state)
          watch.switch('checkpoint')
          checkpoint.wait(manager)
          bar.write(f'SIGTERM: saved checkpoint at step {step}; rerun the same command to resume')
          last = with_goodput({**last, 'preempted': True})
          writer.write(step, last)
          return last
      flush()
      if start < t.steps:
        watch.switch('checkpoint')
        save(t.steps)
      watch.switch('eval')
      last.update(run_eval(eval_view(trainer)))
      watch.switch('checkpoint')
      checkpoint.wait(manager)  # the final save commits within the time accounted for
      last = with_goodput(last)
      writer.write(t.steps, last)
  finally:
    window.stop()  # a run stopped inside the window keeps its trace
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
  objective = objective_for(trainer.model_cfg.family, dataset.tokenizer.pad_id,
                            loss_chunk=cfg.train.loss_chunk, z_loss=cfg.train.z_loss > 0)
  try:
    return trainer, run_training(trainer, objective, train_iter, eval_batches, workdir, dataset.info,
                                 on_eval)
  finally:
    train_iter.close()  # stops a streaming loader's prefetch threads (data/stream.py)
