"""Seq2seq data: synthetic tasks (targets, held-out split, determinism), JSONL pairs, T5 span
corruption (noise share, sentinels, exact reconstruction), row format and exact resume."""
import json

import numpy as np
import pytest

from data.seq2seq import build_seq2seq_dataset
from data.span_corruption import corrupt_spans, noise_mask
from experiments.base import get_config
from model.errors import UserError

WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards hex every jolly vixen'.split()


def data_config(source: str, **seq2seq):
  c = get_config().data
  c.source = source
  for k, v in seq2seq.items():
    c.seq2seq[k] = v
  return c


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def decoded(ds, ids: np.ndarray, weights: np.ndarray | None = None) -> str:
  return ds.tokenizer.decode(ids if weights is None else ids[weights > 0])


@pytest.mark.parametrize('task', ['reverse', 'sort'])
def test_synthetic_targets_and_row_format(task):
  ds = build_seq2seq_dataset(data_config(f'seq2seq:{task}'), seed=0)
  (batch,) = take(ds.train_iter(32, 40), 1)
  assert {k: v.shape for k, v in batch.items()} == {k: (32, 40) for k in batch}
  tok = ds.tokenizer
  for b in range(32):
    real = batch['encoder_segment_ids'][b] > 0
    source = batch['encoder_inputs'][b][real]
    assert source[-1] == tok.eos_id and 8 <= len(source) - 1 <= 32
    np.testing.assert_array_equal(batch['encoder_positions'][b][real], np.arange(real.sum()))
    text = tok.decode(source)
    target = decoded(ds, batch['targets'][b], batch['weights'][b])
    assert target == (text[::-1] if task == 'reverse' else ''.join(sorted(text)))
    w = batch['weights'][b] > 0
    assert batch['inputs'][b][0] == tok.bos_id and batch['targets'][b][w][-1] == tok.eos_id
    np.testing.assert_array_equal(batch['inputs'][b][1:w.sum()], batch['targets'][b][:w.sum() - 1])


def test_held_out_strings_are_never_trained_on():
  """Over a tiny space (2 letters, length 8: 256 strings), 60 held out: no training row is one."""
  ds = build_seq2seq_dataset(data_config('seq2seq:reverse', n_symbols=2, min_len=8, max_len=8,
                                         n_eval=60), seed=3)
  held = {ds.tokenizer.decode(x) for x, _ in ds.eval_examples(9)}
  assert len(held) > 40
  rows = take(ds.train_iter(50, 9), 20)
  trained = {ds.tokenizer.decode(r[r != ds.tokenizer.pad_id]) for b in rows for r in b['encoder_inputs']}
  assert trained and not trained & held
  assert len(trained | held) > 200  # the rest of the space is drawn


def test_rows_depend_on_seed_and_resume_exactly():
  cfg = data_config('seq2seq:sort')
  run = lambda seed: take(build_seq2seq_dataset(cfg, seed).train_iter(8, 33), 3)
  a, b, c = run(0), run(0), run(1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['encoder_inputs'], c[0]['encoder_inputs'])
  ds = build_seq2seq_dataset(cfg, 0)
  it = ds.train_iter(8, 33)
  take(it, 2)
  state = it.get_state()
  expected = take(it, 2)
  resumed = ds.train_iter(8, 33)
  resumed.set_state(state)
  for x, y in zip(take(resumed, 2), expected):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = build_seq2seq_dataset(cfg, 1).train_iter(8, 33)
  with pytest.raises(UserError, match='seed'):
    other.set_state(state)


def test_seq_len_must_hold_the_longest_string():
  ds = build_seq2seq_dataset(data_config('seq2seq:reverse'), seed=0)
  with pytest.raises(UserError, match='train.seq_len=32'):
    ds.train_iter(4, 32)


def test_eval_batches_cover_every_held_out_example_once():
  ds = build_seq2seq_dataset(data_config('seq2seq:reverse', n_eval=50), seed=0)
  batches = ds.eval_batches(16, 33)
  assert len(batches) == 4
  weights = np.concatenate([b['weights'] for b in batches])
  assert (weights.sum(1) > 0).sum() == 50 and (weights[50:] == 0).all()


def write_pairs(path, records):
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  return str(path)


