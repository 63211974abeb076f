"""GGUF import: quantized llama files against transformers' own GGUF loader, the Q/K permutation,
tokenizers rebuilt from metadata, and one-line errors for files we cannot read."""
import io

import numpy as np
import pytest

from model import load_pretrained
from model.convert.gguf import unpermute
from model.convert.tokenizer import gguf_tokenizer
from model.errors import UserError
from tests.convert.files import hf_logits, llama_cpp_permute, random_hf_llama, write_llama_gguf

MIXED = {'token_embd': 'Q8_0', 'output.': 'Q8_0', 'attn_q': 'F16', 'attn_k': 'Q4_0',
         'attn_v': 'Q4_1', 'ffn_down': 'Q4_0', 'ffn_up': 'Q4_1'}


@pytest.mark.parametrize('tie', [True, False])
def test_quantized_gguf_matches_transformers(tmp_path, tie):
  import torch
  from transformers import AutoModelForCausalLM
  write_llama_gguf(str(tmp_path / 'm.gguf'), random_hf_llama(tie), MIXED)
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file='m.gguf', dtype=torch.float32)
  lm = load_pretrained(str(tmp_path / 'm.gguf'))
  assert lm.config.tie_embeddings == tie and lm.config.rope_theta == 5000.0
  tokens = np.random.default_rng(0).integers(0, 96, (2, 24))
  assert np.abs(lm.logits(tokens) - hf_logits(ref, tokens)).max() <= 1e-4


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(unpermute(llama_cpp_permute(w, 3), 3), w)


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
  write_llama_gguf(str(tmp_path / 'm.gguf'), random_hf_llama(True), arch='gpt2')
  with pytest.raises(UserError, match="architecture 'gpt2' is not supported") as e:
    load_pretrained(str(tmp_path / 'm.gguf'))
  assert '\n' not in str(e.value)


def test_unsupported_quantization_is_a_one_line_error(tmp_path):
  write_llama_gguf(str(tmp_path / 'm.gguf'), random_hf_llama(True), {'ffn_up': 'Q5_0'})
  with pytest.raises(UserError, match='blk.0.ffn_up.weight has type Q5_0') as e:
    load_pretrained(str(tmp_path / 'm.gguf'))
  assert '\n' not in str(e.value)


def test_sentencepiece_vocabulary_rebuilt_from_metadata_encodes_like_sentencepiece():
  """A 'llama' GGUF tokenizer (pieces + scores, no merges) must split text as SentencePiece does."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2
  text = ('the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. ' * 40
          + 'numbers 12 345 and symbols ! ? are here too.\n')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split('. ')), model_writer=model,
                                 model_type='bpe', vocab_size=400, byte_fallback=True,
                                 minloglevel=2, bos_id=1, eos_id=2, unk_id=0)
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  kinds = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}  # sentencepiece and llama.cpp share type numbers
  meta = {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': [p.piece for p in proto.pieces],
          'tokenizer.ggml.scores': [p.score for p in proto.pieces],
          'tokenizer.ggml.token_type': [kinds[p.type] for p in proto.pieces],
          'tokenizer.ggml.bos_token_id': 1, 'tokenizer.ggml.eos_token_id': 2,
          'tokenizer.ggml.unknown_token_id': 0}
  ours = gguf_tokenizer(meta, 'test')
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  for s in ['the quick brown fox', 'lazy cats sleep in 2024', 'Zebra ÄÖ? tokens']:
    assert ours.encode(s) == sp.encode(s), s
    assert ours.decode(ours.encode(s)) == sp.decode(sp.encode(s))
  assert ours.add_bos and ours.bos_id == 1
