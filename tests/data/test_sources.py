"""Sources: synthetic ground truth, text/jsonl/tfds splits, and every bad-input error."""
import os

import numpy as np
import pytest

from data import sources, synthetic
from data.tfds_text import build_text_tfds
from experiments.base import get_config
from model.errors import UserError

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data')


def data_cfg(source: str = 'synthetic', **synthetic_fields):
  cfg = get_config().data
  cfg.source = source
  for key, value in synthetic_fields.items():
    cfg.synthetic[key] = value
  return cfg


def test_markov_chain_structure():
  cfg = data_cfg().synthetic
  chain = synthetic.markov_chain(cfg)
  assert chain.transitions.shape == (24, 24) and chain.alphabet == 'abcdefghijklmnopqrstuvwx'
  np.testing.assert_allclose(chain.transitions.sum(axis=1), 1.0)
  assert ((chain.transitions > 0).sum(axis=1) == cfg.branching).all()
  np.testing.assert_allclose(chain.initial, 1 / 24)
  again = synthetic.markov_chain(cfg)
  np.testing.assert_array_equal(chain.transitions, again.transitions)
  cfg.seed += 1
  assert not np.array_equal(chain.transitions, synthetic.markov_chain(cfg).transitions)


def test_reported_entropy_matches_sampled_nll():
  """The true model's empirical loss on fresh documents converges to the reported truth."""
  source = sources.load_source(data_cfg())
  chain = synthetic.markov_chain(data_cfg().synthetic)
  docs = chain.sample(np.random.default_rng(7), 20_000, 127)
  truth = source.info['true_entropy_nats_per_token']
  assert abs(chain.nll(docs) - truth) < 0.003  # ~7 standard errors; dividing by n instead of n+1 fails
  assert abs(source.info['eval_true_nll_nats_per_token'] - truth) < 0.05
  assert source.info['true_nats_per_doc'] == pytest.approx(truth * 128)
  # Long documents: per-token truth -> entropy rate.
  assert chain.expected_nll(20_000) == pytest.approx(source.info['entropy_rate_nats_per_symbol'], abs=2e-3)


def test_expected_nll_by_enumeration():
  """Exact check on a tiny chain: sum over every document of p(doc) * -log p(doc)."""
  chain = synthetic.markov_chain(data_cfg(n_symbols=3, branching=2).synthetic)
  n = 4
  docs = np.stack(np.meshgrid(*[np.arange(3)] * n, indexing='ij'), -1).reshape(-1, n)
  with np.errstate(divide='ignore'):
    logp = np.log(chain.initial[docs[:, 0]]) + np.log(chain.transitions[docs[:, :-1], docs[:, 1:]]).sum(1)
  p = np.exp(logp)
  assert p.sum() == pytest.approx(1.0)
  possible = p > 0
  assert chain.expected_nll(n) == pytest.approx(-(p[possible] * logp[possible]).sum() / (n + 1))


def test_synthetic_split_and_render():
  source = sources.load_source(data_cfg(n_docs=100, doc_len=10))
  assert len(source.train_docs) == 90 and len(source.eval_docs) == 10
  assert all(len(d) == 10 for d in source.train_docs + source.eval_docs)
  again = sources.load_source(data_cfg(n_docs=100, doc_len=10))
  assert again.eval_docs == source.eval_docs


def test_holdout_mask():
  mask = sources.holdout_mask(1000, 0.1)
  assert mask.sum() == 100 and np.flatnonzero(mask)[:3].tolist() == [9, 19, 29]
  assert sources.holdout_mask(10, 0.25).sum() == 2


def test_text_split_is_the_tail_of_each_file(tmp_path):
  (tmp_path / 'b.txt').write_text('0123456789' * 10)
  (tmp_path / 'a.txt').write_text('abcdefghij')
  (tmp_path / 'empty.txt').write_text('')
  source = sources.load_source(data_cfg(f'text:{tmp_path}/*.txt'))
  assert source.train_docs == ['abcdefghi', '0123456789' * 9]
  assert source.eval_docs == ['j', '0123456789']
  assert source.info['n_files'] == 3


