"""Every numeric config field checked against its legal range, in one place, before any work starts.

A bad value (`train.steps=-5`, `train.lr=0`) ends the run with one line naming the field and its
allowed range, before data is loaded or a step compiled. The table mirrors experiments/base.py;
checks that need the data or the model (vocabulary, d_ff divisibility) stay where those are built.
"""
import dataclasses
import math
from typing import Any, Callable

from ml_collections import ConfigDict

from model.errors import UserError


@dataclasses.dataclass(frozen=True)
class Range:
  """An interval of numbers, printed as '>= 1', '> 0' or 'in [0, 1)'."""
  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  hi_open: bool = False

  def __contains__(self, v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
      return False
    above = v > self.lo if self.lo_open else v >= self.lo
    below = v < self.hi if self.hi_open else v <= self.hi
    return above and below

  def __str__(self) -> str:
    if self.hi == math.inf:
      return f'> {self.lo:g}' if self.lo_open else f'>= {self.lo:g}'
    return f'in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}{")" if self.hi_open else "]"}'


def at_least(n: float) -> Range:
  return Range(n)


POSITIVE = Range(0, lo_open=True)
UNIT = Range(0, 1)                          # a fraction or probability
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)
RATE = Range(0, 1, hi_open=True)           # dropout, Adam betas: 1 would never move

