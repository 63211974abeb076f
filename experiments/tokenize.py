"""Tokenize a corpus once into a token store (stage=tokenize; data/store.py, data/tokenize_beam.py):

  python run.py --config=experiments/tokenize.py --workdir=STORE \
    --config.data.source='text:/data/corpus/*.txt' --config.data.tokenizer=spm_bpe:8000

then train from it with data.source=tokens:STORE. Cluster runs add Beam's pipeline options:
--config.data.store.beam_options='--runner=DataflowRunner --project=...' (see data/tokenize_beam.py).
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.stage = 'tokenize'
  c.data.source = 'text:../shared/data/tinyshakespeare.txt'
  c.data.tokenizer = 'byte'
  return c
