"""Pipeline: packing invariants, epoch coverage, shuffling, exact resume, host sharding, eval, errors."""
import collections
import json
import os
import time

import numpy as np
import pytest

from data.pipeline import build_dataset
from data.sources import load_source
from experiments.base import get_config
from model.errors import UserError

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data')
KEYS = ['inputs', 'positions', 'segment_ids', 'targets', 'weights']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  """A jsonl corpus: 300 random documents of 0..150 characters and 3 of 300..900 (longer than a row)."""
  rng = np.random.default_rng(0)
  alphabet = np.array(list('abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .\n'))
  lengths = [*rng.integers(0, 150, 300), 300, 650, 900]
  path = tmp_path_factory.mktemp('corpus') / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': ''.join(rng.choice(alphabet, n))}) + '\n' for n in lengths))
  return f'jsonl:{path}:text'


def data_cfg(source: str, tokenizer: str = 'char'):
  cfg = get_config().data
  cfg.source, cfg.tokenizer = source, tokenizer
  return cfg


def documents(source: str, tok, split: str) -> list[np.ndarray]:
  """Every document of a split as [BOS] + tokens + [EOS], re-tokenized independently of the pipeline."""
  loaded = load_source(data_cfg(source))
  docs = loaded.train_docs if split == 'train' else loaded.eval_docs
  return [np.array([tok.bos_id, *tok.encode(d), tok.eos_id]) for d in docs]


def as_text(ids) -> str:
  return ''.join(chr(0x100 + int(i)) for i in ids)


def segments(batch):
  """(row, segment id, mask) of every document piece in a batch."""
  for r, seg in enumerate(batch['segment_ids']):
    for k in np.unique(seg[seg > 0]):
      yield r, k, seg == k


def check_packing(batch, docs: list[np.ndarray], pad_id: int) -> None:
  """Every piece is a contiguous run of one document's pairs; positions restart; padding is inert."""
  haystack = '\x10'.join(as_text(d) for d in docs)  # \x10 never occurs in as_text output
  seg = batch['segment_ids']
  np.testing.assert_array_equal(batch['weights'], (seg > 0).astype(np.float32))
  for row in seg:
    n = (row > 0).sum()
    assert (row[n:] == 0).all(), 'padding only at the end of a row'
    assert n == 0 or (row[0] == 1 and set(np.diff(row[:n])) <= {0, 1}), 'segment ids 1, 2, 3... in order'
  pad = seg == 0
  assert (batch['inputs'][pad] == pad_id).all() and (batch['targets'][pad] == pad_id).all()
  assert (batch['positions'][pad] == 0).all()
  for r, _, mask in segments(batch):
    inputs, targets = batch['inputs'][r][mask], batch['targets'][r][mask]
    np.testing.assert_array_equal(batch['positions'][r][mask], np.arange(mask.sum()))
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    assert as_text([*inputs, targets[-1]]) in haystack, 'a piece must be a run of one document'


def pairs(batches) -> collections.Counter:
  count = collections.Counter()
  for b in batches:
    real = b['weights'] > 0
    count.update(zip(b['inputs'][real].tolist(), b['targets'][real].tolist()))
  return count


def doc_pairs(docs) -> collections.Counter:
  return collections.Counter(p for d in docs for p in zip(d[:-1].tolist(), d[1:].tolist()))


def first_epoch(ds, seq_len: int) -> list[dict]:
  """Rows (batch size 1) until the iterator's state says a new epoch began."""
  it, rows = ds.train_iter(1, seq_len), []
  while True:
    row = next(it)
    if it.get_state()['epoch'] > 0:
      return rows
    rows.append(row)


def test_batch_format_and_packing(corpus):
  ds = build_dataset(data_cfg(corpus), seed=0)
  docs = documents(corpus, ds.tokenizer, 'train')
  it = ds.train_iter(4, 32)
  for _ in range(40):
    batch = next(it)
    assert sorted(batch) == KEYS
    assert all(v.shape == (4, 32) for v in batch.values())
    assert batch['weights'].dtype == np.float32 and all(batch[k].dtype == np.int32 for k in KEYS if k != 'weights')
    check_packing(batch, docs, ds.tokenizer.pad_id)
  assert (batch['segment_ids'].max(axis=1) > 1).any(), 'short documents share rows'


