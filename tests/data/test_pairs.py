"""Preference pairs for the reward and DPO stages: HH records rendered and filtered, synthetic pairs
labelled by the gold score, the hold-out split."""
import gzip
import json

import numpy as np
from ml_collections import ConfigDict

from data.pairs import hh_pairs, prompts_of, split_pairs, synthetic_pairs
from data.preferences import chain_task
from data.tokenizer import CharTokenizer

TOK = CharTokenizer('abcdefghijklmnopqrstuvwxyz ?!.')


def write_hh(path, records):
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for chosen, rejected in records:
      f.write(json.dumps({'chosen': chosen, 'rejected': rejected}) + '\n')


def test_hh_pairs_share_the_prompt_and_end_at_the_reply_marker(tmp_path):
  """default template: [BOS] user [EOS] reply [EOS]; a row ends with the last reply's EOS."""
  path = tmp_path / 'hh.jsonl.gz'
  write_hh(path, [
      ('\n\nHuman: hi\n\nAssistant: hello', '\n\nHuman: hi\n\nAssistant: go away'),
      ('\n\nHuman: ' + 'x' * 50 + '\n\nAssistant: a', '\n\nHuman: ' + 'x' * 50 + '\n\nAssistant: b'),
      ('\n\nHuman: one\n\nAssistant: a', '\n\nHuman: two\n\nAssistant: a'),  # prompts differ
      ('\n\nHuman: ok?\n\nAssistant: yes\n\nHuman: sure?\n\nAssistant: yes.',
       '\n\nHuman: ok?\n\nAssistant: yes\n\nHuman: sure?\n\nAssistant: no'),
  ])
  pairs = hh_pairs(str(path), TOK, 'auto', width=40, limit=10)
  assert len(pairs.chosen) == 2  # the long one and the one with different prompts are skipped
  hi = [TOK.bos_id, *TOK.encode('hi'), TOK.eos_id]
  np.testing.assert_array_equal(pairs.chosen[0], hi + TOK.encode('hello') + [TOK.eos_id])
  np.testing.assert_array_equal(pairs.rejected[0], hi + TOK.encode('go away') + [TOK.eos_id])
  assert pairs.prompt_lengths[0] == len(hi)
  prompt = prompts_of(pairs)[1]
  assert TOK.decode(prompt) == 'ok?yessure?' and prompt[-1] == TOK.eos_id
  assert len(hh_pairs(str(path), TOK, 'auto', width=40, limit=1).chosen) == 1


def test_synthetic_pairs_are_ordered_by_the_gold_score_without_label_noise():
  synthetic = ConfigDict(dict(n_symbols=12, branching=3, concentration=0.5, seed=4))
  chars = CharTokenizer('abcdefghijkl')
  task = chain_task(synthetic, 3, 5.0, chars)
  rng = np.random.default_rng(0)

  def sample(prompts, seed):  # random symbol strings, some ending with EOS
    ids = task.symbol_ids[rng.integers(0, 12, (len(prompts), 6))]
    return [np.append(row, chars.eos_id) if i % 2 else row for i, row in enumerate(ids)]

  pairs = synthetic_pairs(task, sample, 64, prompt_len=4, label_temperature=0.0, seed=0)
  assert (pairs.gold_margin >= 0).all() and (pairs.gold_margin > 0).any()
  prompts = np.stack([c[:5] for c in pairs.chosen])
  gold = lambda rows: task.measure(prompts, [r[5:] for r in rows])['gold']
  np.testing.assert_array_equal(gold(pairs.chosen) - gold(pairs.rejected), pairs.gold_margin)
  np.testing.assert_array_equal([c[:5] for c in pairs.chosen], [r[:5] for r in pairs.rejected])
  train, held = split_pairs(pairs, 16)
  assert len(held.chosen) == 16 and len(train.chosen) == 48