def test_jsonl_pairs_and_missing_field(tmp_path):
  records = [{'input': f'{w} {i}', 'target': w.upper()} for i, w in enumerate(WORDS * 3)]
  pattern = write_pairs(tmp_path / 'pairs.jsonl', records)
  ds = build_seq2seq_dataset(data_config(f'seq2seq_jsonl:{pattern}'), seed=0)
  assert ds.info['n_train_examples'] + ds.info['n_eval_examples'] == len(records)
  (batch,) = take(ds.train_iter(8, 24), 1)
  for b in range(8):
    text = ds.tokenizer.decode(batch['encoder_inputs'][b])
    assert decoded(ds, batch['targets'][b], batch['weights'][b]) == text.split()[0].upper()
  bad = write_pairs(tmp_path / 'bad.jsonl', [{'input': 'a', 'target': 'b'}, {'input': 'c'}])
  with pytest.raises(UserError, match=r'bad\.jsonl:2 .*target'):
    build_seq2seq_dataset(data_config(f'seq2seq_jsonl:{bad}'), seed=0)


def test_noise_mask_follows_t5():
  rng = np.random.default_rng(0)
  masks = [noise_mask(141, 0.15, 3.0, rng) for _ in range(300)]
  for mask in masks:
    assert mask.sum() == 21 and not mask[0]          # round(141 * 0.15) noise, kept first
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == 7                          # round(21 / 3) spans
  lengths = np.concatenate([np.diff(np.flatnonzero(np.diff(np.r_[0, m, 0])))[::2] for m in masks])
  assert lengths.mean() == pytest.approx(3.0)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: set[int]) -> list[int]:
  """The original tokens: each sentinel of the input replaced by what follows it in the target."""
  spans, current = {}, None
  for t in targets.tolist():
    if t in sentinels:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  return [t for s in inputs.tolist() for t in (spans[s] if s in sentinels else [s])]


@pytest.fixture()
def text_source(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'corpus.txt').write_text(' '.join(rng.choice(WORDS, 6000)))
  return f'text:{tmp_path}/corpus.txt'


def test_span_corruption_rows(text_source):
  """Noise share ~0.15, sentinels in the same order in inputs and targets, and the original
  piece rebuilt from inputs + targets; inputs fill the encoder row exactly."""
  ds = build_seq2seq_dataset(data_config(text_source), seed=0)
  corpus = open(text_source.removeprefix('text:')).read()
  tok = ds.tokenizer
  sentinels = set(tok.sentinels.tolist())
  assert min(sentinels) >= tok.base.vocab_size and tok.vocab_size == tok.base.vocab_size + 100
  batches = take(ds.train_iter(16, 64), 4)
  noise = total = 0
  for batch in batches:
    for b in range(16):
      src = batch['encoder_inputs'][b][batch['encoder_segment_ids'][b] > 0][:-1]  # without EOS
      tgt = batch['targets'][b][batch['weights'][b] > 0][:-1]
      in_order = [t for t in src.tolist() if t in sentinels]
      assert in_order == [t for t in tgt.tolist() if t in sentinels] == tok.sentinels[:len(in_order)].tolist()
      original = reconstruct(src, tgt, sentinels)
      assert not sentinels & set(original)
      assert tok.decode(original) in corpus
      noise += len(tgt) - len(in_order)
      total += len(original)
    assert (batch['encoder_segment_ids'].sum(1) == 64).mean() > 0.9  # full pieces fill the row
  assert noise / total == pytest.approx(0.15, abs=0.01)


def test_span_corruption_rebuilds_the_corpus(text_source):
  """Held-out pieces are consecutive: their reconstructions concatenate to the held-out text."""
  ds = build_seq2seq_dataset(data_config(text_source), seed=0)
  sentinels = set(ds.tokenizer.sentinels.tolist())
  pieces = [reconstruct(x, y, sentinels) for x, y in ds.eval_examples(64)]
  text = ds.tokenizer.decode([t for p in pieces for t in p])
  corpus = open(text_source.removeprefix('text:')).read()
  assert len(text) > 1000 and corpus.endswith(text)


def test_span_corruption_resume_is_exact(text_source):
  ds = build_seq2seq_dataset(data_config(text_source), seed=0)
  it = ds.train_iter(16, 64)
  take(it, 3)
  state, expected = it.get_state(), take(it, 2)
  resumed = ds.train_iter(16, 64)
  resumed.set_state(state)
  for x, y in zip(take(resumed, 2), expected):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_too_few_sentinels_is_an_error(text_source):
  ds = build_seq2seq_dataset(data_config(text_source, sentinels=3), seed=0)
  with pytest.raises(UserError, match='data.seq2seq.sentinels'):
    ds.train_iter(4, 128)


def test_corrupt_spans_unit():
  tokens = np.arange(10, 20)
  mask = np.array([0, 1, 1, 0, 0, 0, 1, 0, 0, 1], bool)
  inputs, targets = corrupt_spans(tokens, mask, np.array([99, 98, 97]))
  assert inputs.tolist() == [10, 99, 13, 14, 15, 98, 17, 18, 97]
  assert targets.tolist() == [99, 11, 12, 98, 16, 97, 19]
