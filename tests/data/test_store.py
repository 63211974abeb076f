"""The token store format: in-process writer, manifest and shard checks, crash safety."""
import json
import os

import numpy as np
import pytest

from data import store
from data.pipeline import tokenize_docs
from data.tokenizer import ByteTokenizer, CharTokenizer
from model.errors import UserError

DOCS = ['first document', 'a much longer second document ' * 20, 'x', 'third\nwith lines\n']


def framed(tokenizer, docs):
  """Each document framed as tokenize_docs frames it, from its one concatenated array."""
  t = tokenize_docs(tokenizer, docs)
  return [t.tokens[s:s + n + 1] for s, n in zip(t.starts, t.n_pairs)]


def test_write_store_round_trips_tokenize_docs(tmp_path):
  tok = CharTokenizer.from_texts(DOCS)
  docs = framed(tok, DOCS)
  manifest = store.write_store(str(tmp_path), tok, {'train': docs, 'eval': docs[:1]}, chunk_tokens=64,
                               num_shards={'train': 3, 'eval': 1})
  records = list(store.read_split(str(tmp_path), 'train'))
  # the long document is chunked (BOS only on the first chunk, EOS only on the last), nothing else
  assert max(map(len, records)) == 64 and len(records) > len(docs)
  np.testing.assert_array_equal(np.concatenate(records), tokenize_docs(tok, DOCS).tokens)
  entry = manifest['splits']['train']
  assert entry['documents'] == 4 and entry['records'] == len(records) and sum(entry['records_per_shard']) == len(records)
  assert entry['tokens'] == len(tokenize_docs(tok, DOCS).tokens)
  assert store.read_manifest(str(tmp_path)) == json.loads(json.dumps(manifest))
  assert store.store_tokenizer(str(tmp_path)).chars == tok.chars
  counts = [store.count_shard(p, tok.bos_id) for p in store.shard_paths(str(tmp_path), 'train')]
  assert [c['records'] for c in counts] == entry['records_per_shard']
  assert sum(c['documents'] for c in counts) == 4


def test_missing_truncated_and_foreign_files_are_one_line_errors(tmp_path):
  root = str(tmp_path)
  with pytest.raises(UserError, match='not a token store .no manifest.json.; build it with python run.py'):
    store.read_manifest(root)
  store.write_store(root, ByteTokenizer(), {'train': framed(ByteTokenizer(), DOCS), 'eval': []},
                    num_shards={'train': 2, 'eval': 1})
  first, second = store.shard_paths(root, 'train')
  with open(second, 'rb') as f:
    data = f.read()
  with open(second, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(UserError, match=f'{second} is truncated.*re-run the tokenize stage'):
    store.shard_paths(root, 'train')
  os.remove(second)
  with pytest.raises(UserError, match=f'{second} is missing.*re-run the tokenize stage on the same workdir'):
    store.shard_paths(root, 'train')
  with open(os.path.join(root, 'tokenizer', 'tokenizer.json'), 'a') as f:
    f.write(' ')
  with pytest.raises(UserError, match='hash differs'):
    store.store_tokenizer(root)
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    f.write('{"format": "lmlab-token-store/1", ')
  with pytest.raises(UserError, match='manifest.json is corrupt'):
    store.read_manifest(root)


def test_a_crashed_shard_leaves_nothing_visible(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with store.ShardWriter(str(tmp_path), 'train', 0, 1) as writer:
      writer.write(np.arange(10, dtype=np.int32), starts_document=True)
      raise KeyboardInterrupt
  assert os.listdir(tmp_path / 'train') == []
