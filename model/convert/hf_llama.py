"""Hugging Face llama checkpoints (LlamaForCausalLM: config.json + *.safetensors) to and from our
Decoder's parameters.

HF stores each projection as a torch Linear weight [out, in]; ours are kernels [in, ...out] with the
head axes split out, e.g. q_proj [heads·head_dim, d] <-> query kernel [d, heads, head_dim]. RoPE is
rotate-half in both, so Q and K map without any permutation (GGUF files need one; see gguf.py).
"""
import glob
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.jsonio import read_json

if TYPE_CHECKING:
  from model.convert.tokenizer import TextTokenizer

Params = dict[str, Any]
WEIGHTS_FILE = 'model.safetensors'
NOT_HF = 'pass a Hugging Face checkpoint folder'  # what to do about an unreadable config


def llama_config(hf: Mapping[str, Any], where: str) -> ModelConfig:
  """Our ModelConfig from a llama config.json (transformers 4 or 5 field names)."""
  arch = hf.get('model_type')
  if arch != 'llama':
    raise UserError(f'{where}: model_type {arch!r} is not supported; only llama checkpoints '
                    '(LlamaForCausalLM) can be imported')
  rope = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type') or 'default'
  if rope_type != 'default':
    raise UserError(f'{where}: RoPE scaling {rope_type!r} is not supported; only default RoPE is')
  for flag in ('attention_bias', 'mlp_bias'):
    if hf.get(flag):
      raise UserError(f'{where}: {flag}=true is not supported; only bias-free llama layers are')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'{where}: hidden_act {hf["hidden_act"]!r} is not supported; llama uses silu')
  try:
    heads, d = int(hf['num_attention_heads']), int(hf['hidden_size'])
    return ModelConfig(
        vocab_size=int(hf['vocab_size']), n_layers=int(hf['num_hidden_layers']), d_model=d,
        n_heads=heads, n_kv_heads=int(hf.get('num_key_value_heads') or heads),
        head_dim=int(hf.get('head_dim') or d // heads), d_ff=int(hf['intermediate_size']),
        max_len=int(hf.get('max_position_embeddings', 2048)),
        rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  except KeyError as e:
    raise UserError(f'{where}: config.json has no {e.args[0]!r}; is it a llama config?') from None


def hf_llama_config(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json transformers needs to rebuild `cfg` as a LlamaForCausalLM."""
  check_exportable(cfg)
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model, 'intermediate_size': cfg.d_ff,
      'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.n_kv_heads, 'head_dim': cfg.head_dim,
      'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,  # transformers 4 reads this, 5 reads rope_parameters
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
      'tie_word_embeddings': cfg.tie_embeddings, 'dtype': 'float32', 'torch_dtype': 'float32'}


def check_exportable(cfg: ModelConfig) -> None:
  """Only the llama recipe has a LlamaForCausalLM twin."""
  want = dict(family='decoder', pos_encoding='rope', norm='rmsnorm', norm_position='pre',
              mlp='swiglu', use_bias=False, qk_norm=False, attn_softcap=0.0, logit_softcap=0.0,
              width_mult=1.0, logit_mult=1.0)
  for field, value in want.items():
    if getattr(cfg, field) != value:
      raise UserError(f'model.{field}={getattr(cfg, field)!r} has no Hugging Face llama '
                      f'equivalent; only {field}={value!r} models can be exported')


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a llama checkpoint of `cfg` must hold, with its [out, in] shape."""
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    shapes['lm_head.weight'] = (v, d)
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    shapes.update({
        p + 'self_attn.q_proj.weight': (q, d), p + 'self_attn.k_proj.weight': (kv, d),
        p + 'self_attn.v_proj.weight': (kv, d), p + 'self_attn.o_proj.weight': (d, q),
        p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
        p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
        p + 'post_attention_layernorm.weight': (d,)})
  return shapes


def check_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
  """Name the first missing or mis-shaped tensor (extra ones, e.g. rotary buffers, are ignored)."""
  for name, want in expected_shapes(cfg).items():
    if name not in shapes:
      raise UserError(f'{where}: tensor {name} is missing; the checkpoint is incomplete or does '
                      'not match config.json')
    if tuple(shapes[name]) != want:
      raise UserError(f'{where}: tensor {name} has shape {list(shapes[name])}, config.json implies '
                      f'{list(want)}; the checkpoint does not match its config')


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> Params:
  """Our Decoder parameter tree (scan_layers=False layout) from HF-named [out, in] tensors."""
  check_tensors({k: np.shape(t) for k, t in tensors.items()}, cfg, where)
  dtype = cfg.weight_dtype
  t = lambda name: np.asarray(tensors[name], np.float32).astype(dtype)
  d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  layers = {}
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    layers[f'layers_{i}'] = {
        'attn': {'query': {'kernel': t(p + 'self_attn.q_proj.weight').T.reshape(d, h, k)},
                 'key': {'kernel': t(p + 'self_attn.k_proj.weight').T.reshape(d, g, k)},
                 'value': {'kernel': t(p + 'self_attn.v_proj.weight').T.reshape(d, g, k)},
                 'out': {'kernel': t(p + 'self_attn.o_proj.weight').T.reshape(h, k, d)}},
        'mlp': {'gate': {'kernel': t(p + 'mlp.gate_proj.weight').T},
                'up': {'kernel': t(p + 'mlp.up_proj.weight').T},
                'down': {'kernel': t(p + 'mlp.down_proj.weight').T}},
        'attn_norm': {'scale': t(p + 'input_layernorm.weight')},
        'mlp_norm': {'scale': t(p + 'post_attention_layernorm.weight')}}
  params = {'embed': {'embedding': t('model.embed_tokens.weight')}, 'blocks': layers,
            'final_norm': {'scale': t('model.norm.weight')}}
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': t('lm_head.weight').T}
  return params


def hf_from_params(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF-named [out, in] float32 tensors from our parameter tree (either layer layout)."""
  check_exportable(cfg)
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  d = cfg.d_model
  out = {'model.embed_tokens.weight': a(params['embed']['embedding']),
         'model.norm.weight': a(params['final_norm']['scale'])}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = a(np.asarray(params['lm_head']['kernel']).T)
  for i, layer in enumerate(layer_list(params['blocks'], cfg)):
    p = f'model.layers.{i}.'
    attn, mlp = layer['attn'], layer['mlp']
    out.update({
        p + 'self_attn.q_proj.weight': a(np.asarray(attn['query']['kernel']).reshape(d, -1).T),
        p + 'self_attn.k_proj.weight': a(np.asarray(attn['key']['kernel']).reshape(d, -1).T),
        p + 'self_attn.v_proj.weight': a(np.asarray(attn['value']['kernel']).reshape(d, -1).T),
        p + 'self_attn.o_proj.weight': a(np.asarray(attn['out']['kernel']).reshape(-1, d).T),
        p + 'mlp.gate_proj.weight': a(np.asarray(mlp['gate']['kernel']).T),
        p + 'mlp.up_proj.weight': a(np.asarray(mlp['up']['kernel']).T),
        p + 'mlp.down_proj.weight': a(np.asarray(mlp['down']['kernel']).T),
        p + 'input_layernorm.weight': a(layer['attn_norm']['scale']),
        p + 'post_attention_layernorm.weight': a(layer['mlp_norm']['scale'])})
  return out


def layer_list(blocks: Params, cfg: ModelConfig) -> list[Params]:
  """Per-layer parameter dicts from either layout (a scan stacks them on a leading axis)."""
  if cfg.scan_layers:
    stacked = _map(np.asarray, blocks['layers']['block'])
    return [_map(lambda x: x[i], stacked) for i in range(cfg.n_layers)]
  return [blocks[f'layers_{i}'] for i in range(cfg.n_layers)]


def relayout(params: Params, cfg: ModelConfig, scan_layers: bool) -> Params:
  """`params` of `cfg` in the layer layout of scan_layers: one stack on a leading layer axis
  (nn.scan) or a dict per layer. A GGUF or Hugging Face import is per layer; a fine-tune that
  scans its layers (to rematerialise them in a bounded loop) needs them stacked."""
  if scan_layers == cfg.scan_layers:
    return params
  layers = layer_list(params['blocks'], cfg)
  rest = {k: v for k, v in params['blocks'].items() if not k.startswith('layers')}
  if scan_layers:
    stack = {'layers': {'block': _map(lambda *xs: np.stack(xs), *layers)}}
  else:
    stack = {f'layers_{i}': layer for i, layer in enumerate(layers)}
  return {**params, 'blocks': {**rest, **stack}}


def _map(fn, *trees: Params) -> Params:
  """tree_map over nested dicts without importing jax (keeps the numpy side light)."""
  first = trees[0]
  if isinstance(first, Mapping):
    return {k: _map(fn, *(t[k] for t in trees)) for k in first}
  return fn(*trees)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of every *.safetensors file in `folder`, as float32 numpy arrays."""
  from safetensors import safe_open
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise UserError(f'{folder} has no *.safetensors file; pass a folder saved with '
                    'save_pretrained(safe_serialization=True)')
  tensors = {}
  for path in files:
    try:
      with safe_open(path, framework='flax') as f:  # 'flax' reads bfloat16, numpy cannot
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name), np.float32)
    except Exception as e:  # safetensors raises its own error types for corrupt files
      raise UserError(f'{path} is not a readable safetensors file ({e}); re-save it') from None
  return tensors


def load_hf_llama(folder: str) -> tuple[ModelConfig, Params]:
  """Config and parameters of a LlamaForCausalLM folder (config.json + *.safetensors)."""
  config = read_json(os.path.join(folder, 'config.json'), NOT_HF)
  cfg = llama_config(config, folder)
  return cfg, params_from_hf(read_safetensors(folder), cfg, folder)


def export_hf_llama(params: Params, cfg: ModelConfig, folder: str,
                    tokenizer: 'TextTokenizer | None' = None) -> None:
  """Write config.json + model.safetensors that transformers opens as a LlamaForCausalLM, and the
  files AutoTokenizer opens for `tokenizer` (an imported GGUF or Hugging Face tokenizer)."""
  from safetensors.numpy import save_file
  config = hf_llama_config(cfg)
  tensors = hf_from_params(params, cfg)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={'format': 'pt'})
  if tokenizer is not None:
    tokenizer.save_hf(folder)
