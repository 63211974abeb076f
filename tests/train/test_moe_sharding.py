"""Mixture of experts on 8 simulated devices: expert-parallel and mixed meshes train as one device
does, dropless (shard_map over the expert axis) and with expert capacity (GSPMD all-to-all)."""
import functools

import jax
import numpy as np
import pytest

from train.loop import init_trainer
from train.objectives import causal_lm_loss
from tests.helpers import random_batch, tiny_config, train_metrics

VOCAB = 64
BATCHES = [random_batch(np.random.default_rng(i), 16, 16, VOCAB) for i in range(20)]
NAMES = ('loss', 'moe_balance', 'moe_router_z', 'moe_dropped')
# (mesh data, fsdp, tensor, expert), capacity factor, scanned + rematerialised layers
CASES = [((1, 1, 1, 8), 0.0, False), ((2, 2, 1, 2), 0.0, False), ((2, 2, 1, 2), 1.0, True)]


def trainer_for(mesh, capacity: float, scan: bool):
  c = tiny_config(mlp='moe', n_experts=8, top_k=2, d_ff=32, capacity_factor=capacity,
                  scan_layers=scan, remat='full' if scan else 'none')
  c.train.batch_size, c.train.seq_len = 16, 16
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = mesh
  return init_trainer(c, VOCAB, devices=jax.devices()[:int(np.prod(mesh))])


@functools.cache
def reference(capacity: float, scan: bool) -> np.ndarray:
  return train_metrics(trainer_for((1, 1, 1, 1), capacity, scan), causal_lm_loss, BATCHES, seed=0,
                       names=NAMES)


@pytest.mark.slow
@pytest.mark.parametrize('mesh, capacity, scan', CASES,
                         ids=lambda v: 'x'.join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_moe_mesh_trains_as_one_device(mesh, capacity, scan):
  trainer = trainer_for(mesh, capacity, scan)
  blocks = trainer.state.params['blocks']
  kernel = (blocks['layers']['block'] if scan else blocks['layers_0'])['mlp']['gate']
  assert 'expert' in str(kernel.sharding.spec)  # each device holds n_experts / mesh.expert experts
  got = train_metrics(trainer, causal_lm_loss, BATCHES, seed=0, names=NAMES)
  want = reference(capacity, scan)
  np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-5)   # 20 steps of loss
  np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-6)
  assert (want[:, 3] > 0).all() if capacity else (want[:, 3] == 0).all()
