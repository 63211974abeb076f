"""How this process was launched, decided without starting JAX: alone, or one of several processes
(explicit `mesh.coordinator`, or a TPU pod slice / SLURM job / JAX_COORDINATOR_ADDRESS)."""
import os

from ml_collections import ConfigDict


def launched_multiprocess(m: ConfigDict) -> bool:
  env = os.environ
  return bool(m.coordinator or env.get('JAX_COORDINATOR_ADDRESS')
              or int(env.get('SLURM_NTASKS', '1')) > 1 or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
              or int(env.get('MEGASCALE_NUM_SLICES', '1')) > 1)
