"""The one exception type for bad input: run.py prints its message as a single line and exits."""
import functools
import sys
from typing import Callable


class UserError(Exception):
  """A problem the user can fix (config, paths, data); the message names the problem and the fix."""


def one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` for absl's app.run, with a UserError ending as one `error:` line (exit 1), as run.py."""
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as e:
      sys.exit(f'error: {e}')
  return wrapped
