"""Tokenizers: lossless round trips on hostile Unicode, specials, save/load, spec errors."""
import json
import os
import time

import numpy as np
import pytest

from data.tokenizer import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer,
                            load_tokenizer)
from model.errors import UserError

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data', 'tinyshakespeare.txt')
POOLS = [
    'abcdefghijklmnopqrstuvwxyz', 'ABCXYZ', '0123456789', ' ', '  ', '\t', '\n', '\n\n', '\r\n',
    '😀🎉👍🏽', '中文字符漢字', 'éü', 'e\u0301a\u0308', '\u200b\u200d', '\u3000', '▁', '\x00\x7f',
    'ﬁ①Ⅻ', '𝔘𝔫𝔦', 'عربى', '.,;:!?\'"',
]


def random_texts(n: int, seed: int = 0) -> list[str]:
  """Strings mixing the pools above: whitespace runs, emoji, CJK, combining marks, U+2581, controls."""
  rng = np.random.default_rng(seed)
  texts = []
  for _ in range(n):
    parts = [POOLS[i] for i in rng.integers(0, len(POOLS), rng.integers(1, 30))]
    texts.append(''.join(''.join(rng.permutation(list(p))) for p in parts))
  return texts + [' leading', 'trailing  ', '\nstarts with newline', '', ' ', '\n', '▁▁ ▁']


@pytest.fixture(scope='module')
def shakespeare() -> str:
  with open(SHAKESPEARE, encoding='utf-8') as f:
    return f.read()


@pytest.fixture(scope='module', params=['spm_bpe:600', 'spm_unigram:600'])
def spm_tokenizer(request, shakespeare):
  return build_tokenizer(request.param, [shakespeare[:100_000]])


def test_byte_round_trip():
  tok = ByteTokenizer()
  for text in random_texts(200):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_char_round_trip_and_unknown_characters():
  texts = random_texts(200)
  tok = CharTokenizer.from_texts(texts)
  assert tok.vocab_size == 4 + len(set(''.join(texts)))
  for text in texts:
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.unk_id not in ids
    assert tok.decode(ids) == text
  ids = tok.encode('a\u2603b')  # the snowman is not in the vocabulary
  assert ids[1] == tok.unk_id and tok.decode(ids) == 'a\ufffdb'


def test_char_vocabulary_is_sorted_and_deterministic():
  a = CharTokenizer.from_texts(['hello', 'world'])
  b = CharTokenizer.from_texts(['dlrow', 'olleh'])
  assert a.chars == b.chars == 'dehlorw'
  assert a.encode('hello') == b.encode('hello') == [6, 5, 7, 7, 8]  # d=4 e=5 h=6 l=7 o=8


