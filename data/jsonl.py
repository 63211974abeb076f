"""JSON Lines files (.jsonl, or gzipped .jsonl.gz) as records, each with its 'path:line' for
one-line errors that point at the bad record."""
from __future__ import annotations

import gzip
import json
from typing import Iterator

from model.errors import UserError


def json_objects(path: str) -> Iterator[tuple[str, dict]]:
  """('path:line', object) of every non-blank line of a .jsonl or .jsonl.gz file."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{path}:{number}'
        try:
          obj = json.loads(line)
        except json.JSONDecodeError:
          raise UserError(f"{where} is not valid JSON; fix or remove that line") from None
        if not isinstance(obj, dict):
          raise UserError(f"{where} is not a JSON object; write one {{...}} record per line")
        yield where, obj
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path} cannot be read ({e}); it must be UTF-8 .jsonl or gzipped .jsonl.gz") from None


def string_fields(obj: dict, where: str, *names: str) -> list[str]:
  """The string fields `names` of a record; a missing one is an error naming the line."""
  for name in names:
    if not isinstance(obj.get(name), str):
      raise UserError(f"{where} has no string field {name!r}; each record needs "
                      f"{' and '.join(map(repr, names))}")
  return [obj[name] for name in names]
