"""The run-folder contract: a workdir is one run's record, with one writer at a time and files
that are whole or absent.

  WORKDIR/.lock           held by the running stage (see WorkdirLock)
  WORKDIR/config.json     the whole resolved config, written once by process 0
  WORKDIR/tokenizer/      the run's tokenizer (data/tokenizer.py), for runs trained from scratch
  WORKDIR/checkpoints/    orbax steps (train/checkpoint.py)
  WORKDIR/metrics.jsonl   one row per logged step (train/metrics.py)
  WORKDIR/run_info.json   config, code commit, package versions at the latest start (tracking.py)
  WORKDIR/tracking.json   wandb and MLflow run ids; wandb/, mlflow.db, mlartifacts/ hold their data
  WORKDIR/*.json          stage summaries (write_summary), written atomically by process 0

The lock is an OS-level `flock` on WORKDIR/.lock held through an open descriptor, so it dies with
the process: a SIGKILLed run never leaves a stale lock, and the next run takes it at once. This
module stays light (no JAX at import), so run.py takes the lock before JAX starts; reopening a
workdir as a model is train/reopen.py.
"""
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from typing import Any

from ml_collections import ConfigDict

from model.errors import UserError
from model.jsonio import read_json

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'
# Stages whose workdir holds a model trained from scratch (its own tokenizer/); the other stages
# fine-tune `config.pretrained` and reopen on top of it.
FROM_SCRATCH = ('pretrain', 'sample', 'chat', 'sweep', 'scaling')


class WorkdirLock:
  """An exclusive lock on a workdir for the life of this process (or until `release`).

  The lock file holds the holder's pid, host, start time and command, so a refused run can name
  it. On NFS, Linux emulates flock with POSIX locks, which work across hosts. An object-store
  workdir (gs://...) has no locks: it is not locked.
  """

  def __init__(self, workdir: str):
    self._fd = -1
    if '://' in workdir:
      return
    os.makedirs(workdir, exist_ok=True)
    self._fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(self._read())
      os.close(self._fd)
      raise UserError(f'workdir {workdir} is in use by {holder}; wait for that run to finish, or '
                      'use another --workdir') from None
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'command': ' '.join(sys.argv)}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(holder) + '\n').encode(), 0)

  def _read(self) -> str:
    return os.pread(self._fd, 4096, 0).decode(errors='replace')

  def release(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)  # closing the descriptor drops the lock
      self._fd = -1

  def __enter__(self) -> 'WorkdirLock':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _describe(text: str) -> str:
  """'pid 123 on host h since T (python run.py ...)', or a fallback while the holder is writing it."""
  try:
    h = json.loads(text)
    return f'pid {h["pid"]} on host {h["host"]} since {h["started"]} ({h["command"][:120]})'
  except (ValueError, KeyError, TypeError):
    return 'another process (it is starting up)'


def write_text_atomic(path: str, text: str) -> None:
  """Write `text` to a temporary file beside `path`, fsync it and rename it over `path`: a reader
  (or a crash) sees the old file or the new one, never half of it."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, obj: Any, **dump_kwargs: Any) -> None:
  """`obj` as a JSON file, written whole or not at all (see `write_text_atomic`)."""
  write_text_atomic(path, json.dumps(obj, **dump_kwargs))


def write_summary(workdir: str, name: str, data: Any, **json_options: Any) -> str:
  """`data` as JSON in workdir/name (indent 2 unless `json_options` say otherwise), written by
  process 0 only and atomically, so hosts never race and a reader never sees half a file.
  Returns the path."""
  import jax  # only the process index: importing this module must not need JAX
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    write_json_atomic(path, data, **{'indent': 2, **json_options})
  return path


def write_config(workdir: str, cfg: ConfigDict) -> None:
  """The run's resolved config: every result traces back to its config."""
  write_summary(workdir, CONFIG_FILE, cfg.to_dict(), sort_keys=True)


def read_config(workdir: str) -> ConfigDict:
  """The config a run saved; one line naming the file when it is missing or unreadable."""
  return ConfigDict(read_json(os.path.join(workdir, CONFIG_FILE), 'pass a workdir written by run.py'))


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer')


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints'))
