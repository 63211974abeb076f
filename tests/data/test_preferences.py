"""Gold reward on the Markov language: hand-made sequences, symbol/token mappings, BT labels."""
import numpy as np
import pytest
from ml_collections import ConfigDict

from data.preferences import (NOT_SYMBOL, ChainTask, GoldReward, ids_to_symbols, prefers_first,
                              separated_targets, symbol_token_ids)
from data.synthetic import MarkovChain, markov_chain
from data.tokenizer import CharTokenizer
from model.errors import UserError

# a -> b or c, b -> c, c -> a: a->a, b->a, b->b, c->b, c->c are illegal
CHAIN = MarkovChain(np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
                    np.full(3, 1 / 3), 'abc')
TARGET = np.array([False, False, True])  # 'c' earns a point


def text_to_symbols(text: str, chain: MarkovChain) -> np.ndarray:
  """Characters -> symbol indices; a character outside the chain's alphabet is NOT_SYMBOL."""
  return np.array([chain.alphabet.find(ch) for ch in text], np.int64)


def test_gold_score_counts_targets_and_illegal_steps():
  gold = GoldReward(CHAIN, TARGET, illegal_penalty=5.0)
  legal = text_to_symbols('bcab', CHAIN)                    # after context 'a': a>b b>c c>a a>b
  assert gold.illegal(legal, context=0) == 0
  assert gold.score(legal, context=0) == 1.0
  assert gold.illegal(legal, context=2) == 1                # c>b is illegal
  assert gold.score(legal, context=2) == 1.0 - 5.0
  broken = text_to_symbols('cc?ca', CHAIN)                  # c>c illegal, '?' no symbol, then restart
  assert list(broken) == [2, 2, NOT_SYMBOL, 2, 0]
  assert gold.illegal(broken, context=0) == 2
  assert gold.score(broken, context=0) == 3.0 - 10.0
  np.testing.assert_allclose(gold.nll(text_to_symbols('bca', CHAIN), context=0), np.log(2) / 3)
  np.testing.assert_allclose(gold.nll(text_to_symbols('a', CHAIN)), np.log(3))  # initial dist


def test_token_ids_map_through_the_char_tokenizer():
  """The char tokenizer sorts its vocabulary ('B' < 'a'), so ids do not follow alphabet order."""
  chain = MarkovChain(CHAIN.transitions, CHAIN.initial, 'aB1')
  tok = CharTokenizer.from_texts(chain.render(np.array([[0, 1, 2, 0]])))
  symbol_ids = symbol_token_ids(chain, tok)
  text = 'B1aB'
  ids = np.array([*tok.encode(text), tok.eos_id, *tok.encode('a')])
  np.testing.assert_array_equal(ids_to_symbols(ids, symbol_ids, stop_id=tok.eos_id),
                                text_to_symbols(text, chain))
  np.testing.assert_array_equal(ids_to_symbols(np.array([tok.bos_id, ids[0]]), symbol_ids),
                                [NOT_SYMBOL, 1])
  with pytest.raises(UserError, match='own token'):
    symbol_token_ids(MarkovChain(np.eye(4), np.full(4, 0.25), 'aBxy'), tok)  # x, y are unknown


def test_labels_at_zero_temperature_pick_the_higher_gold_score():
  rng = np.random.default_rng(0)
  a, b = rng.integers(-5, 5, 1000), rng.integers(-5, 5, 1000)
  first = prefers_first(a, b, 0.0, rng)
  np.testing.assert_array_equal(first[a != b], (a > b)[a != b])
  first = prefers_first(a, b, 1e-6, rng)
  np.testing.assert_array_equal(first[a != b], (a > b)[a != b])
  noisy = prefers_first(np.ones(20000), np.zeros(20000), 1.0, rng)
  assert abs(noisy.mean() - 1 / (1 + np.exp(-1))) < 0.01


def test_separated_targets_never_follow_each_other():
  chain = markov_chain(ConfigDict(dict(n_symbols=24, branching=4, concentration=0.5, seed=5)))
  target = separated_targets(chain, 6, seed=5)
  assert target.sum() == 6
  assert (chain.transitions[np.ix_(target, target)] == 0).all()
  np.testing.assert_array_equal(target, separated_targets(chain, 6, seed=5))
  with pytest.raises(UserError, match='non-adjacent'):
    separated_targets(chain, 20, seed=5, tries=5)


def test_chain_task_measures_token_responses():
  tok = CharTokenizer(CHAIN.alphabet)
  ids = symbol_token_ids(CHAIN, tok)
  task = ChainTask(GoldReward(CHAIN, TARGET), ids, tok.bos_id, tok.eos_id)
  prompts = task.prompts(np.random.default_rng(0), 2, 3)
  assert prompts.shape == (2, 4) and (prompts[:, 0] == tok.bos_id).all()
  prompts[:, -1] = ids[0]  # both prompts end in 'a'
  legal = np.array([*tok.encode('bca'), tok.eos_id, *tok.encode('cc')])  # cut at EOS
  broken = np.array(tok.encode('cc'))                                       # a>c legal, c>c not
  m = task.measure(prompts, [legal, broken])
  np.testing.assert_array_equal(m['gold'], [1.0, 2.0 - 5.0])
  np.testing.assert_array_equal(m['symbols'], [3, 2])
  np.testing.assert_array_equal(m['illegal'], [0, 1])
  np.testing.assert_allclose(m['chain_nll'][0], np.log(2))