# field -> allowed range. Zero often means "derive it" (see experiments/base.py), hence >= 0.
RANGES: tuple[tuple[str, Range], ...] = (
    ('seed', at_least(0)),
    ('model.n_layers', at_least(1)), ('model.n_decoder_layers', at_least(0)),
    ('model.d_model', at_least(1)), ('model.n_heads', at_least(1)), ('model.n_kv_heads', at_least(0)),
    ('model.head_dim', at_least(0)), ('model.d_ff', at_least(0)), ('model.vocab_size', at_least(0)),
    ('model.max_len', at_least(0)), ('model.rope_theta', POSITIVE),
    ('model.relative_buckets', at_least(1)), ('model.relative_max_distance', at_least(1)),
    ('model.norm_eps', POSITIVE), ('model.dropout', RATE), ('model.attn_dropout', RATE),
    ('model.embed_dropout', RATE), ('model.type_vocab_size', at_least(0)),
    ('lora.rank', at_least(0)), ('lora.alpha', POSITIVE),
    ('data.eval_fraction', OPEN_UNIT),
    ('data.synthetic.n_symbols', at_least(2)), ('data.synthetic.branching', at_least(1)),
    ('data.synthetic.concentration', POSITIVE), ('data.synthetic.n_docs', at_least(2)),
    ('data.synthetic.doc_len', at_least(1)),
    ('data.seq2seq.n_symbols', Range(2, 26)), ('data.seq2seq.min_len', at_least(1)),
    ('data.seq2seq.max_len', at_least(1)), ('data.seq2seq.n_eval', at_least(1)),
    ('data.seq2seq.noise_density', OPEN_UNIT), ('data.seq2seq.mean_span', at_least(1)),
    ('data.seq2seq.sentinels', at_least(0)), ('data.seq2seq.exact_match', at_least(0)),
    ('train.steps', at_least(1)), ('train.batch_size', at_least(1)), ('train.seq_len', at_least(1)),
    ('train.grad_accum', at_least(1)), ('train.lr', POSITIVE), ('train.warmup_steps', at_least(0)),
    ('train.min_lr_ratio', UNIT), ('train.decay_fraction', UNIT), ('train.decay_steps', at_least(0)), ('train.b1', RATE),
    ('train.b2', RATE), ('train.eps', at_least(0)), ('train.weight_decay', at_least(0)),
    ('train.clip_norm', at_least(0)), ('train.log_every', at_least(1)),
    ('train.muon_lr', POSITIVE), ('train.z_loss', at_least(0)), ('train.spike_threshold', at_least(0)),
    ('train.spike_warmup', at_least(1)), ('train.max_skips', at_least(1)), ('train.ema_decay', RATE),
    ('train.loss_chunk', at_least(0)),
    ('model.attn_softcap', at_least(0)), ('model.logit_softcap', at_least(0)),
    ('model.cudnn_segments', at_least(0)),
    ('model.n_experts', at_least(0)), ('model.top_k', at_least(1)),
    ('model.capacity_factor', at_least(0)), ('model.balance_loss', at_least(0)),
    ('model.router_z_loss', at_least(0)), ('model.mup_base_width', at_least(0)),
    ('model.mup_output_mult', POSITIVE), ('model.mup_init_mult', POSITIVE),
    ('metrics.stats_every', at_least(0)), ('profile.start_step', at_least(0)),
    ('profile.steps', at_least(1)), ('profile.top_ops', at_least(1)),
    ('eval.every_steps', at_least(0)), ('eval.max_batches', at_least(0)),
    ('eval.batch_size', at_least(0)),
    ('checkpoint.every_steps', at_least(0)), ('checkpoint.keep', at_least(1)),
    ('mesh.fsdp', at_least(1)), ('mesh.tensor', at_least(1)), ('mesh.expert', at_least(1)), ('mesh.num_processes', at_least(0)),
    ('mesh.process_id', at_least(-1)),
    ('sample.max_new_tokens', at_least(1)), ('sample.temperature', at_least(0)),
    ('sample.top_k', at_least(0)), ('sample.top_p', Range(0, 1, lo_open=True)),
    ('sample.min_p', RATE), ('sample.num_samples', at_least(1)), ('sample.seed', at_least(0)),
    ('sweep.parallel', at_least(1)), ('sweep.cpus_per_trial', at_least(0)),
    ('sweep.retries', at_least(0)),
    ('scaling.head_dim', at_least(1)), ('scaling.sizes_per_budget', at_least(1)),
    ('scaling.tokens_per_param', POSITIVE), ('scaling.lr', POSITIVE), ('scaling.lr_width', at_least(1)),
    ('scaling.lr_batch', at_least(1)), ('scaling.min_steps', at_least(1)),
    ('scaling.min_batch', at_least(1)), ('scaling.max_batch', at_least(1)),
    ('scaling.warmup_fraction', UNIT), ('scaling.cooldown_fraction', OPEN_UNIT),
    ('scaling.bootstrap', at_least(1)),
    ('hparams.holdout', at_least(0)), ('hparams.min_steps', at_least(1)), ('hparams.bootstrap', at_least(1)),
    ('sft.eval_fraction', OPEN_UNIT), ('sft.max_examples', at_least(0)),
    ('sft.eval_generate', at_least(0)), ('sft.max_new_tokens', at_least(1)),
    ('rlhf.pairs', at_least(2)), ('rlhf.eval_pairs', at_least(1)), ('rlhf.prompt_len', at_least(1)),
    ('rlhf.n_target', at_least(1)), ('rlhf.illegal_penalty', at_least(0)),
    ('rlhf.label_temperature', at_least(0)), ('rlhf.stats_samples', at_least(2)),
    ('rlhf.rollout_batch', at_least(1)), ('rlhf.epochs', at_least(1)),
    ('rlhf.response_len', at_least(1)), ('rlhf.temperature', POSITIVE),
    ('rlhf.no_eos_penalty', at_least(0)), ('rlhf.beta', at_least(0)), ('rlhf.kl_target', at_least(0)),
    ('rlhf.kl_horizon', at_least(1)), ('rlhf.clip_eps', POSITIVE), ('rlhf.value_clip_eps', POSITIVE),
    ('rlhf.entropy_coef', at_least(0)), ('rlhf.gamma', UNIT), ('rlhf.lam', UNIT),
    ('rlhf.critic_lr', at_least(0)), ('rlhf.group_size', at_least(1)), ('rlhf.dpo_beta', POSITIVE),
    ('rlhf.max_kl', POSITIVE), ('rlhf.nll_margin', at_least(0)), ('rlhf.max_disagreement', UNIT),
    ('rlhf.hacking_patience', at_least(1)), ('rlhf.eval_prompts', at_least(1)),
)