def test_tinyshakespeare_split():
  with open(os.path.join(SHARED, 'tinyshakespeare.txt'), encoding='utf-8') as f:
    text = f.read()
  source = sources.load_source(data_cfg(f'text:{SHARED}/tinyshakespeare.txt'))
  n = int(len(text) * 0.9)  # nanoGPT's split
  assert source.train_docs == [text[:n]] and source.eval_docs == [text[n:]]


def test_jsonl(tmp_path):
  source = sources.load_source(data_cfg(f'jsonl:{SHARED}/gsm8k/train.jsonl:question'))
  assert (len(source.train_docs), len(source.eval_docs)) == (6726, 747)
  hh = sources.load_source(data_cfg(f'jsonl:{SHARED}/hh-rlhf/*.jsonl.gz:chosen'))
  assert len(hh.train_docs) + len(hh.eval_docs) == 2312 and 'Human:' in hh.train_docs[0]
  path = tmp_path / 'x.jsonl'
  path.write_text('{"text": "a"}\n\n{"other": "b"}\n')
  with pytest.raises(UserError, match=r'x.jsonl:3 has no string field .text.'):
    sources.load_source(data_cfg(f'jsonl:{path}:text'))
  path.write_text('{"text": "a"}\n{oops\n')
  with pytest.raises(UserError, match=r'x.jsonl:2 is not valid JSON'):
    sources.load_source(data_cfg(f'jsonl:{path}:text'))


def test_tfds_local_builder_round_trip(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  texts = {'a.txt': 'First document\nwith two lines.\n' * 20, 'b.txt': 'Zweites Dokument ☃ 😀\n' * 30}
  for name, text in texts.items():
    (corpus / name).write_text(text)
  data_dir = str(tmp_path / 'tfds')
  name = build_text_tfds(f'{corpus}/*.txt', data_dir, config='mine')
  assert name == 'local_text_files/mine'
  direct = sources.load_source(data_cfg(f'text:{corpus}/*.txt'))
  for spec in [f'tfds:{name}', f'tfds:{name}:text', f'tfds:{name}:1.0.0:text']:
    cfg = data_cfg(spec)
    cfg.data_dir = data_dir
    via_tfds = sources.load_source(cfg)
    assert sorted(via_tfds.train_docs) == sorted(direct.train_docs)
    assert sorted(via_tfds.eval_docs) == sorted(direct.eval_docs)
    assert via_tfds.info['tfds_eval_split'] == 'validation'
  cfg = data_cfg(f'tfds:{name}:title')
  cfg.data_dir = data_dir
  with pytest.raises(UserError, match="has no text field 'title'"):
    sources.load_source(cfg)
  cfg = data_cfg('tfds:no_such_dataset_here')
  cfg.data_dir = data_dir
  with pytest.raises(UserError, match='not found'):
    sources.load_source(cfg)


@pytest.mark.parametrize('source,match', [
    ('csv:x', 'is not valid'),
    ('jsonl:/x.jsonl', 'is not valid'),
    ('text:/no/such/dir/*.txt', 'matched no files'),
    ('jsonl:/no/such/*.jsonl:text', 'matched no files'),
])
def test_bad_sources(source, match):
  with pytest.raises(UserError, match=match):
    sources.load_source(data_cfg(source))


def test_empty_corpus_and_split_errors(tmp_path):
  (tmp_path / 'blank.txt').write_text('  \n\n')
  with pytest.raises(UserError, match='only empty files'):
    sources.load_source(data_cfg(f'text:{tmp_path}/*.txt'))
  with pytest.raises(UserError, match='empty eval split'):
    sources.load_source(data_cfg(n_docs=5))
  cfg = data_cfg()
  cfg.eval_fraction = 0.0
  with pytest.raises(UserError, match='eval_fraction'):
    sources.load_source(cfg)
  (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9')
  with pytest.raises(UserError, match='not UTF-8'):
    sources.load_source(data_cfg(f'text:{tmp_path}/latin1.txt'))


@pytest.mark.parametrize('field,value,match', [
    ('n_symbols', 200, 'n_symbols'), ('branching', 30, 'branching'),
    ('concentration', 0.0, 'concentration'), ('doc_len', 0, 'doc_len'),
])
def test_bad_synthetic(field, value, match):
  with pytest.raises(UserError, match=match):
    sources.load_source(data_cfg(**{field: value}))
