"""Entry point: python run.py --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]"""
import json
import os
import sys

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --config.train.steps=100')
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if not workdir and cfg.stage != 'chat':  # chat only reads config.pretrained
    sys.exit('error: --workdir is required (where checkpoints, metrics and the tokenizer go)')
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()  # before JAX starts
  import jax  # after flag parsing, so a bad flag fails fast
  from model.errors import UserError
  from train.mesh import maybe_initialize_distributed
  from train.stages import STAGES
  try:
    if cfg.stage not in STAGES:
      raise UserError(f'config.stage={cfg.stage!r} is not one of {", ".join(STAGES)}')
    maybe_initialize_distributed(cfg.mesh)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
    if workdir and jax.process_index() == 0:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    STAGES[cfg.stage](cfg, workdir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
