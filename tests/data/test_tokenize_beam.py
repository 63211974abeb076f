"""The tokenize stage: Beam's store == the in-process writer == today's tokenize_docs, token for token;
re-runs keep finished shards; a crash leaves no visible shard; bad input is one line, nothing written."""
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from data import blocks, sources, store
from data.pipeline import tokenize_docs
from data.tokenize_beam import build_store, plan_units, write_unit
from data.tokenizer import build_tokenizer, load_tokenizer
from experiments import base
from model.errors import UserError

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data', 'tinyshakespeare.txt')


def corpus(folder, n_files=2, chars=30_000):
  """Text files of Shakespeare, one with non-ASCII text (the char alphabet and UTF-8 blocks)."""
  with open(SHAKESPEARE, encoding='utf-8') as f:
    text = f.read()
  os.makedirs(folder, exist_ok=True)
  for i in range(n_files):
    body = text[i * chars:(i + 1) * chars] + ('naïve café — ünïcödé\n' * 50 if i == 0 else '')
    with open(os.path.join(folder, f'part{i}.txt'), 'w', encoding='utf-8') as f:
      f.write(body)
  return os.path.join(folder, '*.txt')


def data_cfg(source, tokenizer='char', **store_fields):
  d = base.get_config().data
  d.source, d.tokenizer = source, tokenizer
  d.store.workers = 2
  d.store.update(dict(block_mb=0.004, shard_mb=0.012, chunk_tokens=1000) | store_fields)
  return d


def split_tokens(root, split):
  return np.concatenate(list(store.read_split(root, split)))


def framed(tokenizer, docs):
  t = tokenize_docs(tokenizer, docs)
  return [t.tokens[s:s + n + 1] for s, n in zip(t.starts, t.n_pairs)]


def test_beam_store_matches_write_store_and_tokenize_docs_then_reruns_keep_shards(tmp_path):
  pattern = corpus(str(tmp_path / 'text'))
  cfg, root = data_cfg(f'text:{pattern}'), str(tmp_path / 'store')
  manifest = build_store(cfg, root)
  today = sources.text_source(pattern, cfg.eval_fraction)
  tok = build_tokenizer('char', today.train_docs)
  assert load_tokenizer(os.path.join(root, 'tokenizer')).chars == tok.chars
  reference = str(tmp_path / 'reference')
  ref = store.write_store(reference, tok, {'train': framed(tok, today.train_docs), 'eval': framed(tok, today.eval_docs)},
                          chunk_tokens=cfg.store.chunk_tokens)
  for split, docs in (('train', today.train_docs), ('eval', today.eval_docs)):
    np.testing.assert_array_equal(split_tokens(root, split), tokenize_docs(tok, docs).tokens)
    np.testing.assert_array_equal(split_tokens(root, split), split_tokens(reference, split))
    for key in ('documents', 'tokens'):
      assert manifest['splits'][split][key] == ref['splits'][split][key]
    assert manifest['splits'][split]['bytes'] == sum(len(d.encode('utf-8')) for d in docs)  # for bits/byte
  # documents span shards (blocks of 4 KB, shards of 12 KB): records never exceed chunk_tokens
  assert len(manifest['splits']['train']['shards']) > 2
  assert max(map(len, store.read_split(root, 'train'))) <= cfg.store.chunk_tokens
  assert [s['sha256'] for s in manifest['sources']] == [store_sha(p) for p in sorted(glob_files(pattern))]

  # a crash between shards and manifest: lose one shard and the manifest, re-run, the others are kept
  paths = store.shard_paths(root, 'train')
  mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
  os.remove(paths[1])
  os.remove(os.path.join(root, 'manifest.json'))
  with open(os.path.join(root, 'train', '.shard-00001-junk.tmp-dead'), 'wb') as f:
    f.write(b'half a shard')  # what a killed worker leaves: hidden, never read
  cfg.store.beam_options = '--direct_running_mode=in_memory'  # how the job runs is not part of the store
  again = build_store(cfg, root)
  assert {k: v for k, v in again.items() if k != 'versions'} == {k: v for k, v in manifest.items() if k != 'versions'}
  for p in paths:
    assert (os.stat(p).st_mtime_ns == mtimes[p]) == (p != paths[1])
  np.testing.assert_array_equal(split_tokens(root, 'train'), tokenize_docs(tok, today.train_docs).tokens)
  assert build_store(cfg, root) == again  # complete: nothing to do, no Beam job

  with pytest.raises(UserError, match="holds a token store of tokenizer 'char', not 'byte'; use another --workdir"):
    build_store(data_cfg(f'text:{pattern}', 'byte'), root)
  with pytest.raises(UserError, match=r'built with other data settings \(eval_fraction\)'):
    build_store(set_field(data_cfg(f'text:{pattern}'), 'eval_fraction', 0.2), root)
  os.remove(os.path.join(root, 'manifest.json'))  # unfinished again, and a source file changes
  with open(glob_files(pattern)[0], 'a', encoding='utf-8') as f:
    f.write('one more line\n')
  with pytest.raises(UserError, match='the source files changed since the unfinished build'):
    build_store(cfg, root)


