"""Hugging Face BERT checkpoints (BertModel / sentence-transformers folders: config.json +
model.safetensors + tokenizer.json) to our Encoder's parameters.

BERT is our encoder with post-norm LayerNorm (with biases), exact GELU, learned positions, a
token-type embedding and an embedding LayerNorm. Its MLM head (transform + bias) and pooler are
not imported: `logits` of an imported BERT is the plain tied projection, sentence embeddings are
exact. Projections map as in hf_llama.py: torch [out, in] weights to kernels [in, ...out].
"""
import os
from typing import Any, Mapping

import numpy as np

from model.config import ModelConfig
from model.convert.hf_llama import NOT_HF, Params, read_safetensors
from model.errors import UserError
from model.jsonio import read_json


def bert_config(hf: Mapping[str, Any], where: str, max_seq_length: int = 0) -> ModelConfig:
  """Our ModelConfig from a BERT config.json; `max_seq_length` (sentence-transformers) caps the
  context as it does there."""
  if hf.get('model_type') != 'bert':
    raise UserError(f'{where}: model_type {hf.get("model_type")!r} is not bert; pass a BertModel '
                    'or sentence-transformers BERT folder')
  if hf.get('hidden_act', 'gelu') != 'gelu' or hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise UserError(f'{where}: only hidden_act=gelu with absolute position embeddings is supported')
  try:
    heads, d = int(hf['num_attention_heads']), int(hf['hidden_size'])
    max_len = int(hf.get('max_position_embeddings', 512))
    return ModelConfig(
        vocab_size=int(hf['vocab_size']), family='encoder', n_layers=int(hf['num_hidden_layers']),
        d_model=d, n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
        d_ff=int(hf['intermediate_size']), max_len=min(max_len, max_seq_length or max_len),
        pos_encoding='learned', norm='layernorm', norm_position='post',
        norm_eps=float(hf.get('layer_norm_eps', 1e-12)), mlp='gelu_exact', use_bias=True,
        type_vocab_size=int(hf.get('type_vocab_size', 2)), embed_norm=True)
  except KeyError as e:
    raise UserError(f'{where}: config.json has no {e.args[0]!r}; is it a BERT config?') from None


def params_from_bert(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> Params:
  """Our Encoder parameter tree (per-layer layout) from HF BERT tensors (with or without 'bert.')."""
  tensors = {k.removeprefix('bert.'): v for k, v in tensors.items()}
  dtype = cfg.weight_dtype
  d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim

  def t(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise UserError(f'{where}: tensor {name} is missing; the checkpoint does not match config.json')
    x = np.asarray(tensors[name], np.float32)
    x = x.T if x.ndim == 2 and not name.startswith('embeddings.') else x
    if x.size != np.prod(shape):
      raise UserError(f'{where}: tensor {name} has shape {list(tensors[name].shape)}, config.json '
                      f'implies {int(np.prod(shape))} values; the checkpoint does not match its config')
    return x.reshape(shape).astype(dtype)

  def linear(name: str, kernel: tuple[int, ...], bias: tuple[int, ...]) -> Params:
    return {'kernel': t(name + '.weight', kernel), 'bias': t(name + '.bias', bias)}

  def layer_norm(name: str) -> Params:
    return {'scale': t(name + '.weight', (d,)), 'bias': t(name + '.bias', (d,))}

  layers = {}
  for i in range(cfg.n_layers):
    p = f'encoder.layer.{i}.'
    layers[f'layers_{i}'] = {
        'attn': {'query': linear(p + 'attention.self.query', (d, h, k), (h, k)),
                 'key': linear(p + 'attention.self.key', (d, h, k), (h, k)),
                 'value': linear(p + 'attention.self.value', (d, h, k), (h, k)),
                 'out': linear(p + 'attention.output.dense', (h, k, d), (d,))},
        'attn_norm': layer_norm(p + 'attention.output.LayerNorm'),
        'mlp': {'up': linear(p + 'intermediate.dense', (d, cfg.d_ff), (cfg.d_ff,)),
                'down': linear(p + 'output.dense', (cfg.d_ff, d), (d,))},
        'mlp_norm': layer_norm(p + 'output.LayerNorm')}
  e = 'embeddings.'
  return {'embed': {'embedding': t(e + 'word_embeddings.weight', (cfg.vocab_size, d))},
          'pos_embed': {'embedding': t(e + 'position_embeddings.weight',
                                       np.shape(tensors.get(e + 'position_embeddings.weight', ())))[:cfg.max_len]},
          'type_embed': {'embedding': t(e + 'token_type_embeddings.weight', (cfg.type_vocab_size, d))},
          'embed_norm': layer_norm(e + 'LayerNorm'), 'blocks': layers}


def is_bert_folder(folder: str) -> bool:
  path = os.path.join(folder, 'config.json')
  return os.path.exists(path) and read_json(path, NOT_HF).get('model_type') == 'bert'


def load_hf_bert(folder: str) -> tuple[ModelConfig, Params]:
  """Config and parameters of a BERT folder; sentence_bert_config.json's max_seq_length is kept."""
  st_path = os.path.join(folder, 'sentence_bert_config.json')
  max_seq = int(read_json(st_path, NOT_HF).get('max_seq_length', 0)) if os.path.exists(st_path) else 0
  cfg = bert_config(read_json(os.path.join(folder, 'config.json'), NOT_HF), folder, max_seq)
  return cfg, params_from_bert(read_safetensors(folder), cfg, folder)
