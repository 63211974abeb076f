"""T5 span corruption (Raffel et al. 2020, `random_spans_noise_mask`): noise_density of a piece's
tokens, in spans of mean length mean_span, are replaced in the input by one sentinel id each and
spelled out after it in the target. Sentinel ids sit above the base tokenizer's vocabulary."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data.tokenizer import SavedTokenizer


def span_counts(n: int, density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a piece of n >= 2 tokens, as T5 rounds them: at least one
  noise and one kept token, at least one span."""
  noise = min(max(round(n * density), 1), n - 1)
  return noise, max(min(round(noise / mean_span), noise, n - noise), 1)


def segment_lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` items cut into `parts` non-empty runs at random: the runs' lengths."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(n: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
  """T5's random_spans_noise_mask, bool [n]: kept and noise spans alternate, kept first."""
  noise, spans = span_counts(n, density, mean_span)
  runs = np.stack([segment_lengths(n - noise, spans, rng), segment_lengths(noise, spans, rng)], 1)
  return np.repeat(np.tile([False, True], spans), runs.ravel())


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Input: the kept tokens with noise span i replaced by sentinels[i]; target: each sentinel
  followed by the tokens it replaced."""
  first = mask & ~np.concatenate([[False], mask[:-1]])  # the first token of each noise span
  ids = sentinels[np.maximum(np.cumsum(first) - 1, 0)]
  inputs = np.where(first, ids, tokens)[~mask | first]
  targets = np.insert(tokens[mask], np.flatnonzero(first[mask]), sentinels[:first.sum()])
  return inputs.astype(np.int32), targets.astype(np.int32)


class SentinelTokenizer(SavedTokenizer):
  """`base` with `n` ids reserved above its vocabulary for sentinels (T5's <extra_id_i> is the
  i-th id from the top). Sentinels decode to nothing; the run saves the base tokenizer."""

  def __init__(self, base: SavedTokenizer, n: int):
    self.base, self.spec = base, base.spec
    self.pad_id, self.bos_id, self.eos_id = base.pad_id, base.bos_id, base.eos_id
    self.vocab_size = base.vocab_size + n
    self.sentinels = np.arange(self.vocab_size - 1, base.vocab_size - 1, -1, dtype=np.int32)

  def encode_array(self, text: str) -> np.ndarray:
    return self.base.encode_array(text)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids)
    return self.base.decode(ids[ids < self.base.vocab_size])

  def save(self, directory: str) -> None:
    self.base.save(directory)

  def _fields(self) -> dict:
    return self.base._fields()
