"""Supervised fine-tuning data: conversations -> token ids with a trainable flag -> packed rows.

Templates (`sft.template`). `model`: the tokenizer's own chat template (SmolLM2's ChatML from its
GGUF), rendered on growing prefixes of the conversation so that each message is a span of the
whole text. `default`, for tokenizers without one (the project's char, byte, SentencePiece ones):

  [BOS] message_1 [EOS] message_2 [EOS] ...     e.g. [BOS] prompt [EOS] completion [EOS]

It writes no literal text, so any tokenizer spells any conversation over its alphabet; roles are
implied by the order, and the generation prompt is empty (the EOS closing the user's text asks for
the reply). Each span is tokenized on its own and the ids concatenated, so the flags are exact:
trainable = an assistant reply's content and its end marker, up to and including the first stop
token (`<|im_end|>` in ChatML, EOS in `default`); system and user text, role headers and what
follows the end marker ('\\n' in ChatML) are not.

Rows. An example's ids t[0..n) give pairs t[i] -> t[i+1] weighted 1 exactly where t[i+1] is
trainable. An example of more than seq_len + 1 tokens is truncated to its first seq_len + 1 or
dropped (`sft.overlong`); a truncated one may lose the end of its reply and the end marker (the
model then never sees where that reply ends), and one left with no trainable target is dropped.
data/pipeline.py packs the examples into rows first-fit (segment ids, positions restarting at 0,
shuffled per epoch, exact resume, rows p, p+P, ... per process): batches have pretraining's format.

Plain text (`sft.train='text:GLOB'`, `build_text_dataset`) is pretraining's data with the base's
tokenizer: every token trained, documents cut and packed exactly as data/pipeline.py does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from ml_collections import ConfigDict

from data import formats, sources
from data.pipeline import Dataset, TokenizedDocs, tokenized_dataset
from data.rows import check_launch
from model.errors import UserError
from model.tokenizer import Tokenizer

TEMPLATES = 'auto | model | default'
OVERLONG = ('truncate', 'drop')
Span = tuple[list[int], bool]  # token ids, trainable


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One conversation as token ids, and which of them the model is trained to produce."""

  ids: np.ndarray        # int32 [n]
  trainable: np.ndarray  # bool [n]
  reply_start: int       # ids[:reply_start] = the prompt for generating the last assistant reply


def resolve_template(tokenizer: Tokenizer, name: str) -> str:
  """'model' or 'default' for `sft.template` (auto = the tokenizer's own when it has one)."""
  has_own = tokenizer.chat_template is not None
  if name == 'auto':
    return 'model' if has_own else 'default'
  if name == 'model' and not has_own:
    raise UserError("sft.template='model' but this tokenizer has no chat template; use 'default' or 'auto'")
  if name not in ('model', 'default'):
    raise UserError(f"sft.template={name!r} is not valid; use one of {TEMPLATES}")
  return name


def render(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], template: str) -> Rendered:
  """Ids and trainable flags of a conversation under `template` ('model' or 'default')."""
  spans = model_spans(tokenizer, messages) if template == 'model' else default_spans(tokenizer, messages)
  lengths = [len(ids) for ids, _ in spans]
  ids = np.array([i for span, _ in spans for i in span], np.int32)
  trainable = np.repeat([flag for _, flag in spans], lengths).astype(bool)
  last_reply = max((k for k, (_, flag) in enumerate(spans) if flag), default=len(spans))
  return Rendered(ids, trainable, sum(lengths[:last_reply]))


