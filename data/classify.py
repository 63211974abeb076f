"""Classification data for stage sft (`sft.train='classify:GLOB'`): {"text", "label"} records
(data/formats.py read_labeled) -> one example per row, for an encoder with a class head
(model/heads.py ClassifierModel).

Labels are strings or integers (not both), numbered in sorted order: info['labels'][i] is class i
(the stage writes the list to the workdir's labels.json). A text is framed as its base reads a
sentence: the tokenizer's own [CLS] ... [SEP] where it has one (BERT, MiniLM), else [BOS] ... [EOS]
as this project's encoders are pretrained. A text of more than seq_len tokens keeps its first
seq_len - 1 and its closing token, or is dropped (`sft.overlong`); both are counted.

Rows:
  inputs       int32 [B, T]    the framed text, pad_id after it
  positions    int32 [B, T]    0, 1, ... over the text; 0 on padding
  segment_ids  int32 [B, T]    1 on the text, 0 = padding
  labels       int32 [B]       class id
  weights      float32 [B]     1 per example; 0 on the rows that fill the last eval batch
Each epoch shuffles all train examples (seeded by (seed, epoch)) and process p of P takes rows p,
p+P, ...; data/rows.RowIterator saves (epoch, row), so a resumed run sees the batches the
uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from ml_collections import ConfigDict

from data import formats
from data.rows import EpochRows, LazyEpoch, RowsDataset, check_batch_shape, check_launch, eval_share
from data.sft import check_sft_fields, hold_out
from model.errors import UserError
from model.tokenizer import Tokenizer

Label = str | int


@dataclasses.dataclass(frozen=True)
class Examples:
  """Framed texts padded to one length, and their class ids."""

  tokens: np.ndarray   # int32 [n, seq_len]
  lengths: np.ndarray  # int64 [n]
  labels: np.ndarray   # int32 [n]

  def rows(self, index: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The rows of examples `index` [b] (see the module docstring); weights default to 1."""
    columns = np.arange(self.tokens.shape[1])
    real = columns < self.lengths[index, None]
    return {'inputs': self.tokens[index], 'positions': np.where(real, columns, 0).astype(np.int32),
            'segment_ids': real.astype(np.int32), 'labels': self.labels[index],
            'weights': np.ones(len(index), np.float32) if weights is None else weights}


def label_names(labels: Sequence[Label]) -> list[Label]:
  """The distinct train labels in sorted order: class i is names[i]."""
  if len({type(label) for label in labels}) > 1:
    raise UserError('sft.train labels mix strings and integers; write every label the same way')
  names = sorted(set(labels))
  if len(names) < 2:
    raise UserError(f'sft.train has only the label {names!r}; a classifier needs two or more classes')
  return names


def encode_examples(records: Sequence[tuple[str, Label]], names: list[Label], tokenizer: Tokenizer,
                    seq_len: int, overlong: str, split: str) -> tuple[Examples, dict[str, int]]:
  """The records framed, fitted to seq_len (see `sft.overlong`) and numbered by `names`, and the
  counts: examples kept, truncated, dropped."""
  class_id = {name: i for i, name in enumerate(names)}
  kept, truncated, dropped = [], 0, 0
  for text, label in records:
    if label not in class_id:
      raise UserError(f'sft.{split} has label {label!r}, which no sft.train record has; a classifier '
                      'predicts only the train labels')
    ids = tokenizer.encode_framed(text)
    if len(ids) > seq_len:
      if overlong == 'drop':
        dropped += 1
        continue
      ids, truncated = ids[:seq_len - 1] + ids[-1:], truncated + 1
    kept.append((ids, class_id[label]))
  if not kept:
    raise UserError(f"sft.{split} has no example left that fits train.seq_len={seq_len} ({dropped} dropped); "
                    "raise train.seq_len or set sft.overlong='truncate'")
  tokens = np.full((len(kept), seq_len), tokenizer.pad_id, np.int32)
  for row, (ids, _) in zip(tokens, kept):
    row[:len(ids)] = ids
  examples = Examples(tokens, np.array([len(ids) for ids, _ in kept], np.int64),
                      np.array([label for _, label in kept], np.int32))
  return examples, {'examples': len(kept), 'truncated': truncated, 'dropped': dropped}


