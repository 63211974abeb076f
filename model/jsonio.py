"""JSON files read with one-line errors (importers' configs, a run's saved config and stats)."""
import json
from typing import Any

from model.errors import UserError


def read_json(path: str, fix: str) -> Any:
  """The JSON value in `path`; a missing, unreadable or malformed file is a UserError that names
  the file and the reason and ends with `fix` (what the user should do)."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({e}); {fix}') from None