# (field, holds(config), allowed text): rules that relate two fields.
RELATIONS: tuple[tuple[str, Callable[[ConfigDict], bool], str], ...] = (
    ('train.grad_accum', lambda c: c.train.batch_size % c.train.grad_accum == 0,
     'a divisor of train.batch_size'),
    ('train.decay_steps', lambda c: c.train.decay_steps < c.train.steps, '< train.steps'),
    ('train.seq_len', lambda c: not c.model.max_len or c.train.seq_len <= c.model.max_len,
     '<= model.max_len (when set)'),
    ('model.n_heads', lambda c: bool(c.model.head_dim) or c.model.d_model % c.model.n_heads == 0,
     'a divisor of model.d_model (or set model.head_dim)'),
    ('model.n_kv_heads', lambda c: not c.model.n_kv_heads or c.model.n_heads % c.model.n_kv_heads == 0,
     'a divisor of model.n_heads (0 = n_heads)'),
    ('train.loss_chunk', lambda c: c.train.loss_chunk < c.train.seq_len,
     '< train.seq_len: positions of each row per chunk (0 = off; one chunk saves nothing)'),
    ('model.cudnn_segments', lambda c: not c.model.cudnn_segments or c.model.attention == 'cudnn',
     '0 unless model.attention=cudnn'),
    ('mesh.data', lambda c: c.mesh.data == -1 or c.mesh.data >= 1, '-1 (all remaining devices) or >= 1'),
    ('data.seq2seq.max_len', lambda c: c.data.seq2seq.min_len <= c.data.seq2seq.max_len,
     '>= data.seq2seq.min_len'),
    ('scaling.max_batch', lambda c: c.scaling.min_batch <= c.scaling.max_batch, '>= scaling.min_batch'),
    ('scaling.budgets', lambda c: len(c.scaling.budgets) > 0 and all(b in POSITIVE for b in c.scaling.budgets),
     'one or more budgets > 0'),
    ('scaling.lr_check', lambda c: all(x in POSITIVE for x in c.scaling.lr_check), 'multipliers > 0'),
    ('checkpoint.at_steps', lambda c: all(isinstance(x, int) and x >= 1 for x in c.checkpoint.at_steps),
     'whole steps >= 1'),
    ('hparams.budgets', lambda c: len(c.hparams.budgets) >= c.hparams.holdout + 2
     and all(b in POSITIVE for b in c.hparams.budgets), 'budgets > 0, at least 2 more than hparams.holdout'),
    ('hparams.lr_grid', lambda c: len(c.hparams.lr_grid) >= 2 and all(x in POSITIVE for x in c.hparams.lr_grid),
     '>= 2 multipliers > 0'),
    ('hparams.batch_grid', lambda c: len(c.hparams.batch_grid) >= 2
     and all(isinstance(b, int) and b >= 1 for b in c.hparams.batch_grid), '>= 2 whole batch sizes >= 1'),
    ('rlhf.eval_pairs', lambda c: c.rlhf.eval_pairs < c.rlhf.pairs, '< rlhf.pairs'),
)


def get(cfg: ConfigDict, field: str) -> Any:
  for key in field.split('.'):
    cfg = cfg[key]
  return cfg


def validate(cfg: ConfigDict) -> None:
  """Check every field of RANGES and RELATIONS; all failures in one UserError, one line.
  Needs no JAX, so a bad value fails in well under a second."""
  errors = [f'{field}={get(cfg, field)!r} must be {allowed}'
            for field, allowed in RANGES if get(cfg, field) not in allowed]
  if not errors:  # the relations assume each field is in range (no division by zero)
    errors = [f'{field}={get(cfg, field)!r} must be {allowed}'
              for field, holds, allowed in RELATIONS if not holds(cfg)]
  if errors:
    raise UserError('; '.join(errors))


def validate_devices(cfg: ConfigDict, n_devices: int, n_processes: int = 1) -> None:
  """The global batch must split over the mesh's data-parallel devices (data × fsdp × expert) and the
  processes; called once JAX knows the devices (after multi-host start-up)."""
  from train.mesh import mesh_shape  # imports jax: keep `validate` free of it
  data, fsdp, _, expert = mesh_shape(cfg.mesh, n_devices)
  t = cfg.train
  micro = t.batch_size // t.grad_accum
  if micro % (data * fsdp * expert):
    raise UserError(f'train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro} '
                    f'must be a multiple of the {data * fsdp * expert} data-parallel devices '
                    '(mesh.data × mesh.fsdp × mesh.expert)')
  if t.batch_size % n_processes:
    raise UserError(f'train.batch_size={t.batch_size} must be a multiple of the {n_processes} '
                    'processes (each loads its share)')
