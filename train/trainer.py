"""The trainer every stage builds once from the config: mesh, model (and its eval twin), optimizer
and the sharded train state, started from random or pretrained weights, all of them trained or
LoRA adapters on a frozen base.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model.config import ModelConfig, model_config, with_lora
from model.errors import UserError
from model.lora import merged_params
from model.transformer import build_model
from train.mesh import LOGICAL_RULES, check_divisibility, make_mesh, mesh_rules
from train.state import TrainState, make_optimizer


@dataclasses.dataclass
class Trainer:
  """What a stage needs, built once from the config: mesh, model, optimizer, sharded state.

  `state.params` is what the optimizer trains: every weight, or only the LoRA adapters (plus any
  new `heads`, e.g. a reward model's score head), in which case the base weights are `frozen`,
  passed to each step as a (never donated, never copied) argument and merged in by `with_frozen`.
  """
  cfg: ConfigDict
  mesh: jax.sharding.Mesh
  model_cfg: ModelConfig
  model: nn.Module            # dropout on (when configured): for training
  eval_model: nn.Module       # deterministic: for eval and sampling
  tx: optax.GradientTransformation
  state: TrainState
  state_sharding: Any
  frozen: Any = None          # base params under LoRA, else None
  frozen_sharding: Any = None
  heads: tuple[str, ...] = ()  # top-level params trained beside the adapters under LoRA

  def variables(self, params: Any | None = None) -> dict[str, Any]:
    """The full variables of the (adapted) model for `params` (default: the current state)."""
    params = self.state.params if params is None else params
    return full_variables(params, self.frozen, self.heads)


def inference_params(trainer: Trainer) -> Any:
  """The trainer's current weights as one plain tree (adapters merged), for generation."""
  return merged_params(trainer.variables(), trainer.model_cfg)


def full_variables(trainable: Any, frozen: Any, heads: tuple[str, ...] = ()) -> dict[str, Any]:
  """Model variables from the trainable tree: itself, or under LoRA the frozen base plus the
  trained `heads` as 'params' and the adapters as 'lora'."""
  if frozen is None:
    return {'params': trainable}
  return {'params': {**frozen, **{h: trainable[h] for h in heads}},
          'lora': {k: v for k, v in trainable.items() if k not in heads}}


def with_frozen(apply_fn: Callable[..., Any], frozen: Any, heads: tuple[str, ...] = ()
                ) -> Callable[..., Any]:
  """`apply_fn` as objectives call it, apply_fn({'params': trainable}, ...), with the frozen base
  merged in (see `full_variables`)."""
  if frozen is None:
    return apply_fn
  return lambda variables, *a, **k: apply_fn(full_variables(variables['params'], frozen, heads),
                                             *a, **k)


def init_trainer(cfg: ConfigDict, vocab_size: int, devices: list[jax.Device] | None = None, *,
                 model_cfg: ModelConfig | None = None, init_params: Any = None,
                 build: Callable[[ModelConfig, bool], nn.Module] = build_model,
                 fresh: tuple[str, ...] = (), shapes_only: bool = False) -> Trainer:
  """Mesh, model and a sharded train state (weights, optimizer).

  Weights are random, or `init_params` (a pretrained tree, e.g. from `load_pretrained`, whose
  `model_cfg` is given) with only the top-level keys in `fresh` (new heads) left at their random
  init. `config.lora.rank` > 0 trains adapters only (and the `fresh` heads) and keeps the other
  weights frozen. `shapes_only` makes the state (and frozen base) jax.ShapeDtypeStructs with their
  shardings, nothing allocated or computed: enough to compile the steps ahead of time, also for
  compile-only devices such as a TPU topology's (benchmarks/aot_topology.py).
  """
  t = cfg.train
  if t.grad_accum < 1 or t.batch_size % t.grad_accum:
    raise UserError(f'train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}')
  mesh = make_mesh(cfg.mesh, devices)
  mcfg = with_lora(model_cfg or model_config(cfg.model, vocab_size, t.seq_len), cfg.lora)
  if mcfg.lora_rank and init_params is None:
    raise UserError('lora.rank > 0 trains adapters on a pretrained base; set config.pretrained '
                    '(stage sft, reward, dpo, ppo) or lora.rank=0')
  if mcfg.max_len < t.seq_len:
    raise UserError(f'train.seq_len={t.seq_len} exceeds the model context of {mcfg.max_len}')
  check_divisibility(mcfg, mesh, t.batch_size, t.grad_accum)
  model, eval_model = build(mcfg, False), build(mcfg, True)
  tx = make_optimizer(t, mcfg.width_mult)

  def init(rng):
    tokens = jnp.zeros((1, t.seq_len), jnp.int32)
    variables = model.init({'params': rng, 'dropout': rng}, tokens)
    params, frozen = variables['params'], None
    if mcfg.lora_rank:
      frozen = {k: v for k, v in params.items() if k not in heads}
      params = {**variables['lora'], **{k: params[k] for k in heads}}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)), frozen

  heads = tuple(fresh) if mcfg.lora_rank else ()
  rng = jax.random.PRNGKey(cfg.seed)
  with mesh_rules(mesh):
    abstract = jax.eval_shape(init, rng)
    sharding, frozen_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                                            LOGICAL_RULES)
    if shapes_only:
      state, frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   jax.eval_shape(nn.meta.unbox, abstract),
                                   (sharding, frozen_sharding))
    else:
      state, frozen = jax.jit(lambda r: nn.meta.unbox(init(r)),
                              out_shardings=(sharding, frozen_sharding))(rng)
  if init_params is not None and not shapes_only:
    if frozen is not None:
      frozen = place_pretrained(frozen, init_params, frozen_sharding, fresh)
    else:
      state = state.replace(params=place_pretrained(state.params, init_params, sharding.params, fresh))
  return Trainer(cfg, mesh, mcfg, model, eval_model, tx, state, sharding, frozen, frozen_sharding,
                 heads)


def place_pretrained(init: Any, pretrained: Any, sharding: Any, fresh: tuple[str, ...]) -> Any:
  """`pretrained` leaves put on the mesh in place of the random `init`; any missing or mismatched
  key is an error naming it (a restore never silently keeps random weights)."""
  missing = sorted(set(init) - set(pretrained) - set(fresh))
  extra = sorted(set(pretrained) - set(init))
  if missing or extra:
    raise UserError(f'pretrained weights do not fit the model: missing {missing}, unexpected {extra}')
  out = dict(init)
  for key in pretrained:
    flat_init = dict(jax.tree_util.tree_leaves_with_path(init[key]))
    flat_pre = dict(jax.tree_util.tree_leaves_with_path(pretrained[key]))
    if flat_init.keys() != flat_pre.keys():
      diff = sorted(map(jax.tree_util.keystr, flat_init.keys() ^ flat_pre.keys()))
      raise UserError(f'pretrained weights under {key!r} do not fit the model: {diff[:4]}')
    for path, leaf in flat_pre.items():
      if leaf.shape != flat_init[path].shape:
        raise UserError(f'pretrained {key}{jax.tree_util.keystr(path)} has shape {leaf.shape}, the '
                        f'model wants {flat_init[path].shape}')
    # a fresh copy first: jax 0.10 ignores may_alias=False when it replicates a one-device array
    # over a mesh (shard 0 keeps the caller's buffer), and donating the state would then free the
    # caller's weights (e.g. an RLHF reference)
    out[key] = jax.tree.map(lambda x, s, like: jax.device_put(jnp.array(x, like.dtype, copy=True), s),
                            pretrained[key], sharding[key], init[key])
  return out
