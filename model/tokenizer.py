"""The one tokenizer interface: what the pipeline, the stages and `Pretrained` may ask of any
tokenizer, whether built and saved by a run (data/tokenizer.py) or shipped with an imported model
(model/convert/tokenizer.py). Every family implements all of it, so callers read attributes and
never probe for them."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  """Text <-> token ids. `encode` adds no special tokens; `decode` drops them."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None
  add_bos: bool                # documents and plain-text prompts start with BOS (when there is one)
  stop_ids: tuple[int, ...]    # ids that end a generated reply (EOS, end-of-turn markers)
  chat_template: str | None    # None: no template, so `apply_chat_template` refuses

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no specials added."""

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as int32 numpy (vectorised where the family can)."""

  def encode_framed(self, text: str) -> list[int]:
    """Ids of one sentence inside the markers an encoder reads it with: the tokenizer's own
    ([CLS] ... [SEP] for BERT), else [BOS] ... [EOS] as this project's encoders are pretrained."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`, special tokens dropped."""

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation as the model was trained to read it; a UserError when chat_template is None."""
