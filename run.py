"""Entry point: python run.py --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]"""
import contextlib
import errno
import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'experiments/quickstart.py', 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, tokenizer, config.json.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad flag (unknown config key, bad value, missing config file) ends
  with one line naming it instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.stage  # config files load lazily: fail here, not deep inside a stage
    return rest
  except Exception as e:  # config_flags raises AttributeError/KeyError/OSError/flags.Error
    text = str(e).replace('\\n', '\n').replace("\\'", '')
    message = ' '.join(line.strip().strip('\'"') for line in text.splitlines() if line.strip())
    sys.exit(f'error: bad flag: {message} (every config field is listed in experiments/base.py)')


def architecture_overrides(argv: list[str]) -> list[str]:
  """The model.* fields set on the command line (--config.model.FIELD=VALUE or ... VALUE)."""
  prefix = '--config.model.'
  return [a[len(prefix):].split('=')[0] for a in argv if a.startswith(prefix)]


READ_ONLY_STAGES = ('sample', 'chat')  # they write nothing to the workdir: no lock, no config.json


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --config.train.steps=100')
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if not workdir and cfg.stage != 'chat':  # chat only reads config.pretrained
    sys.exit('error: --workdir is required (where checkpoints, metrics and the tokenizer go)')
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
  from model.errors import UserError
  from train.launch import launched_multiprocess
  from train.validate import validate
  from train.workdir import FROM_SCRATCH, WorkdirLock, write_config
  writes = bool(workdir) and cfg.stage not in READ_ONLY_STAGES
  multiprocess = launched_multiprocess(cfg.mesh)
  try:
    with contextlib.ExitStack() as held:
      validate(cfg)  # before JAX starts: a bad value costs a fraction of a second ...
      if writes and not multiprocess:  # ... and so does a second run on this workdir
        held.enter_context(WorkdirLock(workdir))  # one writer per workdir, while this stage runs
      from train.xla_flags import set_cpu_defaults
      set_cpu_defaults()  # before JAX starts
      import jax
      from train.mesh import maybe_initialize_distributed
      from train.stages import STAGES
      from train.stages.sft import COMPUTE_FIELDS
      from train.validate import validate_devices
      if cfg.stage not in STAGES:
        raise UserError(f'config.stage={cfg.stage!r} is not one of {", ".join(STAGES)}')
      if cfg.get('pretrained') and cfg.stage not in FROM_SCRATCH:  # the base fixes the architecture
        ignored = [f for f in architecture_overrides(sys.argv) if f not in COMPUTE_FIELDS]
        if ignored:
          raise UserError(f'--config.model.{ignored[0]} cannot change the architecture of '
                          f'config.pretrained={cfg.pretrained!r}; only model.{{{",".join(COMPUTE_FIELDS)}}} '
                          'apply when fine-tuning')
      if cfg.stage == 'eval' and workdir and os.path.abspath(cfg.pretrained) == os.path.abspath(workdir):
        raise UserError('stage=eval writes its config and eval_results.json to --workdir; give it a '
                        'new folder, not the run it evaluates (config.pretrained)')
      maybe_initialize_distributed(cfg.mesh)
      validate_devices(cfg, jax.device_count(), jax.process_count())
      if writes:
        os.makedirs(workdir, exist_ok=True)
      if writes and jax.process_index() == 0:
        if multiprocess:  # process 0 holds it for all
          held.enter_context(WorkdirLock(workdir))
        write_config(workdir, cfg)
      STAGES[cfg.stage](cfg, workdir)
  except UserError as e:
    fail(str(e))
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    fail(f'the disk is full (writing {e.filename or workdir}); committed checkpoints are intact: '
         'free space and rerun the same command to resume')


def fail(message: str) -> NoReturn:
  """One `error:` line and exit 1 at once: the background threads of a failed run (orbax's async
  saver, TensorBoard's writer) must not print their own teardown tracebacks after it. Whatever
  was committed is on disk already; an uncommitted save is invisible (orbax renames on commit)."""
  sys.stdout.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
