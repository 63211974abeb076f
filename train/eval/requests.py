"""Text -> token requests, as lm-eval's `hf` backend builds them, and the local files tasks read.

`encode_pair` moves a context's trailing spaces onto the continuation and takes the continuation's
ids from the tokenization of the whole string, so a merge across the boundary is scored as the
model would see it; tasks and the lm-eval adapter share it, which keeps their figures equal.
"""
from typing import Any, Sequence

from data.tokenizer import document_frame
from model.errors import UserError


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] = ()
                ) -> tuple[list[int], list[int]]:
  """(prefix + context ids, continuation ids) of one request; an empty context gets `prefix` only."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer.encode(context + continuation)
  context_ids = tokenizer.encode(context) if context else []
  return [*prefix, *context_ids], whole[len(context_ids):]


def bos_prefix(tokenizer: Any) -> list[int]:
  """[BOS] where the model's documents start with it (models trained here), else nothing: the
  document framing of data.tokenizer.document_frame."""
  return document_frame(tokenizer)[0].tolist()


def prefix_id(tokenizer: Any) -> int:
  """The token a document's first window starts after: BOS, else EOS (lm-eval's prefix_token_id)."""
  return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def string_field(obj: dict, where: str, name: str, example: str) -> str:
  """obj[name], which must be a string; else an error naming the record and the expected shape."""
  value = obj.get(name)
  if not isinstance(value, str):
    raise UserError(f"{where} has no string field {name!r}; records look like {example}")
  return value
