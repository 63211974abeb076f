"""stage=tokenize: the workdir becomes a token store of data.source (see data/tokenize_beam.py)."""
from ml_collections import ConfigDict


def tokenize_stage(cfg: ConfigDict, workdir: str) -> None:
  from data.tokenize_beam import build_store  # here: only this stage pays for Apache Beam
  build_store(cfg.data, workdir)
