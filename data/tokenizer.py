"""Tokenizers a run builds (bytes, characters, SentencePiece), with model/tokenizer.py's interface,
saved with the run.

Every tokenizer is lossless: `decode(encode(s)) == s` for any valid Unicode string. `encode` adds no
special tokens (the pipeline adds BOS/EOS); `decode` drops pad/bos/eos. A run saves its tokenizer
(`tokenizer.json`, plus `spm.model` for SentencePiece) so a resumed run reuses the identical one.
"""
from __future__ import annotations

import abc
import io
import json
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from model.errors import UserError
from model.tokenizer import Tokenizer

TOKENIZER_FILE = 'tokenizer.json'
SPM_FILE = 'spm.model'
SPECS = "byte | char | spm:PATH.model | spm_bpe:VOCAB | spm_unigram:VOCAB"
SPM_META = '\u2581'         # SentencePiece's whitespace marker; a literal one in text needs escaping
SPM_MAX_LINE = 2048         # characters per training sentence (longer lines are cut)
SPM_MAX_SENTENCES = 100_000  # sentences sampled for training: ~1 MB trains in seconds


def document_frame(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(bos, eos) ids a document is framed with: BOS only if the tokenizer adds one (an imported
  model's may not: SmolLM2 does not), EOS if it has one."""
  add_bos = tokenizer.add_bos and tokenizer.bos_id is not None
  bos = np.array([tokenizer.bos_id] if add_bos else [], np.int32)
  eos = np.array([] if tokenizer.eos_id is None else [tokenizer.eos_id], np.int32)
  return bos, eos


class SavedTokenizer(abc.ABC):
  """Text <-> token ids (model/tokenizer.Tokenizer) with no chat template: every document is
  [BOS] + text + [EOS] and a reply ends at EOS. `spec` is the `data.tokenizer` string that built it
  (checked on resume)."""

  spec: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  add_bos = True
  chat_template = None

  @abc.abstractmethod
  def encode_array(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32, no specials: the vectorised path the pipeline uses."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; pad/bos/eos are dropped, unknown ids become a replacement mark."""

  @abc.abstractmethod
  def _fields(self) -> dict:
    """JSON fields that, with `kind` and `spec`, rebuild this tokenizer."""

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no specials added."""
    return self.encode_array(text).tolist()

  def encode_framed(self, text: str) -> list[int]:
    """[BOS] + ids + [EOS]: one sentence as this project's encoders are pretrained."""
    return [self.bos_id, *self.encode(text), self.eos_id]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,)

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    raise UserError(f"data.tokenizer {self.spec!r} has no chat template; use sft.template='default'")

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` (and any model file) into `directory`, atomically per file."""
    os.makedirs(directory, exist_ok=True)
    fields = {'kind': self.kind, 'spec': self.spec, **self._fields()}
    _write_atomic(os.path.join(directory, TOKENIZER_FILE), json.dumps(fields, indent=1).encode())

  @property
  def kind(self) -> str:
    return type(self).__name__.removesuffix('Tokenizer').lower()


class ByteTokenizer(SavedTokenizer):
  """UTF-8 bytes: ids 0..255 are bytes, then pad=256, bos=257, eos=258. Needs no training."""

  spec = 'byte'
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 259

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    ids = ids[(ids != self.pad_id) & (ids != self.bos_id) & (ids != self.eos_id)]
    raw = np.where((ids >= 0) & (ids < 256), ids, 0xFF)  # 0xFF is never UTF-8: decodes to U+FFFD
    return raw.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def _fields(self) -> dict:
    return {}


class CharTokenizer(SavedTokenizer):
  """One id per Unicode code point of the training corpus (sorted): pad=0, bos=1, eos=2, unk=3, chars 4...

  A character absent from the training corpus encodes to `unk_id` and decodes to U+FFFD, so the
  round trip is exact only for text over the training alphabet.
  """

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
  n_special = 4

  def __init__(self, chars: str):
    self.spec = 'char'
    self.chars = ''.join(sorted(set(chars)))
    self._codes = _code_points(self.chars)
    self.vocab_size = self.n_special + len(self.chars)

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
    """Vocabulary = every character of `texts`."""
    codes = [np.unique(_code_points(t)) for t in texts]
    alphabet = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.uint32)
    return cls(alphabet.astype('<u4').tobytes().decode('utf-32-le'))

  def encode_array(self, text: str) -> np.ndarray:
    codes = _code_points(text)
    index = np.minimum(np.searchsorted(self._codes, codes), max(len(self._codes) - 1, 0))
    known = self._codes[index] == codes if len(self._codes) else np.zeros(len(codes), bool)
    return np.where(known, index + self.n_special, self.unk_id).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    ids = ids[(ids < 0) | (ids > self.eos_id)]
    table = np.concatenate([np.full(self.n_special, 0xFFFD, np.uint32), self._codes])
    codes = table[np.where((ids >= 0) & (ids < self.vocab_size), ids, self.unk_id)]
    return codes.astype('<u4').tobytes().decode('utf-32-le')

  def _fields(self) -> dict:
    return {'chars': self.chars}


class SentencePieceTokenizer(SavedTokenizer):
  """A SentencePiece model. Trained ones (`train_sentencepiece`) use pad=0, unk=1, bos=2, eos=3.

  Lossless on any text for models trained here (byte fallback, identity normalisation, no dummy
  prefix, '\\n' as a piece). SentencePiece turns a literal U+2581 into a space, so for such models
  encode cuts the text at U+2581 and emits its UTF-8 bytes as byte pieces, which decode restores.
  A loaded model without a pad piece pads with unk (padding carries weight 0 anyway).
  """

  def __init__(self, model_proto: bytes, spec: str):
    self.spec = spec
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise UserError(f"sentencepiece model for data.tokenizer {spec!r} has no bos or eos piece; "
                      "train it with bos_id and eos_id set")
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
    self._meta_bytes = _meta_byte_ids(self._sp, model_proto)

  def encode_array(self, text: str) -> np.ndarray:
    if self._meta_bytes is None or SPM_META not in text:
      return np.asarray(self._sp.encode(text), np.int32)
    parts = self._sp.encode(text.split(SPM_META))
    ids = parts[0]
    for part in parts[1:]:
      ids = ids + self._meta_bytes + part
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    specials = (ids == self.pad_id) | (ids == self.bos_id) | (ids == self.eos_id)
    ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, self._sp.unk_id())[~specials]
    return self._sp.decode(ids.tolist())

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _write_atomic(os.path.join(directory, SPM_FILE), self.model_proto)
    super().save(directory)

  def _fields(self) -> dict:
    return {'model_file': SPM_FILE}


def train_sentencepiece(texts: Iterable[str], model_type: str, vocab_size: int, spec: str) -> SentencePieceTokenizer:
  """Trains a lossless bpe/unigram model on the lines of `texts` (newlines become a '\\n' piece)."""
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # sentence sampling: the same corpus gives the same model
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts), model_writer=model, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name='identity',
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, user_defined_symbols=['\n'],
        max_sentence_length=4 * SPM_MAX_LINE, input_sentence_size=SPM_MAX_SENTENCES,
        shuffle_input_sentence=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    reason = re.sub(r'^.*?\] ', '', ' '.join(str(e).split()))  # drop "INTERNAL: file.cc(638) [check]"
    raise UserError(f"training data.tokenizer {spec!r} failed ({reason}); change VOCAB or the corpus") from None
  return SentencePieceTokenizer(model.getvalue(), spec)


def build_tokenizer(spec: str, train_texts: Iterable[str]) -> SavedTokenizer:
  """The tokenizer `spec` names, trained on `train_texts` where it needs training."""
  if spec == 'byte':
    return ByteTokenizer()
  if spec == 'char':
    return CharTokenizer.from_texts(train_texts)
  kind, _, arg = spec.partition(':')
  if kind == 'spm' and arg:
    return SentencePieceTokenizer(_read_model_file(arg, spec), spec)
  if kind in ('spm_bpe', 'spm_unigram') and re.fullmatch(r'[1-9]\d*', arg):
    return train_sentencepiece(train_texts, kind.removeprefix('spm_'), int(arg), spec)
  raise UserError(f"data.tokenizer {spec!r} is not valid; use one of {SPECS}")


def load_tokenizer(directory: str) -> SavedTokenizer:
  """The tokenizer `save` wrote into `directory`."""
  path = os.path.join(directory, TOKENIZER_FILE)
  fix = f"delete {directory} to rebuild the tokenizer, or restore its files"
  try:
    with open(path, encoding='utf-8') as f:
      fields = json.load(f)
    kind, spec = fields['kind'], fields['spec']
    if kind == 'byte':
      return ByteTokenizer()
    if kind == 'char':
      return CharTokenizer(fields['chars'])
    if kind == 'sentencepiece':
      with open(os.path.join(directory, fields['model_file']), 'rb') as f:
        return SentencePieceTokenizer(f.read(), spec)
    raise ValueError(f"unknown kind {kind!r}")
  except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
    reason = ' '.join(str(e).split())
    raise UserError(f"tokenizer in {directory} is unreadable ({reason}); {fix}") from None


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
  """Non-empty lines of `texts`, cut to SPM_MAX_LINE characters (SentencePiece skips longer ones)."""
  for text in texts:
    for line in text.split('\n'):
      for start in range(0, len(line), SPM_MAX_LINE):
        yield line[start:start + SPM_MAX_LINE]


def _meta_byte_ids(sp: spm.SentencePieceProcessor, model_proto: bytes) -> list[int] | None:
  """Byte-piece ids spelling U+2581, for models where escaping it keeps encode lossless; else None."""
  proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  if not proto.trainer_spec.byte_fallback or proto.normalizer_spec.add_dummy_prefix:
    return None
  return [sp.piece_to_id(f'<0x{b:02X}>') for b in SPM_META.encode('utf-8')]


def _read_model_file(path: str, spec: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    raise UserError(f"data.tokenizer {spec!r}: cannot read {path}; check the path to the .model file") from None


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-32-le'), '<u4')


def _write_atomic(path: str, data: bytes) -> None:
  """Write then rename, so a crash never leaves a half-written tokenizer behind."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
