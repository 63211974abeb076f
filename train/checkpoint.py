"""Orbax checkpoints: train state + data iterator state + metadata, saved atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
leaves no half-written checkpoint: `latest_step` only sees finished ones.
"""
import glob
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from model.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int | None, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data_iter: Any | None = None) -> None:
  """Async save of the state; the data iterator's position is written per process (grain's handler)."""
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


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
    out = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types; all mean the same thing to the user
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'checkpoint {path} cannot be restored ({type(e).__name__}: {first[:200]}); '
                    'delete that step folder to fall back to an older one, or use a fresh --workdir') from e
  _check_structure(abstract_state, out['state'], path)
  if elastic:
    restore_elastic(path, data_iter)
  return out['state'], out['meta']


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
  manager = make_manager(workdir, keep=None, async_save=False)  # read-only: never deletes
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_latest(workdir: str, like_state: Any) -> tuple[Any, dict]:
  """The newest finished checkpoint of `workdir` (state and metadata), for inference and sampling."""
  manager = make_manager(workdir, keep=None, async_save=False)  # read-only: never deletes
  try:
    step = manager.latest_step()
    if step is None:
      raise UserError(f'no checkpoint under {checkpoint_dir(workdir)}; train first')
    return restore(manager, step, like_state)
  finally:
    manager.close()


def _check_structure(expected: Any, got: Any, path: str) -> None:
  """A restore never silently uses random weights: keys and shapes must match exactly."""
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(got)}
  missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
  if missing or extra or wrong:
    raise UserError(f'checkpoint {path} does not match the model: missing {missing[:3]}, '
                    f'unexpected {extra[:3]}, mis-shaped {wrong[:3]}; check config.model')