def test_sentencepiece_round_trip(spm_tokenizer, shakespeare):
  tok = spm_tokenizer
  assert isinstance(tok, SentencePieceTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (600, 0, 2, 3)
  for text in random_texts(300, seed=1) + [shakespeare[200_000:205_000]]:
    ids = tok.encode(text)
    assert all(3 < i < tok.vocab_size for i in ids)  # no specials, no unk
    assert tok.decode(ids) == text, repr(text)
  sample = shakespeare[300_000:310_000]
  assert len(tok.encode(sample)) < 0.6 * len(sample)  # it learned merges, not just bytes


def test_decode_drops_specials():
  for tok in [ByteTokenizer(), CharTokenizer.from_texts(['hello world'])]:
    ids = [tok.bos_id, *tok.encode('hello world'), tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == 'hello world'


def test_sentencepiece_decode_drops_specials(spm_tokenizer):
  tok = spm_tokenizer
  assert tok.decode([tok.bos_id, *tok.encode('To be\n'), tok.eos_id, tok.pad_id]) == 'To be\n'


def test_sentencepiece_training_is_deterministic(shakespeare):
  a = build_tokenizer('spm_bpe:400', [shakespeare[:20_000]])
  b = build_tokenizer('spm_bpe:400', [shakespeare[:20_000]])
  assert a.model_proto == b.model_proto


@pytest.mark.parametrize('make', [ByteTokenizer, lambda: CharTokenizer.from_texts(random_texts(20))])
def test_save_load(tmp_path, make):
  tok = make()
  tok.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert type(loaded) is type(tok) and loaded.spec == tok.spec
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
  for text in random_texts(20):
    assert loaded.encode(text) == tok.encode(text)


def test_sentencepiece_save_load_and_spm_spec(tmp_path, spm_tokenizer):
  spm_tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.spec == spm_tokenizer.spec and loaded.model_proto == spm_tokenizer.model_proto
  from_file = build_tokenizer(f'spm:{tmp_path}/spm.model', [])
  for text in random_texts(30, seed=2):
    assert loaded.encode(text) == from_file.encode(text) == spm_tokenizer.encode(text)


def test_char_tokenizes_shakespeare_fast(shakespeare):
  start = time.perf_counter()
  tok = build_tokenizer('char', [shakespeare])
  ids = tok.encode_array(shakespeare)
  elapsed = time.perf_counter() - start
  assert len(ids) == len(shakespeare) and tok.vocab_size == 4 + 65
  assert elapsed < 1.0, f'{elapsed:.2f}s'


@pytest.mark.parametrize('spec', ['bpe:100', 'spm_bpe:', 'spm_bpe:0', 'spm_unigram:x', 'chars', 'spm:'])
def test_bad_spec(spec):
  with pytest.raises(UserError, match='byte | char | spm:PATH.model'):
    build_tokenizer(spec, ['abc'])


def test_spm_errors(tmp_path, shakespeare):
  with pytest.raises(UserError, match='cannot read'):
    build_tokenizer(f'spm:{tmp_path}/missing.model', [])
  with pytest.raises(UserError, match='Vocabulary size is smaller'):
    build_tokenizer('spm_bpe:100', [shakespeare[:10_000]])


def test_corrupt_tokenizer_dir(tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(UserError, match='unreadable'):
    load_tokenizer(str(tmp_path))
  (tmp_path / 'tokenizer.json').write_text(json.dumps({'kind': 'sentencepiece', 'spec': 'spm_bpe:8', 'model_file': 'spm.model'}))
  with pytest.raises(UserError, match='unreadable'):
    load_tokenizer(str(tmp_path))
  (tmp_path / 'spm.model').write_bytes(b'garbage')
  with pytest.raises(UserError, match='unreadable'):
    load_tokenizer(str(tmp_path))
  with pytest.raises(UserError, match='unreadable'):
    load_tokenizer(str(tmp_path / 'nowhere'))


def test_both_tokenizer_families_implement_the_whole_interface():
  """Callers read model/tokenizer.Tokenizer's members and never probe for them, so every family
  (a run's own, an imported model's) has them all; a run's tokenizer has no chat template."""
  from model.tokenizer import Tokenizer
  from tests.data.test_formats import char_text_tokenizer
  members = [*Tokenizer.__annotations__, *(n for n, v in vars(Tokenizer).items() if callable(v) and n[0] != '_')]
  assert {'add_bos', 'stop_ids', 'encode_array', 'encode_framed', 'apply_chat_template'} <= set(members)
  for tok in (ByteTokenizer(), CharTokenizer('ab'), char_text_tokenizer()):
    assert [m for m in members if not hasattr(tok, m)] == [], type(tok).__name__
  byte = ByteTokenizer()
  assert byte.stop_ids == (byte.eos_id,) and byte.add_bos and byte.chat_template is None
  assert byte.encode_framed('hi') == [byte.bos_id, *byte.encode('hi'), byte.eos_id]
  with pytest.raises(UserError, match='no chat template'):
    byte.apply_chat_template([{'role': 'user', 'content': 'hi'}])
  text = char_text_tokenizer()
  assert text.encode_array('ab').dtype == np.int32 and text.encode_array('ab').tolist() == text.encode('ab')