def default_spans(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[Span]:
  """[BOS] then each message's text + [EOS]; an assistant's text and EOS are trainable."""
  if tokenizer.eos_id is None:
    raise UserError("sft.template='default' ends every message with EOS but this tokenizer has none; "
                    "use sft.template='model'")
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return [(bos, False)] + [(tokenizer.encode(m['content']) + [tokenizer.eos_id], m['role'] == 'assistant')
                           for m in messages]


def model_spans(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[Span]:
  """Spans of the tokenizer's chat template: the text each message adds to the render of the ones
  before it; an assistant message's text is split into the header (what the generation prompt
  adds), the reply through its first stop token (trainable), and the rest."""
  stops = set(tokenizer.stop_ids)
  spans: list[Span] = []
  before = ''
  for i, message in enumerate(messages):
    text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
    if message['role'] == 'assistant':
      header = _extension(before, tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True), i)
      reply = tokenizer.encode(_extension(before + header, text, i))
      end = next((j + 1 for j, token in enumerate(reply) if token in stops), len(reply))
      spans += [(tokenizer.encode(header), False), (reply[:end], True), (reply[end:], False)]
    else:
      spans.append((tokenizer.encode(_extension(before, text, i)), False))
    before = text
  return spans


def fit_examples(examples: Sequence[Rendered], seq_len: int, overlong: str) -> tuple[TokenizedDocs, dict]:
  """The examples that fit in a row of seq_len pairs (after `overlong`), as one token array, and
  counts: examples kept, truncated, dropped, and trainable target tokens."""
  kept, truncated, dropped = [], 0, 0
  for example in examples:
    cut = len(example.ids) > seq_len + 1
    if (cut and overlong == 'drop') or not example.trainable[1:seq_len + 1].any():
      dropped += 1
      continue
    truncated += cut
    kept.append((example.ids[:seq_len + 1], example.trainable[:seq_len + 1]))
  lengths = np.array([len(ids) for ids, _ in kept], np.int64)
  tokens = np.concatenate([ids for ids, _ in kept] or [np.zeros(0, np.int32)])
  trainable = np.concatenate([flags for _, flags in kept] or [np.zeros(0, bool)])
  starts = np.cumsum(lengths) - lengths
  counts = {'examples': len(kept), 'truncated': truncated, 'dropped': dropped,
            'trainable_tokens': int(sum(flags[1:].sum() for _, flags in kept))}
  return TokenizedDocs(tokens, starts, lengths - 1, trainable), counts


@dataclasses.dataclass(frozen=True)
class SftDataset(Dataset):
  """Packed SFT rows with data/pipeline.Dataset's interface (train_iter, eval_batches, info), built
  for one seq_len, plus prompts for generation-based eval: (ids ending with the template's
  generation prompt, reference answer or None) per eval record, in order."""

  seq_len: int = 0
  eval_prompts: list[tuple[list[int], str | None]] = dataclasses.field(default_factory=list)
  answer_of: Callable[[str], str | None] = str.strip  # the part of a reply compared with a reference

  def train_dataset(self, batch_size: int, seq_len: int) -> Any:
    self._check_seq_len(seq_len)
    return super().train_dataset(batch_size, seq_len)

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    self._check_seq_len(seq_len)
    return super().eval_batches(batch_size, seq_len, max_batches)

  def exact_match(self, replies: Sequence[str]) -> float:
    """Exact match of decoded replies to the first len(replies) eval prompts (scored ones only)."""
    references = [reference for _, reference in self.eval_prompts[:len(replies)]]
    return formats.exact_match([self.answer_of(r) for r in replies], references)

  def _check_seq_len(self, seq_len: int) -> None:
    if seq_len != self.seq_len:
      raise UserError(f"the SFT data was fitted to seq_len {self.seq_len}, not {seq_len}; build it with "
                      "train.seq_len")


def build_sft_dataset(cfg_sft: ConfigDict, tokenizer: Tokenizer, seq_len: int, seed: int, process_index: int = 0,
                      process_count: int = 1, cfg_synthetic: ConfigDict | None = None) -> SftDataset:
  """Reads sft.train and sft.eval (or holds out sft.eval_fraction of the train records), renders
  them with the template and fits them to rows of seq_len pairs. `cfg_synthetic` (data.synthetic)
  is needed only by the synthetic_instruct source."""
  check_launch(seed, process_index, process_count)
  check_sft_fields(cfg_sft)
  template = resolve_template(tokenizer, cfg_sft.template)
  train = formats.read_records(cfg_sft.train, 'sft.train', cfg_synthetic)[:cfg_sft.max_examples or None]
  if cfg_sft.eval:
    evals = formats.read_records(cfg_sft.eval, 'sft.eval', cfg_synthetic)
  else:
    train, evals = hold_out(train, cfg_sft.eval_fraction)
  info: dict[str, Any] = {'template': template, 'vocab_size': tokenizer.vocab_size}
  rendered = {split: [render(tokenizer, r.messages, template) for r in records]
              for split, records in (('train', train), ('eval', evals))}
  splits = {}
  for split, examples in rendered.items():
    splits[split], counts = fit_examples(examples, seq_len, cfg_sft.overlong)
    info.update({f'{split}_{key}': value for key, value in counts.items()})
    if not counts['examples']:
      raise UserError(f"sft.{split} has no example left that fits train.seq_len={seq_len} "
                      f"({counts['dropped']} dropped); raise train.seq_len or set sft.overlong='truncate'")
  prompts = [(r.ids[:r.reply_start].tolist(), record.reference) for r, record in zip(rendered['eval'], evals)]
  return SftDataset(tokenizer, info, seed, process_index, process_count, splits['train'], splits['eval'],
                    seq_len=seq_len, eval_prompts=prompts,
                    answer_of=formats.answer_extractor(cfg_sft.eval or cfg_sft.train))


def check_sft_fields(cfg_sft: ConfigDict) -> None:
  """The fields every record source reads: sft.overlong and sft.max_examples."""
  if cfg_sft.overlong not in OVERLONG:
    raise UserError(f"sft.overlong={cfg_sft.overlong!r} is not valid; use {' or '.join(OVERLONG)}")
  if cfg_sft.max_examples < 0:
    raise UserError(f"sft.max_examples={cfg_sft.max_examples} is negative; use 0 (all) or a count")


def build_text_dataset(cfg_sft: ConfigDict, tokenizer: Tokenizer, seed: int, process_index: int = 0,
                       process_count: int = 1) -> Dataset:
  """`sft.train='text:GLOB'`: one document per file, every token trained (domain adaptation); eval
  is `sft.eval='text:GLOB'`, or with sft.eval='' the last sft.eval_fraction of each train file."""
  check_launch(seed, process_index, process_count)
  if cfg_sft.eval_generate:
    raise UserError(f"sft.eval_generate={cfg_sft.eval_generate} scores replies to instruction prompts, which "
                    "sft.train='text:...' has none of; set it to 0")
  pattern = cfg_sft.train.partition(':')[2]
  if not cfg_sft.eval:
    sources.check_fraction(cfg_sft.eval_fraction, 'sft.eval_fraction')
    source = sources.text_source(pattern, cfg_sft.eval_fraction, 'sft.train')
  else:
    kind, _, eval_pattern = cfg_sft.eval.partition(':')
    if kind != 'text' or not eval_pattern:
      raise UserError(f"sft.eval={cfg_sft.eval!r} must be text:GLOB like sft.train, or '' to hold out "
                      "the tail of each train file")
    texts = lambda files, field: [text for _, text in sources.read_text_files(files, field)]
    source = sources.Source(texts(pattern, 'sft.train'), texts(eval_pattern, 'sft.eval'), {})
  return tokenized_dataset(source, tokenizer, seed, process_index, process_count)


def hold_out(items: list, fraction: float) -> tuple[list, list]:
  """(train, eval): every k-th item held out (k = 1/fraction)."""
  sources.check_fraction(fraction, 'sft.eval_fraction')
  held = sources.holdout_mask(len(items), fraction)
  if not held.any():
    raise UserError(f"sft.eval_fraction={fraction} of {len(items)} records holds out none; raise it or set sft.eval")
  return [r for r, h in zip(items, held) if not h], [r for r, h in zip(items, held) if h]


def _extension(before: str, text: str, index: int) -> str:
  """What `text` adds to `before`; a template whose render of message `index` rewrites the text
  before it cannot be split into per-message spans."""
  if not text.startswith(before):
    raise UserError(f"the chat template is not prefix-stable: rendering message {index} changes the text "
                    "before it, so replies cannot be masked; use sft.template='default'")
  return text[len(before):]
