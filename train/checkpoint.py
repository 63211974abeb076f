"""Orbax checkpoints: train state + data iterator state + metadata, saved atomically.

Orbax writes each step into `STEP.orbax-checkpoint-tmp*` and renames it to `STEP` when every item
is written, so a crash mid-save (SIGKILL, full disk) leaves no half-written checkpoint: orbax's
step listing (`latest_step`) skips temporary folders, and a writing manager deletes them when it
opens (safe: the workdir lock, train/workdir.py, means no other run is writing there).
"""
import errno
import glob
import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from model.errors import UserError
from train.workdir import tokenizer_dir


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
  return record.levelno < logging.ERROR or f'orbax{os.sep}checkpoint' not in record.pathname


def make_manager(workdir: str, keep: int | None, async_save: bool = True, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` steps; `read_only` (sampling, loading a base model beside a
  running trainer) never creates, deletes or cleans anything."""
  # Orbax logs a failure of its save threads with tracebacks, then raises it in this thread, where
  # it becomes one line (save_failed, unreadable): the logged copies only bury that line.
  absl_logger = logging.getLogger('absl')
  if _not_an_orbax_error not in absl_logger.filters:
    absl_logger.addFilter(_not_an_orbax_error)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         cleanup_tmp_directories=not read_only,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data_iter: Any | None = None) -> None:
  """Async save of the state; the data iterator's position is written per process (grain's handler)."""
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  wait(manager)  # orbax waits for the save in flight anyway; a failed one is one line here
  ensure_space(manager)
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:
    raise save_failed(manager, e) from e


def ensure_space(manager: ocp.CheckpointManager) -> None:
  """Refuse a save the disk cannot hold before orbax starts it, taking the newest committed step's
  size as the estimate: the usual disk-full case (the disk fills up run by run) ends with the
  one-line error and nothing written, instead of a save that fails half-way (orbax's save threads
  then die noisily; that path is still caught by `wait`). Object stores are not checked."""
  directory = str(manager.directory)
  step = manager.latest_step()
  if step is None or '://' in directory:
    return
  last = os.path.join(directory, str(step))
  size = sum(os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(last) for name in names)
  if shutil.disk_usage(directory).free < size:
    raise save_failed(manager, OSError(errno.ENOSPC, 'No space left on device'))


def wait(manager: ocp.CheckpointManager) -> None:
  """Wait for the async save in flight to commit; a failed save is a UserError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise save_failed(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """`wait`, then close the manager. After a failed save it stays open: closing would cancel
  orbax's dead save threads, which print tracebacks under the one-line error (run.py exits next)."""
  wait(manager)
  manager.close()


def save_failed(manager: ocp.CheckpointManager, e: Exception) -> UserError:
  """One line: what failed, and that the committed checkpoints are untouched."""
  cause = e
  while cause.__cause__ is not None and not isinstance(cause, OSError):
    cause = cause.__cause__
  full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
  full = full or 'No space left on device' in str(e)
  try:
    manager.reload()
    committed = manager.all_steps()
  except Exception:  # the listing itself may fail on a broken file system
    committed = []
  kept = (f'the committed checkpoints ({", ".join(map(str, committed))}) are intact' if committed
          else 'no checkpoint was committed yet')
  what = 'the disk is full' if full else f'{type(e).__name__}: {_first_line(e)}'
  return UserError(f'saving a checkpoint under {manager.directory} failed ({what}); {kept}; '
                   'free space (or fix the folder) and rerun the same command to resume')


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def abstract_like(tree: Any) -> Any:
  """Shape, dtype and sharding of every leaf: the restore target, so orbax reshards onto this mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, like_state: Any,
            data_iter: Any | None = None) -> tuple[Any, dict]:
  """Restore `step` onto the shapes and shardings of `like_state` (orbax reshards onto this mesh),
  and move `data_iter` to the saved position. Any failure or mismatch is a one-line UserError."""
  path = os.path.join(manager.directory, str(step))
  abstract_state = abstract_like(like_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  elastic = getattr(data_iter, 'elastic', False)
  if data_iter is not None and not elastic:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / 'state').tree
  except Exception as e:  # orbax raises many types; all mean the same thing to the user
    raise unreadable(path, e) from e
  # before orbax restores: its shape error names no parameter
  _check_structure(abstract_state, saved, path)
  try:
    out = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise unreadable(path, e) from e
  if elastic:
    restore_elastic(path, data_iter)
  return out['state'], out['meta']


def unreadable(path: str, e: Exception) -> UserError:
  return UserError(f'checkpoint {path} cannot be restored ({type(e).__name__}: {_first_line(e)}); '
                   'delete that step folder to fall back to an older one, or use a fresh --workdir')


def restore_elastic(path: str, data_iter: Any) -> None:
  """An elastic iterator (data/stream.py) saves the same state on every process, so any process's
  copy restores it on any process count (grain's handler would look for this count's file)."""
  saved = sorted(glob.glob(os.path.join(path, 'data', 'process_*-of-*.json')))
  if not saved:
    raise UserError(f'checkpoint {path} has no data iterator state; delete that step folder or use a fresh --workdir')
  with open(saved[0]) as f:
    data_iter.set_state(json.load(f))


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step of `workdir`, or None before any (the manager is closed)."""
  manager = make_manager(workdir, keep=None, async_save=False, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def branch_from(spec: str, workdir: str, steps: int) -> None:
  """train.branch_from = 'RUN:STEP': copy RUN's finished checkpoint STEP (and its tokenizer) into
  `workdir`, which then resumes from it: weights, optimizer state and data position, so a branch
  whose schedule agrees with RUN's up to STEP continues as one uninterrupted run would (a WSD
  cooldown off a constant-lr run). Nothing is copied once `workdir` has a checkpoint of its own:
  the branch resumes itself. The copy lands under a temporary name, then one rename."""
  if not spec or latest_step(workdir) is not None:
    return
  run, _, step = spec.rpartition(':')
  source = os.path.join(checkpoint_dir(run), step)
  if not run or not step.isdigit() or not os.path.isdir(source):
    raise UserError(f'train.branch_from={spec!r}: no finished checkpoint {source}; give '
                    'RUN_WORKDIR:STEP of a saved step (ls RUN_WORKDIR/checkpoints)')
  if int(step) >= steps:
    raise UserError(f'train.branch_from={spec!r} starts at step {step}, not before '
                    f'train.steps={steps}; train longer than the branch point')
  target = os.path.join(checkpoint_dir(workdir), step)
  os.makedirs(checkpoint_dir(workdir), exist_ok=True)
  shutil.rmtree(target + '.branching', ignore_errors=True)
  shutil.copytree(source, target + '.branching')
  os.rename(target + '.branching', target)
  if os.path.isdir(tokenizer_dir(run)) and not os.path.exists(tokenizer_dir(workdir)):
    shutil.copytree(tokenizer_dir(run), tokenizer_dir(workdir))


def restore_latest(workdir: str, like_state: Any) -> tuple[Any, dict]:
  """The newest finished checkpoint of `workdir` (state and metadata), for inference and sampling."""
  manager = make_manager(workdir, keep=None, async_save=False, read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise UserError(f'no checkpoint under {checkpoint_dir(workdir)}; train first')
    return restore(manager, step, like_state)
  finally:
    manager.close()


def latest_leaf_shape(workdir: str, path: tuple[str, ...]) -> tuple[int, ...]:
  """The saved shape of one state leaf of the newest checkpoint (e.g. a head's kernel, to rebuild
  the module it belongs to), read from orbax's metadata without loading any array."""
  step = latest_step(workdir)
  if step is None:
    raise UserError(f'no checkpoint under {checkpoint_dir(workdir)}; train first')
  node = ocp.StandardCheckpointHandler().metadata(
      epath.Path(checkpoint_dir(workdir)) / str(step) / 'state')
  for key in path:
    node = node[key]
  return tuple(node.shape)


def _check_structure(expected: Any, saved: Any, path: str) -> None:
  """A restore never silently uses random weights: parameter names and shapes must match exactly."""
  want, have = _shapes(expected), _shapes(saved)
  params_first = lambda keys: sorted(keys, key=lambda k: (not k.startswith('params.'), k))
  missing, extra = params_first(want.keys() - have.keys()), params_first(have.keys() - want.keys())
  wrong = [f'{k} (checkpoint {have[k]}, model {want[k]})'
           for k in params_first(want.keys() & have.keys()) if want[k] != have[k]]
  parts = [f'{label} {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
           for label, keys in (('mis-shaped', wrong), ('missing', missing), ('unexpected', extra)) if keys]
  if parts:
    raise UserError(f'checkpoint {path} was written by a different model ({"; ".join(parts)}); match '
                    'config.model to the run that wrote it, or use a fresh --workdir')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Leaf shape by dotted path ('params.embed.embedding', 'opt_state.1.0.mu....'): the same names
  for the train state and for orbax's metadata of it (attributes there become dict keys)."""
  def name(k: Any) -> str:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {'.'.join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
