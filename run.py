"""Entry point: python run.py --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]"""
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


def architecture_overrides(argv: list[str]) -> list[str]:
  """The model.* fields set on the command line (--config.model.FIELD=VALUE or ... VALUE)."""
  prefix = '--config.model.'
  return [a[len(prefix):].split('=')[0] for a in argv if a.startswith(prefix)]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --config.train.steps=100')
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if not workdir and cfg.stage != 'chat':  # chat only reads config.pretrained
    sys.exit('error: --workdir is required (where checkpoints, metrics and the tokenizer go)')
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
  from train.xla_flags import set_cpu_defaults
  set_cpu_defaults()  # before JAX starts
  from model.errors import UserError
  from train.mesh import maybe_initialize_distributed
  from train.stages import STAGES
  from train.stages.sft import COMPUTE_FIELDS
  from train.workdir import FROM_SCRATCH, write_config
  try:
    if cfg.stage not in STAGES:
      raise UserError(f'config.stage={cfg.stage!r} is not one of {", ".join(STAGES)}')
    if cfg.get('pretrained') and cfg.stage not in FROM_SCRATCH:  # the base fixes the architecture
      ignored = [f for f in architecture_overrides(sys.argv) if f not in COMPUTE_FIELDS]
      if ignored:
        raise UserError(f'--config.model.{ignored[0]} cannot change the architecture of '
                        f'config.pretrained={cfg.pretrained!r}; only model.{{{",".join(COMPUTE_FIELDS)}}} '
                        'apply when fine-tuning')
    if cfg.stage == 'eval' and workdir and os.path.abspath(cfg.pretrained) == os.path.abspath(workdir):
      raise UserError('stage=eval writes its config and eval_results.json to --workdir; give it a new '
                      'folder, not the run it evaluates (config.pretrained)')
    maybe_initialize_distributed(cfg.mesh)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      write_config(workdir, cfg)
    STAGES[cfg.stage](cfg, workdir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
