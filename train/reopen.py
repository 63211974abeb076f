"""Reopening a workdir as a model: how `model.load_pretrained` opens a project run.

It plugs in through the `lmlab.loaders` entry point (pyproject.toml), because reopening a run
needs tokenizers and checkpoints, which sit above model/. The folder layout is train/workdir.py's.
"""
import functools
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from data.tokenizer import load_tokenizer
from model.config import model_config, with_lora
from model.errors import UserError
from model.heads import build_classifier, build_scalar_model
from model.lora import merged_params
from model.pretrained import LoadedModel, load_pretrained
from model.transformer import build_model
from train import checkpoint
from train.state import TrainState, make_optimizer
from train.workdir import CONFIG_FILE, FROM_SCRATCH, is_workdir, read_config, tokenizer_dir


def load_workdir(workdir: str) -> LoadedModel | None:
  """Config, latest-checkpoint params, tokenizer and model builder of a run trained by this
  project, or None when `workdir` is not one (the `lmlab.loaders` entry point).

  A run that fine-tuned another model (`config.pretrained` set: stage sft, reward, ...) takes its
  architecture and tokenizer from that base; a LoRA run's checkpoint holds only the adapters (and
  its new heads), which are merged into the base weights here. A reward model or a classifier
  reopens with its head (`build` says which module the params belong to).
  """
  if not is_workdir(workdir):
    return None
  cfg = read_config(workdir)
  try:
    return _load(workdir, cfg)
  except (AttributeError, KeyError) as e:  # a config.json from an older version lacks a field
    raise UserError(f'{os.path.join(workdir, CONFIG_FILE)} lacks config field {e}; it was written by '
                    'an older version: add the field or retrain') from None


def _load(workdir: str, cfg: ConfigDict) -> LoadedModel:
  base = None
  if cfg.get('pretrained') and cfg.stage not in FROM_SCRATCH:
    if os.path.abspath(cfg.pretrained) == os.path.abspath(workdir):
      raise UserError(f'{workdir}/{CONFIG_FILE} names its own workdir as config.pretrained; point '
                      'it at the base')
    base = load_pretrained(cfg.pretrained)
    mcfg, tokenizer = base.config, base.tokenizer
  else:
    tokenizer = load_tokenizer(tokenizer_dir(workdir))
    mcfg = model_config(cfg.model, tokenizer.vocab_size, cfg.train.seq_len)
  head, build = head_of(workdir, cfg)
  lora_cfg = with_lora(mcfg, cfg.lora) if 'lora' in cfg else mcfg
  model, tx = build(lora_cfg), make_optimizer(cfg.train, lora_cfg.width_mult)
  heads = (head,) if head and lora_cfg.lora_rank else ()

  def init_state() -> TrainState:
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params = variables['params']
    if lora_cfg.lora_rank:
      params = {**variables['lora'], **{k: params[k] for k in heads}}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init_state))
  state, _ = checkpoint.restore_latest(workdir, abstract)
  params = state.params
  if lora_cfg.lora_rank:
    adapters = {k: v for k, v in params.items() if k not in heads}
    params = {**merged_params({'params': base.params, 'lora': adapters}, lora_cfg),
              **{k: params[k] for k in heads}}
    if head:  # the base's untied LM head is not part of a scalar or classifier model
      params = {k: v for k, v in params.items() if k != 'lm_head'}
  return LoadedModel(mcfg, params, tokenizer, build)


def head_of(workdir: str, cfg: ConfigDict) -> tuple[str, Callable[..., nn.Module]]:
  """The new head a stage put on its base ('' for a language model) and the module to build."""
  if cfg.stage == 'reward':
    return 'score_head', build_scalar_model
  if cfg.stage == 'sft' and str(cfg.sft.train).startswith('classify:'):
    kernel = checkpoint.latest_leaf_shape(workdir, ('params', 'class_head', 'kernel'))
    return 'class_head', functools.partial(build_classifier, n_classes=kernel[-1], pool=cfg.sft.pool)
  return '', build_model