class ClassifyRows(EpochRows):
  """Endless rows of one process: every epoch, the train examples shuffled (module docstring)."""

  def __init__(self, examples: Examples, seed: int, process_index: int, process_count: int):
    super().__init__(seed, process_index, process_count)
    self.examples = examples

  def epoch(self, epoch: int) -> LazyEpoch:
    """This process's examples in the epoch's order: make(r) is row r's index, as an array [1]."""
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples.labels))
    usable = len(order) - len(order) % self.process_count  # every process gets as many rows
    mine = order[self.process_index:usable:self.process_count]
    return LazyEpoch(len(mine), lambda r: mine[r:r + 1])

  def row(self, plan: LazyEpoch, row: int) -> dict[str, np.ndarray]:
    return {key: value[0] for key, value in self.examples.rows(plan.make(row)).items()}

  def made_from(self) -> dict:
    return {'seq_len': self.examples.tokens.shape[1], 'n_examples': len(self.examples.labels)}


@dataclasses.dataclass(frozen=True)
class ClassifyDataset(RowsDataset):
  """Labelled examples of one process (data/rows.TrainData)."""

  train: Examples
  evals: Examples

  def train_rows(self, batch_size: int, seq_len: int) -> ClassifyRows:
    self._check_seq_len(seq_len)
    if len(self.train.labels) < batch_size * self.process_count:
      raise UserError(f'sft.train has {len(self.train.labels)} examples, fewer than one batch '
                      f'({batch_size * self.process_count}); use a smaller train.batch_size or more data')
    return ClassifyRows(self.train, self.seed, self.process_index, self.process_count)

  def eval_batches(self, batch_size: int, seq_len: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """This process's share of the eval examples (every P-th) once, in order. Every process gets
    the same number of batches; the rows that fill the last one repeat example 0 with weight 0."""
    check_batch_shape(batch_size, seq_len)
    self._check_seq_len(seq_len)
    return [self.evals.rows(index, weights) for index, weights in
            eval_share(len(self.evals.labels), batch_size, self.process_index, self.process_count, max_batches)]

  def _check_seq_len(self, seq_len: int) -> None:
    if seq_len != self.train.tokens.shape[1]:
      raise UserError(f'the classification data was framed for seq_len {self.train.tokens.shape[1]}, '
                      f'not {seq_len}; build it with train.seq_len')


def build_classify_dataset(cfg_sft: ConfigDict, tokenizer: Tokenizer, seq_len: int, seed: int,
                           process_index: int = 0, process_count: int = 1) -> ClassifyDataset:
  """Reads sft.train and sft.eval (or holds out sft.eval_fraction of the train records), numbers
  the labels and frames the texts for rows of seq_len tokens."""
  check_launch(seed, process_index, process_count)
  check_sft_fields(cfg_sft)
  if cfg_sft.eval_generate or cfg_sft.probe:
    raise UserError("sft.eval_generate and sft.probe score generated replies, and a classifier generates "
                    "none; set them to 0 and ''")
  train = formats.read_labeled(cfg_sft.train, 'sft.train')[:cfg_sft.max_examples or None]
  if cfg_sft.eval:
    evals = formats.read_labeled(cfg_sft.eval, 'sft.eval')
  else:
    train, evals = hold_out(train, cfg_sft.eval_fraction)
  names = label_names([label for _, label in train])
  info: dict[str, Any] = {'labels': names, 'n_classes': len(names)}
  splits = {}
  for split, records in (('train', train), ('eval', evals)):
    splits[split], counts = encode_examples(records, names, tokenizer, seq_len, cfg_sft.overlong, split)
    info.update({f'{split}_{key}': value for key, value in counts.items()})
  eval_labels = splits['eval'].labels  # always answering the most common class scores this:
  info['eval_majority_accuracy'] = np.bincount(eval_labels).max() / len(eval_labels)
  return ClassifyDataset(tokenizer, info, seed, process_index, process_count, splits['train'], splits['eval'])
