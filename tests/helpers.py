"""Small builders shared by tests: a tiny config, random packed batches, a few train steps."""
import numpy as np
from ml_collections import ConfigDict

from experiments.base import get_config

# Tests check numbers, not speed, and most of their time is XLA compiling many small models: its
# CPU backend at -O0 compiles them about 3x faster (one init_trainer 4.0 -> 1.2 s; tests/model and
# two train files from a cold cache 354 -> 194 s) and runs them slower, which tiny shapes barely
# feel. run.py, benchmarks and users keep XLA's default.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process (this one, or a run.py it starts) with `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


def tiny_config(**model) -> ConfigDict:
  """A 2-layer GPT small enough to compile and step in well under a second."""
  c = get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.n_kv_heads = 2, 32, 4, 2
  c.model.d_ff = 64
  c.train.batch_size, c.train.seq_len, c.train.warmup_steps = 8, 16, 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  for k, v in model.items():
    c.model[k] = v
  return c


def random_batch(rng: np.random.Generator, batch: int, length: int, vocab: int,
                 docs_per_row: int = 2) -> dict[str, np.ndarray]:
  """Rows packed with `docs_per_row` documents of random lengths, as data/pipeline.py emits."""
  tokens = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(2, length - 1), docs_per_row - 1, replace=False))
    bounds = [0, *cuts, length]
    for i in range(docs_per_row):
      seg[b, bounds[i]:bounds[i + 1]] = i + 1
      pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
  weights = np.ones((batch, length), np.float32)
  weights[:, :-1] *= seg[:, 1:] == seg[:, :-1]  # no target across a document boundary
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=pos,
              weights=weights)


def train_metrics(trainer, objective, batches, seed: int, names: tuple[str, ...] = ('loss',)
                  ) -> np.ndarray:
  """Consecutive train steps of `trainer` on host `batches` (one step rng, `seed`), under its mesh
  and the logical rules: the logged metrics `names` per step, [steps] for one name."""
  import jax

  from train.step import make_train_step
  from train.mesh import global_batch, mesh_rules
  step = make_train_step(trainer, objective)
  rows = []
  with mesh_rules(trainer.mesh):
    for batch in batches:
      trainer.state, m = step(trainer.state, global_batch(batch, trainer.mesh),
                              jax.random.PRNGKey(seed))
      rows.append([float(m[k]) for k in names])
  out = np.array(rows)
  return out[:, 0] if len(names) == 1 else out
