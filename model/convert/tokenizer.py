"""Tokenizers of imported models, over the `tokenizers` library, with model/tokenizer.py's
interface; a model that ships no chat template gets ChatML.

A Hugging Face folder brings tokenizer.json. A GGUF brings only metadata (tokens, merges or scores,
token types, the pre-tokenizer's name), from which the same tokenizer is rebuilt the way
transformers and llama.cpp do: byte-level BPE for 'gpt2' vocabularies, SentencePiece-style BPE with
byte fallback for 'llama' ones. Control tokens (<|im_start|>, ...) stay whole in encoded text.
"""
import functools
import json
import os
from typing import Any, Sequence

import numpy as np

from model.errors import UserError
from model.jsonio import read_json

# ChatML, used when a model ships no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Pre-tokenizer split patterns by llama.cpp's `tokenizer.ggml.pre` name (as transformers maps them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {'llama-bpe': _LLAMA3_SPLIT, 'llama3': _LLAMA3_SPLIT, 'llama-v3': _LLAMA3_SPLIT,
           'smaug-bpe': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class TextTokenizer:
  """Text <-> ids for an imported model (model/tokenizer.Tokenizer). `encode` adds no BOS/EOS but
  keeps special tokens written in the text (as a chat template writes them) whole; `decode` drops
  special tokens."""

  def __init__(self, tokenizer: Any, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None, add_bos: bool, stop_ids: Sequence[int] = (),
               chat_template: str | None = None):
    self._tok = tokenizer
    tokenizer.no_padding()  # a tokenizer.json may pad or cut every text to a fixed length
    tokenizer.no_truncation()
    self.add_bos = add_bos  # plain-text prompts start with BOS (chat templates write their own)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.stop_ids = tuple(dict.fromkeys(i for i in (eos_id, *stop_ids) if i is not None))
    self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.array(self.encode(text), np.int32)

  def encode_framed(self, text: str) -> list[int]:
    """Ids inside the tokenizer's own special tokens ([CLS] ... [SEP] for BERT), as encoders
    were trained."""
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token(self, token_id: int | None) -> str:
    return '' if token_id is None else (self._tok.id_to_token(token_id) or '')

  def save_hf(self, folder: str) -> None:
    """tokenizer.json and tokenizer_config.json, which transformers' AutoTokenizer opens as this
    tokenizer (same ids, special tokens and chat template)."""
    self._tok.save(os.path.join(folder, 'tokenizer.json'))
    names = {f'{k}_token': self.token(i) for k, i in (('bos', self.bos_id), ('eos', self.eos_id),
                                                       ('pad', self.pad_id)) if i is not None}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': self.add_bos,
              'chat_template': self.chat_template, 'clean_up_tokenization_spaces': False, **names}
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation as the model was trained to read it (jinja2, as transformers renders it)."""
    from jinja2 import TemplateError
    try:
      return _compiled_template(self.chat_template).render(
          messages=list(messages), add_generation_prompt=add_generation_prompt,
          bos_token=self.token(self.bos_id), eos_token=self.token(self.eos_id))
    except TemplateError as e:
      raise UserError(f'the chat template cannot render these messages ({e}); check the roles '
                      'and their order') from None


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str) -> Any:
  """The jinja2 template, compiled once: SFT renders every example several times (~1 ms a compile)."""
  from jinja2 import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message: str) -> None:
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=['jinja2.ext.loopcontrols'])
  env.globals['raise_exception'] = raise_exception
  return env.from_string(source)


def folder_tokenizer(folder: str) -> TextTokenizer | None:
  """The tokenizer of a Hugging Face folder (tokenizer.json), or None when it has none."""
  from tokenizers import Tokenizer
  path = os.path.join(folder, 'tokenizer.json')
  if not os.path.exists(path):
    return None
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for malformed files
    raise UserError(f'{path} is not a readable tokenizer.json ({e}); re-save the tokenizer'
                    ) from None
  tok_cfg = _json_or_empty(os.path.join(folder, 'tokenizer_config.json'))
  model_cfg = _json_or_empty(os.path.join(folder, 'config.json'))
  gen_cfg = _json_or_empty(os.path.join(folder, 'generation_config.json'))

  def special(name: str) -> int | None:
    token = tok_cfg.get(f'{name}_token')
    token = token.get('content') if isinstance(token, dict) else token
    found = tok.token_to_id(token) if token else None
    return found if found is not None else _first(model_cfg.get(f'{name}_token_id'))

  stops = gen_cfg.get('eos_token_id', [])
  bos = special('bos')
  add_bos = tok_cfg.get('add_bos_token', bos is not None and tok.encode('a').ids[:1] == [bos])
  return TextTokenizer(tok, bos_id=bos, eos_id=special('eos'), pad_id=special('pad'),
                       add_bos=bool(add_bos),
                       stop_ids=stops if isinstance(stops, list) else [stops],
                       chat_template=_folder_template(folder, tok_cfg))


def gguf_tokenizer(meta: dict[str, Any], where: str) -> TextTokenizer | None:
  """The tokenizer a GGUF describes in its tokenizer.ggml.* metadata (None if it has none)."""
  kind = meta.get('tokenizer.ggml.model')
  tokens = meta.get('tokenizer.ggml.tokens')
  if kind is None:
    return None
  if kind not in ('gpt2', 'llama') or not tokens:
    raise UserError(f'{where}: GGUF tokenizer model {kind!r} is not supported; only gpt2 '
                    '(byte-level BPE) and llama (SentencePiece) vocabularies are')
  types = meta.get('tokenizer.ggml.token_type') or [1] * len(tokens)
  tok = _byte_level_bpe(meta, tokens) if kind == 'gpt2' else _sentencepiece_bpe(meta, tokens)
  _add_special_tokens(tok, tokens, types)
  get = lambda key, default=None: meta.get(f'tokenizer.ggml.{key}', default)
  stops = [get('eot_token_id'), get('eom_token_id')]
  return TextTokenizer(tok, bos_id=get('bos_token_id'), eos_id=get('eos_token_id'),
                       pad_id=get('padding_token_id'),
                       add_bos=bool(get('add_bos_token', kind == 'llama')),
                       stop_ids=[s for s in stops if s is not None],
                       chat_template=meta.get('tokenizer.chat_template'))


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Any:
  """GPT-2 style: BPE over the byte-to-unicode alphabet, split by the named pre-tokenizer."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  merges = [tuple(m.split(' ', 1)) for m in meta.get('tokenizer.ggml.merges', [])]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  pre = meta.get('tokenizer.ggml.pre', 'default')
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre == 'smollm':  # GPT-2's split, digits one by one (SmolLM's tokenizer.json)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:  # 'default', 'gpt-2' and names we do not know: GPT-2's split, as transformers falls back
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str]) -> Any:
  """SentencePiece BPE (llama, mistral): '▁' marks spaces, <0xNN> pieces spell unknown bytes.
  A GGUF stores scores, not merges; merges are recovered by pairing pieces, best score first."""
  from tokenizers import Tokenizer, decoders, models, normalizers
  vocab = {t: i for i, t in enumerate(tokens)}
  scores = meta.get('tokenizer.ggml.scores') or [-float(i) for i in range(len(tokens))]
  merges = []
  for token, score in zip(tokens, scores):
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        merges.append((score, vocab[left], vocab[right], left, right))
  merges.sort(key=lambda m: (-m[0], m[1], m[2]))
  unk = meta.get('tokenizer.ggml.unknown_token_id', 0)
  tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=tokens[unk],
                             fuse_unk=True, byte_fallback=True))
  prefix = meta.get('tokenizer.ggml.add_space_prefix', True)
  steps = [normalizers.Prepend('\u2581')] if prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(' ', '\u2581')])
  strip = [decoders.Strip(' ', 1, 0)] if prefix else []
  tok.decoder = decoders.Sequence(
      [decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()] + strip)
  return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
  """Control tokens become special (kept whole, dropped by decode); user-defined ones stay whole."""
  from tokenizers import AddedToken
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == _USER_DEFINED])


def _folder_template(folder: str, tok_cfg: dict[str, Any]) -> str | None:
  """chat_template.jinja (transformers 5) or tokenizer_config.json's chat_template (4)."""
  path = os.path.join(folder, 'chat_template.jinja')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  template = tok_cfg.get('chat_template')
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
    named = {t.get('name'): t.get('template') for t in template}
    template = named.get('default')
  return template


def _first(value: Any) -> int | None:
  """An id from a config field that may hold one id or a list of them."""
  if isinstance(value, list):
    return value[0] if value else None
  return value if isinstance(value, int) else None


def _json_or_empty(path: str) -> dict[str, Any]:
  return read_json(path, 'fix or delete it') if os.path.exists(path) else {}