def test_epoch_covers_every_pair_exactly_once(corpus):
  ds = build_dataset(data_cfg(corpus), seed=3)
  rows = first_epoch(ds, 32)
  assert pairs(rows) == doc_pairs(documents(corpus, ds.tokenizer, 'train'))
  fill = sum(r['weights'].sum() for r in rows) / (len(rows) * 32)
  assert fill > 0.9, f'first-fit packing wastes {1 - fill:.0%} of the row'
  other = first_epoch(build_dataset(data_cfg(corpus), seed=4), 32)
  assert [r['inputs'].tobytes() for r in rows[:10]] != [r['inputs'].tobytes() for r in other[:10]]


def test_one_long_document_is_read_in_shuffled_windows(tmp_path):
  with open(os.path.join(SHARED, 'tinyshakespeare.txt'), encoding='utf-8') as f:
    text = f.read()[:40_000]
  (tmp_path / 'play.txt').write_text(text)
  ds = build_dataset(data_cfg(f'text:{tmp_path}/play.txt'), seed=0)
  it = ds.train_iter(1, 64)
  starts = {0: [], 1: []}
  while it.get_state()['epoch'] < 2:
    row = next(it)
    epoch = it.get_state()['epoch']
    window = ds.tokenizer.decode(row['inputs'][0][row['weights'][0] > 0])
    if epoch < 2 and len(window) == 64 and row['inputs'][0][0] != ds.tokenizer.bos_id:
      starts[epoch].append(text.find(window))
  first = np.array(starts[0])
  assert len(first) > 400 and (first >= 0).all()
  assert abs(np.corrcoef(first, np.arange(len(first)))[0, 1]) < 0.2, 'rows must not follow file order'
  assert len(set(first % 64)) == 1 and set(first % 64) != set(np.array(starts[1]) % 64), \
      'each epoch cuts the document at a fresh offset'


@pytest.mark.parametrize('batch_size,consumed,compared', [(16, 45, 10), (3, 0, 5), (1, 17, 3)])
def test_resume_is_exact(corpus, batch_size, consumed, compared):
  ds = build_dataset(data_cfg(corpus), seed=0)
  it = ds.train_iter(batch_size, 32)
  for _ in range(consumed):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(compared)]
  resumed = build_dataset(data_cfg(corpus), seed=0).train_iter(batch_size, 32)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(compared))):
    for key in KEYS:
      np.testing.assert_array_equal(want[key], got[key])
  if batch_size == 16:
    assert it.get_state()['epoch'] >= 1, 'the compared batches should cross an epoch boundary'


def test_resume_refuses_a_state_from_another_setup(corpus):
  ds = build_dataset(data_cfg(corpus), seed=0)
  state = ds.train_iter(4, 32).get_state()
  with pytest.raises(UserError, match='seq_len=32 but this run has 16'):
    ds.train_iter(4, 16).set_state(state)
  with pytest.raises(UserError, match='seed=0 but this run has 1'):
    build_dataset(data_cfg(corpus), seed=1).train_iter(4, 32).set_state(state)


