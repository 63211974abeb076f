"""Scalar heads on the decoder: the reward model and the PPO critic (value head) are one class.

`ScalarModel` subclasses `Decoder`, so its parameter tree is the LM's plus `score_head`: pretrained
LM weights load into it directly (`lm_backbone`), LoRA adapts it exactly as it adapts the LM, and
a critic starts from the reward model's parameters unchanged. A sequence's reward is the scalar at
its last real token (`last_token_index`), wherever the padding sits.

`ClassifierModel` does the same for the encoder: its tree is the encoder's plus `class_head`, so
an MLM-pretrained encoder or MiniLM loads into it (`lm_backbone`) for sequence classification.
"""
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.layers import Array, Linear
from model.transformer import Decoder, Encoder, mean_pool

POOLING = ('mean', 'first')


class ScalarModel(Decoder):
  """tokens, positions, segment_ids: [b, t] -> one f32 scalar per token [b, t] (causal: the scalar
  at token i sees tokens 0..i, so it scores that prefix)."""

  def setup(self):
    super().setup()
    c = self.cfg
    self.score_head = Linear((1,), ('embed', None), use_bias=True, dtype=c.compute_dtype,
                             param_dtype=c.weight_dtype, name='score_head')

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    return self.score_head(self.features(tokens, positions, segment_ids))[..., 0].astype(jnp.float32)


def build_scalar_model(cfg: ModelConfig, deterministic: bool = True) -> ScalarModel:
  """The reward / value model for `cfg` (a decoder: the head reads causal prefix features)."""
  if cfg.family != 'decoder':
    raise UserError(f"reward and value models need model.family='decoder', got {cfg.family!r}")
  return ScalarModel(cfg, deterministic)


class ClassifierModel(Encoder):
  """tokens, positions, segment_ids: [b, t] -> class logits [b, n_classes] in f32 from the pooled
  final hidden states: the mean over real tokens (sentence-transformers' pooling) or the first
  token (BERT's [CLS])."""
  n_classes: int = 2
  pool: str = 'mean'

  def setup(self):
    super().setup()
    c = self.cfg
    self.class_head = Linear((self.n_classes,), ('embed', None), use_bias=True, dtype=c.compute_dtype,
                             param_dtype=c.weight_dtype, name='class_head')

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    hidden = self.features(tokens, positions, segment_ids)
    pooled = mean_pool(hidden, segment_ids) if self.pool == 'mean' else hidden[:, 0]
    return self.class_head(pooled).astype(jnp.float32)


def build_classifier(cfg: ModelConfig, deterministic: bool = True, *, n_classes: int,
                     pool: str = 'mean') -> ClassifierModel:
  """The sequence classifier for an encoder `cfg` (bidirectional features pool the whole text)."""
  if cfg.family != 'encoder':
    raise UserError(f"classification fine-tunes an encoder (an MLM workdir, MiniLM), got a "
                    f"model.family={cfg.family!r} base; point config.pretrained at an encoder")
  if pool not in POOLING:
    raise UserError(f"sft.pool={pool!r} is not valid; use {' or '.join(POOLING)}")
  return ClassifierModel(cfg, deterministic, n_classes=n_classes, pool=pool)


def lm_backbone(lm_params: dict[str, Any]) -> dict[str, Any]:
  """The part of a trained LM's params a ScalarModel or ClassifierModel shares: all but an untied
  output head. Load it with init_trainer(..., build=build_scalar_model,
  init_params=lm_backbone(lm), fresh=('score_head',))."""
  return {k: v for k, v in lm_params.items() if k != 'lm_head'}


def last_token_index(mask: Array) -> Array:
  """Index [...] of the last position where `mask` [..., t] (segment ids or a bool mask) is
  non-zero: right the same for left- and right-padded rows. An all-padding row gives t - 1."""
  real = mask > 0
  return real.shape[-1] - 1 - jnp.argmax(jnp.flip(real, -1), axis=-1)


def gather_last(values: Array, index: Array) -> Array:
  """values [..., t] at index [...] -> [...]."""
  return jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]


def positions_from_mask(mask: Array | np.ndarray) -> Array | np.ndarray:
  """Positions [..., t] counting real tokens from 0 in each row (0 on padding), so a left-padded
  row gets the same positions as the same tokens right-padded. int32; numpy in, numpy out (host
  batches), else jax (inside jit)."""
  xp = np if isinstance(mask, np.ndarray) else jnp
  real = (mask > 0).astype(xp.int32)
  return (xp.maximum(xp.cumsum(real, axis=-1) - 1, 0) * real).astype(xp.int32)


def apply_rows(apply_fn: Callable[..., Array], variables: Any, tokens: Array, positions: Array,
               segment_ids: Array, **kwargs) -> Array:
  """Runs a [b, t] model on rows with any leading axes [..., t] (e.g. [b, 2, t] preference pairs)
  by flattening them; the output keeps them: [..., t] (scalars) or [..., t, v] (logits)."""
  t = tokens.shape[-1]
  out = apply_fn(variables, *(x.reshape(-1, t) for x in (tokens, positions, segment_ids)), **kwargs)
  return out.reshape(*tokens.shape, *out.shape[2:])


def sequence_scores(apply_fn: Callable[..., Array], variables: Any, tokens: Array,
                    positions: Array, segment_ids: Array, **kwargs) -> Array:
  """The scalar at each row's last real token: a reward per sequence [...] for tokens [..., t]."""
  values = apply_rows(apply_fn, variables, tokens, positions, segment_ids, **kwargs)
  return gather_last(values, last_token_index(segment_ids))
