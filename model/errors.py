"""The one exception type for bad input: run.py prints its message as a single line and exits."""


class UserError(Exception):
  """A problem the user can fix (config, paths, data); the message names the problem and the fix."""
