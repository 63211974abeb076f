"""Streaming from token stores (data/stream.py): rows match the records, resume is exact, the global
stream is the same on any process count, mixtures keep their shares, bad input is one line."""
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from data import store, stream
from data.pipeline import build_dataset
from data.tokenizer import ByteTokenizer, CharTokenizer
from model.errors import UserError

SEQ = 16
TOK = ByteTokenizer()


def documents(n: int, seed: int, low: int = 0) -> list[np.ndarray]:
  """Framed documents of random bytes in [low, low + 100), from 1 to ~5 rows long. Every piece
  (seq_len pairs, or the tail) has >= 6 pairs, so a piece's content identifies it."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n):
    pairs = int(rng.integers(6, 5 * SEQ))
    if 0 < pairs % SEQ < 6:
      pairs += 6
    body = rng.integers(low, low + 100, pairs - 1)
    docs.append(np.concatenate([[TOK.bos_id], body, [TOK.eos_id]]).astype(np.int32))
  return docs


def make_store(path, seed: int = 0, low: int = 0, n: int = 120, tokenizer=TOK) -> str:
  store.write_store(str(path), tokenizer, {'train': documents(n, seed, low), 'eval': documents(12, seed + 1, low)},
                    chunk_tokens=3 * SEQ + 5, num_shards=3)
  return str(path)


def dataset(source: str, seed: int = 0, index: int = 0, count: int = 1, tokenizer: str = 'byte', workdir=None):
  cfg = ConfigDict({'source': source, 'tokenizer': tokenizer})
  return build_dataset(cfg, seed, tokenizer_dir=workdir, process_index=index, process_count=count)


@pytest.fixture(autouse=True)
def small_shuffle_window(monkeypatch):
  """A window of 64 pieces instead of 4096: the same code, and these stores hold only ~500 pieces."""
  monkeypatch.setattr(stream, 'SHUFFLE_PIECES', 64)


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp('stores')
  return make_store(root / 'a', 0, 0), make_store(root / 'b', 5, 120)


def pieces_of(split_records) -> dict[bytes, int]:
  """Every piece the packer may emit (inputs + targets bytes) -> how many times it occurs."""
  out = {}
  for ids in split_records:
    for s in range(0, len(ids) - 1, SEQ):
      key = ids[s:s + SEQ + 1].tobytes()
      out[key] = out.get(key, 0) + 1
  return out


def segments(rows: list[dict]) -> list[bytes]:
  """Each segment of each row as the token run it was cut from (its inputs + its last target),
  after checking the row contract."""
  out = []
  for row in rows:
    seg, pos, w = row['segment_ids'], row['positions'], row['weights']
    assert np.array_equal(w, (seg > 0).astype(np.float32))
    assert np.all(row['inputs'][seg == 0] == TOK.pad_id) and np.all(row['targets'][seg == 0] == TOK.pad_id)
    for s in np.unique(seg[seg > 0]):
      at = np.flatnonzero(seg == s)
      assert np.array_equal(at, np.arange(at[0], at[-1] + 1)), 'a segment is contiguous'
      assert np.array_equal(pos[at], np.arange(len(at))), 'positions restart at 0 in every segment'
      inputs, targets = row['inputs'][at], row['targets'][at]
      assert np.array_equal(inputs[1:], targets[:-1]), 'targets are the next token in the segment'
      out.append(np.append(inputs, targets[-1]).astype(np.int32).tobytes())
  return out


def unbatch(rows) -> list[dict]:
  return [{k: v[i] for k, v in batch.items()} for batch in rows for i in range(len(batch['inputs']))]


def test_one_epoch_holds_every_piece_of_every_record_once(stores):
  data = dataset(f'tokens:{stores[0]}')
  rows = [stream.contract({k: v[None] for k, v in row.items()}) for row in data.rows(SEQ, epochs=1)]
  got = segments(unbatch(rows))
  want = pieces_of(store.read_split(stores[0], 'train'))
  assert sorted(got) == sorted(k for k, n in want.items() for _ in range(n))
  real = sum(r['weights'].sum() for r in rows)
  assert real / (len(rows) * SEQ) > 0.9  # packing leaves little padding
  evals = segments(unbatch(data.eval_batches(4, SEQ)))
  assert sorted(evals) == sorted(k for k, n in pieces_of(store.read_split(stores[0], 'eval')).items() for _ in range(n))


def test_epochs_are_reshuffled_and_batches_are_per_process_blocks(stores):
  data = dataset(f'tokens:{stores[0]}')
  first = segments(unbatch(stream.contract({k: v[None] for k, v in r.items()}) for r in data.rows(SEQ, epochs=1)))
  two = segments(unbatch(stream.contract({k: v[None] for k, v in r.items()}) for r in data.rows(SEQ, epochs=2)))
  assert sorted(two) == sorted(first * 2)  # packing may mix the epochs' edges, never drop or repeat
  assert two[len(first):] != two[:len(first)]
  it = data.train_iter(8, SEQ)
  whole = [next(it) for _ in range(6)]
  halves = [dataset(f'tokens:{stores[0]}', index=p, count=2).train_iter(4, SEQ) for p in range(2)]
  for batch in whole:
    parts = [next(h) for h in halves]
    for k in batch:
      assert np.array_equal(batch[k], np.concatenate([p[k] for p in parts]))


@pytest.mark.parametrize('mixture', [False, True])
def test_resume_is_bitwise(stores, mixture):
  source = f'mixture:{stores[0]}=0.6,{stores[1]}=0.4' if mixture else f'tokens:{stores[0]}'
  it = dataset(source).train_iter(4, SEQ)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(30)]  # well past an epoch of either store
  again = dataset(source).train_iter(4, SEQ)
  again.set_state(state)
  for w, g in zip(want, (next(again) for _ in range(30))):
    assert all(np.array_equal(w[k], g[k]) for k in w)


def test_state_moves_to_any_process_count_without_dropping_or_repeating(stores):
  """Acceptance 3 (data side): 2 processes to batch 5, 1 process to batch 9, then 4 processes:
  the concatenated global batches are exactly those of one uninterrupted process."""
  source = f'mixture:{stores[0]}=0.5,{stores[1]}=0.5'
  reference = dataset(source).train_iter(8, SEQ)
  want = [next(reference) for _ in range(14)]
  got, state = [], None
  for count, until in ((2, 5), (1, 9), (4, 14)):
    iters = [dataset(source, index=p, count=count).train_iter(8 // count, SEQ) for p in range(count)]
    for i in iters:
      if state is not None:
        i.set_state(state)
    while len(got) < until:
      parts = [next(i) for i in iters]
      got.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    states = [i.get_state() for i in iters]
    assert all(s == states[0] for s in states), 'every process holds the same state'
    state = states[-1]
  for w, g in zip(want, got):
    assert all(np.array_equal(w[k], g[k]) for k in w)


def test_mixture_shares_tokens_by_weight_and_is_seeded(stores):
  """Acceptance 4: 0.7/0.3 of the tokens over 1,000 batches; the same sequence for the same seed."""
  source = f'mixture:{stores[0]}=0.7,{stores[1]}=0.3'
  it = dataset(source).train_iter(4, SEQ)
  a = b = 0
  digest = []
  for step in range(1000):
    batch = next(it)
    targets = batch['targets'][batch['weights'] > 0]
    a += int(((targets < 100) | (targets == TOK.eos_id)).sum())
    b += int(((targets >= 120) & (targets < 220)).sum())
    if step < 20:
      digest.append(batch['inputs'].tobytes())
  assert abs(a / (a + b) - 0.7) < 0.01, a / (a + b)
  same = dataset(source).train_iter(4, SEQ)
  assert [next(same)['inputs'].tobytes() for _ in range(20)] == digest
  other = dataset(source, seed=1).train_iter(4, SEQ)
  assert [next(other)['inputs'].tobytes() for _ in range(20)] != digest


def test_the_run_takes_the_store_tokenizer(stores, tmp_path):
  data = dataset(f'tokens:{stores[0]}', workdir=str(tmp_path / 'tokenizer'))
  assert store.tokenizer_hash(str(tmp_path / 'tokenizer')) == data.members[0].manifest['tokenizer']['sha256']
  assert data.tokenizer.vocab_size == TOK.vocab_size and data.info['train_target_tokens'] > 0


def test_bad_input_is_one_line(stores, tmp_path):
  """Acceptance 5 (read side)."""
  char_store = make_store(tmp_path / 'char', tokenizer=CharTokenizer('abc'), n=4)
  cases = [
      (lambda: dataset(f'tokens:{stores[0]}', tokenizer='char'), ["'byte'", 'data.tokenizer=byte']),
      (lambda: dataset(f'mixture:{stores[0]}=1,{char_store}=1'), ['different tokenizers']),
      (lambda: dataset(f'tokens:{char_store}', tokenizer='char', workdir=str(tmp_path / 'tokenizer')), []),
      (lambda: dataset(f'tokens:{stores[0]}', workdir=str(tmp_path / 'tokenizer')), ['another tokenizer']),
      (lambda: dataset(f'mixture:{stores[0]}=0.7,{stores[1]}=x'), ["'", '=x', 'STORE=WEIGHT']),
      (lambda: dataset(f'mixture:{stores[0]}=0,{stores[1]}=0'), ['summing to 0']),
      (lambda: dataset(f'mixture:{stores[0]}'), ['STORE=WEIGHT']),
      (lambda: dataset(f'tokens:{tmp_path}/nothing'), ['not a token store']),
  ]
  for make, words in cases:
    if not words:
      make()  # sets up the workdir's tokenizer for the next case
      continue
    with pytest.raises(UserError) as e:
      make()
    assert '\n' not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
  broken = make_store(tmp_path / 'broken', n=30)
  shard = os.path.join(broken, store.shard_name('train', 1, 3))
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(UserError, match='truncated|records'):
    dataset(f'tokens:{broken}').train_iter(4, SEQ)
  os.remove(shard)
  with pytest.raises(UserError, match='missing'):
    dataset(f'tokens:{broken}').train_iter(4, SEQ)
  it = dataset(f'tokens:{stores[0]}').train_iter(4, SEQ)
  with pytest.raises(UserError, match='seq_len'):
    dataset(f'tokens:{stores[0]}').train_iter(4, SEQ * 2).set_state(it.get_state())