def glob_files(pattern):
  return sources.match_files(pattern, pattern)


def store_sha(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize('spec', ['byte', 'spm_bpe:320'])
def test_block_wise_tokenization_equals_whole_documents(tmp_path, spec):
  """The worker's path without Beam: jsonl records (every k-th held out, a .gz file too) and text
  documents cut into blocks (then into 4 KB line pieces for SentencePiece) give the documents'
  tokens exactly."""
  with open(SHAKESPEARE, encoding='utf-8') as f:
    lines = f.read()[:40_000].split('\n')
  docs = ['\n'.join(lines[i:i + 7]) for i in range(0, len(lines), 7)]
  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' + ('\n' if i % 5 == 0 else '')
                                            for i, d in enumerate(docs[:60])))
  with gzip.open(tmp_path / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
    f.writelines(json.dumps({'text': d}) + '\n' for d in docs[60:])
  (tmp_path / 'c.txt').write_text('\n'.join(lines))
  tok = build_tokenizer(spec, ['\n'.join(lines)])
  for source, today in ((f'jsonl:{tmp_path}/*.jsonl*:text', sources._jsonl(f'{tmp_path}/*.jsonl*', 'text', 0.1)),
                        (f'text:{tmp_path}/c.txt', sources.text_source(f'{tmp_path}/c.txt', 0.1))):
    plan = blocks.plan_source(source, 0.1, 'strict', block_bytes=2000 if source[0] == 'j' else 15_000)
    root = str(tmp_path / source[:4])
    tok.save(os.path.join(root, 'tokenizer'))
    counts = [write_unit(root, tok, unit, 300, 'strict') for unit in plan_units(plan, 5000)]
    for split, docs_today in (('train', today.train_docs), ('eval', today.eval_docs)):
      records = [store.decode_record(r) for unit in plan_units(plan, 5000) if unit.split == split
                 for r in read_shard(root, unit)]
      np.testing.assert_array_equal(np.concatenate(records), tokenize_docs(tok, docs_today).tokens)
      assert sum(c['documents'] for c in counts if c['split'] == split) == len(docs_today)


def read_shard(root, unit):
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(os.path.join(root, store.shard_name(unit.split, unit.index, unit.count)))
  return reader.read_all()


def test_a_failing_worker_leaves_no_visible_shard(tmp_path):
  pattern = corpus(str(tmp_path / 'text'), n_files=1)
  plan = blocks.plan_source(f'text:{pattern}', 0.1, 'strict', block_bytes=4000)
  unit = plan_units(plan, 1e9)[0]

  class Failing(type(build_tokenizer('byte', []))):
    calls = 0

    def encode_array(self, text):
      Failing.calls += 1
      if Failing.calls == 3:
        raise MemoryError('worker died')
      return super().encode_array(text)

  with pytest.raises(MemoryError):
    write_unit(str(tmp_path / 'store'), Failing(), unit, 100, 'strict')
  assert os.listdir(tmp_path / 'store' / 'train') == []


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  (tmp_path / 'empty.txt').write_text('\n\n')
  root = str(tmp_path / 'store')
  with pytest.raises(UserError, match="has only empty files; point it at a non-empty corpus"):
    build_store(data_cfg(f'text:{tmp_path}/empty.txt'), root)
  (tmp_path / 'latin1.txt').write_bytes('ok\ncaf\xe9 au lait\n'.encode('latin-1'))
  with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(byte 6\).*data.decode_errors=replace"):
    build_store(data_cfg(f'text:{tmp_path}/latin1.txt'), root)
  with pytest.raises(UserError, match="data.decode_errors='maybe' is not valid"):
    build_store(set_field(data_cfg(f'text:{tmp_path}/latin1.txt'), 'decode_errors', 'maybe'), root)
  with pytest.raises(UserError, match="matched no files"):
    build_store(data_cfg(f'text:{tmp_path}/nothing*.txt'), root)
  assert not os.path.exists(root)  # every error came before anything was written
  for errors, expected in (('replace', 'ok\ncaf\ufffd au lait\n'), ('ignore', 'ok\ncaf au lait\n')):
    plan = blocks.plan_source(f'text:{tmp_path}/latin1.txt', 0.5, errors, 1 << 20)
    parts = [t for split in ('train', 'eval') for b in plan.blocks[split] for t, _, _ in blocks.read_block(b, errors)]
    assert ''.join(parts) == expected


def set_field(cfg, key, value):
  cfg[key] = value
  return cfg


@pytest.mark.slow
def test_a_worker_error_comes_back_as_one_line(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "fine"}\n' * 30 + '{"text": 3}\n')
  with pytest.raises(UserError, match=r"a.jsonl \(line 31 of the block at byte 0\) has no string field 'text'"):
    build_store(data_cfg(f'jsonl:{tmp_path}/a.jsonl:text', 'byte', block_mb=1, workers=1,
                         beam_options='--direct_running_mode=in_memory'), str(tmp_path / 'store'))
  assert not os.path.exists(tmp_path / 'store' / 'manifest.json')
