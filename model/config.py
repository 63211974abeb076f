"""The model's typed view of `config.model`: resolved defaults and shape checks in one place."""
import dataclasses
import math

import jax.numpy as jnp
from ml_collections import ConfigDict

from model.errors import UserError

_CHOICES = {
    'family': ('decoder', 'encoder', 'encoder_decoder'),
    'pos_encoding': ('rope', 'learned', 'sinusoidal', 'relative', 'none'),
    'norm': ('rmsnorm', 'layernorm'),
    'norm_position': ('pre', 'post'),
    'mlp': ('swiglu', 'gelu', 'gelu_exact', 'relu', 'moe'),
    'attention': ('einsum', 'xla', 'cudnn', 'splash'),
    'remat': ('none', 'full', 'dots', 'dots_no_batch'),
    'dtype': ('float32', 'bfloat16', 'float16'),
    'param_dtype': ('float32', 'bfloat16'),
    'parameterization': ('sp', 'mup'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architecture switch; built from `config.model` by `model_config`."""
  vocab_size: int
  family: str = 'decoder'
  n_layers: int = 4
  d_model: int = 128
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512
  max_len: int = 128
  pos_encoding: str = 'rope'
  rope_theta: float = 10000.0
  norm: str = 'rmsnorm'
  norm_position: str = 'pre'
  norm_eps: float = 1e-5
  mlp: str = 'swiglu'
  n_experts: int = 0                     # mlp='moe': SwiGLU experts of d_ff each (model/moe.py)
  top_k: int = 2                         # mlp='moe': experts per token
  capacity_factor: float = 0.0           # mlp='moe': 0 = dropless; > 0 = per-sequence expert slots
  balance_loss: float = 0.01             # mlp='moe': weight of the load-balancing loss
  router_z_loss: float = 0.001           # mlp='moe': weight of the router z-loss
  use_bias: bool = False
  dropout: float = 0.0
  attn_dropout: float = 0.0
  embed_dropout: float = 0.0
  tie_embeddings: bool = True
  type_vocab_size: int = 0
  embed_norm: bool = False
  attention: str = 'einsum'
  cudnn_segments: int = 0                # cudnn: > 0 = a row's documents, not a mask (model/cudnn.py)
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = False
  remat: str = 'none'
  parameterization: str = 'sp'           # sp | mup (µP: init, Adam lr and logits scale by width)
  mup_base_width: int = 0                # mup: the d_model whose hyperparameters transfer (0 = d_model)
  mup_output_mult: float = 1.0           # mup: the logits' multiplier at the base width (tuned there)
  mup_init_mult: float = 1.0             # mup: the projections' init std multiplier (tuned there)
  qk_norm: bool = False                  # RMSNorm of each head's queries and keys (before RoPE)
  attn_softcap: float = 0.0              # > 0: attention logits -> c·tanh(logits / c)
  logit_softcap: float = 0.0             # > 0: output logits -> c·tanh(logits / c)
  n_decoder_layers: int = 0              # encoder-decoder: decoder depth (0 = n_layers)
  relative_buckets: int = 32             # pos_encoding='relative' (T5): buckets per stack
  relative_max_distance: int = 128       # distance beyond which relative positions share a bucket
  lora_rank: int = 0                     # 0 = no adapters (see model/layers.py Linear)
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()     # projection names that get adapters

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def width_mult(self) -> float:
    """µP's width multiplier d_model / base width; 1 under SP (and at the base width)."""
    if self.parameterization != 'mup':
      return 1.0
    return self.d_model / (self.mup_base_width or self.d_model)

  @property
  def init_scale(self) -> float:
    """What the layers' projection init stds (GPT-2's 0.02, 0.02/√(2L)) are multiplied by: µP's
    init multiplier, tuned at the base width, over √width_mult (variance ∝ 1/fan-in); 1 under SP."""
    if self.parameterization != 'mup':
      return 1.0
    return self.mup_init_mult / math.sqrt(self.width_mult)

  @property
  def logit_mult(self) -> float:
    """What the logits are multiplied by: µP's output multiplier, tuned at the base width, over
    the width multiplier, so the readout learns as fast at every width; 1 under SP."""
    if self.parameterization != 'mup':
      return 1.0
    return self.mup_output_mult / self.width_mult

  @property
  def decoder_layers(self) -> int:
    """Depth of the stack that produces the logits (and of its KV cache)."""
    return self.n_decoder_layers or self.n_layers  # non-zero only for encoder_decoder (checked)


def default_d_ff(d_model: int, mlp: str) -> int:
  """4·d for ReLU/GELU; 8/3·d rounded up to a multiple of 64 for SwiGLU (same parameter count),
  and for each SwiGLU expert of a mixture (model.d_ff sets a narrower one)."""
  if mlp in ('swiglu', 'moe'):
    return -(-int(8 * d_model / 3) // 64) * 64
  return 4 * d_model


def model_config(m: ConfigDict, vocab_size: int, seq_len: int) -> ModelConfig:
  """Resolve zeros to defaults and check every size, naming the field on failure."""
  for field, choices in _CHOICES.items():
    if m[field] not in choices:
      raise UserError(f'model.{field}={m[field]!r} is not one of {", ".join(choices)}')
  vocab = m.vocab_size or vocab_size
  n_kv = m.n_kv_heads or m.n_heads
  for field, value in (('n_layers', m.n_layers), ('d_model', m.d_model), ('n_heads', m.n_heads),
                       ('vocab_size', vocab)):
    if value <= 0:
      raise UserError(f'model.{field}={value} must be positive')
  if m.vocab_size and m.vocab_size < vocab_size:
    raise UserError(f'model.vocab_size={m.vocab_size} is smaller than the tokenizer vocabulary '
                    f'({vocab_size}); set it to 0 to use the tokenizer size')
  if not m.head_dim and m.d_model % m.n_heads:
    raise UserError(f'model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; '
                    'pick n_heads dividing d_model or set model.head_dim')
  if m.n_heads % n_kv:
    raise UserError(f'model.n_kv_heads={n_kv} does not divide model.n_heads={m.n_heads}; '
                    'use a divisor (1 = MQA, n_heads = MHA)')
  head_dim = m.head_dim or m.d_model // m.n_heads
  if m.pos_encoding == 'rope' and head_dim % 2:
    raise UserError(f'RoPE needs an even head_dim, got {head_dim}; change d_model/n_heads or head_dim')
  check_t5_fields(m)
  if m.mlp == 'moe':
    check_moe_fields(m)
  if m.attn_softcap and m.attention not in ('einsum', 'splash'):
    raise UserError(f'model.attn_softcap={m.attn_softcap} needs model.attention=einsum or splash '
                    f'(the {m.attention} kernels take no soft-cap); set one or the other')
  if m.attention == 'splash':
    check_splash_fields(m, seq_len)
  if m.cudnn_segments < 0 or (m.cudnn_segments and m.attention != 'cudnn'):
    raise UserError(f'model.cudnn_segments={m.cudnn_segments} needs model.attention=cudnn and '
                    'must be >= 0 (0 = the dense segment mask)')
  for field in ('mup_output_mult', 'mup_init_mult'):
    if m[field] != 1 and m.parameterization != 'mup':
      raise UserError(f'model.{field}={m[field]} needs model.parameterization=mup; set '
                      'parameterization=mup or leave the multiplier at 1')
  # Every family's context is the row: an encoder-decoder's decoder reads [BOS] + seq_len - 1 target
  # tokens and emits seq_len (target + EOS); generate never feeds the last one, so they fit.
  max_len = m.max_len or seq_len
  if max_len < seq_len:
    raise UserError(f'model.max_len={max_len} is shorter than train.seq_len={seq_len}')
  return ModelConfig(
      vocab_size=vocab, family=m.family, n_layers=m.n_layers, d_model=m.d_model,
      n_heads=m.n_heads, n_kv_heads=n_kv, head_dim=head_dim,
      d_ff=m.d_ff or default_d_ff(m.d_model, m.mlp), max_len=max_len,
      n_experts=m.n_experts if m.mlp == 'moe' else 0, top_k=m.top_k,
      capacity_factor=float(m.capacity_factor), balance_loss=float(m.balance_loss),
      router_z_loss=float(m.router_z_loss),
      pos_encoding=m.pos_encoding, rope_theta=m.rope_theta, norm=m.norm,
      norm_position=m.norm_position, norm_eps=m.norm_eps, mlp=m.mlp, use_bias=m.use_bias,
      dropout=m.dropout, attn_dropout=m.attn_dropout, embed_dropout=m.embed_dropout,
      tie_embeddings=m.tie_embeddings, type_vocab_size=m.type_vocab_size,
      embed_norm=m.embed_norm, attention=m.attention, cudnn_segments=m.cudnn_segments,
      dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
      n_decoder_layers=m.n_decoder_layers, relative_buckets=m.relative_buckets,
      relative_max_distance=m.relative_max_distance, qk_norm=m.qk_norm,
      parameterization=m.parameterization, mup_base_width=m.mup_base_width,
      mup_output_mult=float(m.mup_output_mult), mup_init_mult=float(m.mup_init_mult),
      attn_softcap=float(m.attn_softcap), logit_softcap=float(m.logit_softcap))


def check_t5_fields(m: ConfigDict) -> None:
  """The decoder depth belongs to the encoder-decoder; T5's buckets need room for exact ones."""
  if m.n_decoder_layers < 0 or (m.n_decoder_layers and m.family != 'encoder_decoder'):
    raise UserError(f'model.n_decoder_layers={m.n_decoder_layers} needs '
                    'model.family=encoder_decoder and must be >= 0 (0 = n_layers)')
  if m.pos_encoding == 'relative' and not 4 <= m.relative_buckets < 2 * m.relative_max_distance:
    raise UserError(f'model.relative_buckets={m.relative_buckets} must be at least 4 and below '
                    f'twice model.relative_max_distance={m.relative_max_distance}')


def check_moe_fields(m: ConfigDict) -> None:
  """A mixture needs two experts or more, each token routed to between 1 and all of them (the
  loss weights and capacity factor are range-checked up front, train/validate.py)."""
  if m.n_experts < 2:
    raise UserError(f'model.n_experts={m.n_experts} must be at least 2 for model.mlp=moe')
  if not 1 <= m.top_k <= m.n_experts:
    raise UserError(f'model.top_k={m.top_k} must be between 1 and model.n_experts={m.n_experts}')


def check_splash_fields(m: ConfigDict, seq_len: int) -> None:
  """What the splash kernel (model/splash.py) cannot do: added logits, attention dropout, tiles
  that do not divide the sequence."""
  if m.pos_encoding == 'relative':
    raise UserError('model.attention=splash takes no logit bias (T5 relative positions); use '
                    'model.attention=einsum or another model.pos_encoding')
  if m.attn_dropout:
    raise UserError(f'model.attn_dropout={m.attn_dropout} needs model.attention=einsum (the splash '
                    'kernel has no dropout); set one or the other')
  if seq_len % 128:
    raise UserError(f'model.attention=splash needs train.seq_len a multiple of 128 (its tiles), '
                    f'got {seq_len}; change train.seq_len or use model.attention=einsum')


LORA_TARGETS = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')


def with_lora(cfg: ModelConfig, lora: ConfigDict) -> ModelConfig:
  """`cfg` with the adapters of `config.lora` (rank 0 = none); targets are checked against the
  projections this architecture has, so a typo never trains nothing."""
  if lora.rank <= 0:
    return dataclasses.replace(cfg, lora_rank=0, lora_targets=())
  present = set(LORA_TARGETS) - ({'gate'} if cfg.mlp != 'swiglu' else set())
  if cfg.mlp == 'moe':  # the experts are stacked kernels, not projections with adapters
    present -= {'gate', 'up', 'down'}
  wanted = tuple(t.strip() for t in lora.targets.split(',') if t.strip())
  if lora.targets.strip() == 'all':
    wanted = tuple(t for t in LORA_TARGETS if t in present)
  missing = [t for t in wanted if t not in present]
  if not wanted or missing:
    raise UserError(f'lora.targets={lora.targets!r}: {", ".join(missing) or "nothing"} matches no '
                    f'layer of this model; use "all" or a comma list of {", ".join(sorted(present))}')
  if lora.alpha <= 0:
    raise UserError(f'lora.alpha={lora.alpha} must be positive (the adapter scale is alpha / rank)')
  return dataclasses.replace(cfg, lora_rank=int(lora.rank), lora_alpha=float(lora.alpha),
                             lora_targets=wanted)
