"""llama-architecture GGUF files (llama.cpp) to our Decoder: dequantized weights, hyperparameters,
tokenizer and chat template, all read from the one file with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K inside each head from the rotate-half RoPE
layout (HF, ours) to the interleaved one its kernels use; `unpermute` undoes that. The tensors are
then renamed to HF llama names and share hf_llama.py's mapping and shape checks.
"""
import re
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.convert.hf_llama import Params, check_tensors, params_from_hf
from model.convert.tokenizer import TextTokenizer, gguf_tokenizer
from model.errors import UserError

SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1')
_NAMES = {  # GGUF tensor name -> HF llama name; {i} is the layer
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
    'blk.{i}.attn_q.weight': 'model.layers.{i}.self_attn.q_proj.weight',
    'blk.{i}.attn_k.weight': 'model.layers.{i}.self_attn.k_proj.weight',
    'blk.{i}.attn_v.weight': 'model.layers.{i}.self_attn.v_proj.weight',
    'blk.{i}.attn_output.weight': 'model.layers.{i}.self_attn.o_proj.weight',
    'blk.{i}.ffn_gate.weight': 'model.layers.{i}.mlp.gate_proj.weight',
    'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.up_proj.weight',
    'blk.{i}.ffn_down.weight': 'model.layers.{i}.mlp.down_proj.weight',
    'blk.{i}.attn_norm.weight': 'model.layers.{i}.input_layernorm.weight',
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
}


def read_gguf(path: str) -> Any:
  """A memory-mapped gguf.GGUFReader; an unreadable file is a UserError."""
  from gguf import GGUFReader
  try:
    return GGUFReader(path)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not a readable GGUF file ({e}); check the path') from None


def metadata(reader: Any) -> dict[str, Any]:
  """All key/value metadata as Python values."""
  return {key: field.contents() for key, field in reader.fields.items()}


def gguf_config(meta: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
  """Our ModelConfig from llama.* metadata; other architectures and RoPE variants are refused."""
  arch = meta.get('general.architecture')
  if arch != 'llama':
    raise UserError(f'{where}: GGUF architecture {arch!r} is not supported; only llama GGUFs '
                    'can be imported')
  get = lambda key, default=None: meta.get(f'llama.{key}', default)
  scaling = get('rope.scaling.type', 'none')
  if scaling != 'none' or 'rope_freqs.weight' in tensor_names:
    raise UserError(f'{where}: RoPE scaling ({scaling}) is not supported; only default RoPE is')
  try:
    d, heads = int(get('embedding_length')), int(get('attention.head_count'))
    head_dim = int(get('attention.key_length', d // heads))
    if int(get('rope.dimension_count', head_dim)) != head_dim:
      raise UserError(f'{where}: partial RoPE (rope.dimension_count != head_dim) is not supported')
    vocab = get('vocab_size') or len(meta.get('tokenizer.ggml.tokens', ()))
    return ModelConfig(
        vocab_size=int(vocab), n_layers=int(get('block_count')), d_model=d, n_heads=heads,
        n_kv_heads=int(get('attention.head_count_kv', heads)), head_dim=head_dim,
        d_ff=int(get('feed_forward_length')), max_len=int(get('context_length', 2048)),
        rope_theta=float(get('rope.freq_base', 10000.0)),
        norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-5)),
        tie_embeddings='output.weight' not in tensor_names)
  except TypeError:
    raise UserError(f'{where}: llama.* hyperparameters are missing from the GGUF metadata; '
                    'the file is incomplete') from None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs back to rotate-half halves."""
  pairs = w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
  return pairs.swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
  """The HF llama name of a GGUF tensor name, or None for tensors we do not use."""
  match = re.fullmatch(r'blk\.(\d+)\.(.+)', name)
  key, layer = (f'blk.{{i}}.{match[2]}', match[1]) if match else (name, '')
  target = _NAMES.get(key)
  return target.format(i=layer) if target else None


def gguf_tensors(reader: Any, cfg: ModelConfig, where: str) -> dict[str, np.ndarray]:
  """Dequantized float32 tensors under HF names, [out, in] like torch, Q/K un-permuted."""
  from gguf.quants import dequantize
  out = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name)
    if name is None:
      continue
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
      raise UserError(f'{where}: tensor {tensor.name} has type {kind}, which is not supported; '
                      f'use a GGUF quantized as one of {", ".join(SUPPORTED_TYPES)}')
    out[name] = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
  check_tensors({k: v.shape for k, v in out.items()}, cfg, where)
  for name, w in out.items():
    if name.endswith('q_proj.weight'):
      out[name] = unpermute(w, cfg.n_heads)
    elif name.endswith('k_proj.weight'):
      out[name] = unpermute(w, cfg.n_kv_heads)
  return out


def load_gguf(path: str) -> tuple[ModelConfig, Params, TextTokenizer | None]:
  """Config, parameters (scan_layers=False layout) and tokenizer of a llama GGUF file."""
  reader = read_gguf(path)
  meta = metadata(reader)
  cfg = gguf_config(meta, {t.name for t in reader.tensors}, path)
  tokenizer = gguf_tokenizer(meta, path)
  return cfg, params_from_hf(gguf_tensors(reader, cfg, path), cfg, path), tokenizer