def test_host_shards_are_disjoint_and_make_up_the_global_batch(corpus):
  cfg = data_cfg(corpus)
  single = build_dataset(cfg, seed=0).train_iter(8, 32)
  hosts = [build_dataset(cfg, seed=0, process_index=p, process_count=2).train_iter(4, 32) for p in range(2)]
  for _ in range(10):
    whole = next(single)
    parts = [next(h) for h in hosts]
    rows = lambda b: [b['inputs'][i].tobytes() + b['targets'][i].tobytes() for i in range(len(b['inputs']))]
    assert not set(rows(parts[0])) & set(rows(parts[1]))
    assert sorted(rows(parts[0]) + rows(parts[1])) == sorted(rows(whole))


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_target_once(corpus, process_count):
  cfg = data_cfg(corpus)
  shards = [build_dataset(cfg, seed=0, process_index=p, process_count=process_count).eval_batches(4, 32)
            for p in range(process_count)]
  ds = build_dataset(cfg, seed=0)
  assert len({len(s) for s in shards}) == 1, 'every process runs the same number of eval batches'
  batches = [b for s in shards for b in s]
  assert sum(b['weights'].sum() for b in batches) == ds.info['eval_target_tokens']
  eval_docs = documents(corpus, ds.tokenizer, 'eval')
  assert pairs(batches) == doc_pairs(eval_docs)
  for b in batches:
    assert b['inputs'].shape == (4, 32)
    check_packing(b, eval_docs, ds.tokenizer.pad_id)
  again = ds.eval_batches(4, 32)
  assert all((a['inputs'] == b['inputs']).all() for a, b in zip(again, ds.eval_batches(4, 32)))
  assert len(ds.eval_batches(4, 32, max_batches=2)) == 2


def test_synthetic_info_and_bytes():
  cfg = data_cfg('synthetic')
  ds = build_dataset(cfg, seed=0)
  info = ds.info
  assert info['eval_target_tokens'] == 400 * 128 and info['eval_bytes'] == 400 * 127
  assert info['eval_bytes_per_token'] == pytest.approx(127 / 128)
  assert info['true_entropy_nats_per_token'] == pytest.approx(load_source(cfg).info['true_entropy_nats_per_token'])
  batch = next(ds.train_iter(8, 128))
  assert (batch['segment_ids'] == 1).all(), 'a default synthetic document fills one row exactly'
  byte_info = build_dataset(data_cfg('synthetic', 'byte'), seed=0).info
  assert byte_info['true_entropy_nats_per_token'] == pytest.approx(info['true_entropy_nats_per_token'])


def test_tokenizer_is_saved_and_reused(tmp_path, corpus):
  tok_dir = str(tmp_path / 'tokenizer')
  first = build_dataset(data_cfg(corpus, 'spm_bpe:400'), seed=0, tokenizer_dir=tok_dir)
  assert os.path.exists(os.path.join(tok_dir, 'spm.model'))
  (tmp_path / 'other.txt').write_text('a different corpus entirely ' * 200)
  resumed = build_dataset(data_cfg(f'text:{tmp_path}/other.txt', 'spm_bpe:400'), seed=0, tokenizer_dir=tok_dir)
  assert resumed.tokenizer.model_proto == first.tokenizer.model_proto
  with pytest.raises(UserError, match="holds a 'spm_bpe:400' tokenizer but data.tokenizer is 'char'"):
    build_dataset(data_cfg(corpus, 'char'), seed=0, tokenizer_dir=tok_dir)
  (tmp_path / 'tokenizer' / 'tokenizer.json').write_text('{')
  with pytest.raises(UserError, match='unreadable'):
    build_dataset(data_cfg(corpus, 'spm_bpe:400'), seed=0, tokenizer_dir=tok_dir)


def test_corpus_smaller_than_a_batch(tmp_path):
  (tmp_path / 'tiny.txt').write_text('x' * 500)
  ds = build_dataset(data_cfg(f'text:{tmp_path}/tiny.txt'), seed=0)
  with pytest.raises(UserError, match=r'train split has 451 tokens, fewer than one batch \(8×64\)'):
    ds.train_iter(8, 64)
  next(ds.train_iter(7, 64))
  with pytest.raises(UserError, match='is empty'):
    ds.eval_batches(4, 0)


def test_batches_are_cheap():
  ds = build_dataset(data_cfg(f'text:{SHARED}/tinyshakespeare.txt'), seed=0)
  it = ds.train_iter(12, 64)
  next(it)
  start = time.perf_counter()
  for _ in range(200):
    next(it)
  per_batch = (time.perf_counter() - start) / 200
  assert per_batch < 0.005, f'{per_batch * 1e3:.2f} ms per batch'
