"""Sharded training equals one device: data, FSDP, tensor parallel and their mixes (8 fake CPUs)."""
import jax
import numpy as np
import pytest

from train import checkpoint
from train.loop import init_trainer
from train.mesh import global_batch, mesh_rules
from train.objectives import causal_lm_loss
from tests.helpers import random_batch, tiny_config, train_metrics

VOCAB = 64
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]  # and (2,2,1,2): test_moe_sharding.py


def config(mesh):
  c = tiny_config(n_heads=8, n_kv_heads=8, d_model=64, d_ff=128)
  c.train.batch_size, c.train.seq_len, c.train.steps = 16, 16, 60
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def trainer_for(mesh):
  devices = jax.devices()[:int(np.prod(mesh))]
  return init_trainer(config(mesh), VOCAB, devices=devices)


BATCHES = [random_batch(np.random.default_rng(i), 16, 16, VOCAB) for i in range(60)]


def loss_and_grads(trainer):
  loss_fn = causal_lm_loss(trainer.model.apply)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0))[0]))
  with mesh_rules(trainer.mesh):
    return jax.device_get(fn(trainer.state.params, global_batch(BATCHES[0], trainer.mesh)))


def train_losses(trainer, steps):
  return train_metrics(trainer, causal_lm_loss, [BATCHES[i] for i in steps], seed=0)


@pytest.fixture(scope='module')
def reference():
  trainer = trainer_for((1, 1, 1))
  grads = loss_and_grads(trainer)
  return grads, train_losses(trainer, range(50))


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_sharded_equals_single_device(mesh, reference):
  (ref_loss, ref_grads), ref_losses = reference
  trainer = trainer_for(mesh)
  loss, grads = loss_and_grads(trainer)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  # Relative error per tensor (norm of the difference over the norm): elementwise ratios of
  # near-zero entries only measure f32 summation order, which sharding legitimately changes.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 1e-5, (jax.tree_util.keystr(path), rel)
  np.testing.assert_allclose(train_losses(trainer, range(50)), ref_losses, rtol=1e-4)


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(tmp_path):
  """Saved on (1,8,1), restored on (2,2,2) and on one device: the next 10 losses match."""
  source = trainer_for((1, 8, 1))
  train_losses(source, range(5))
  manager = checkpoint.make_manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(manager, 5, source.state, {'tokens': 0, 'flops': 0.0})
  manager.wait_until_finished()
  expected = train_losses(source, range(5, 15))
  for mesh in [(2, 2, 2), (1, 1, 1)]:
    target = trainer_for(mesh)
    target.state, _ = checkpoint.restore(manager, 5, target.state)
    np.testing.assert_allclose(train_losses(target, range(5, 15)), expected, rtol=1e-5)


COMPILE_STEP = '''
import jax, numpy as np
from train.step import make_train_step
from train.trainer import init_trainer
from train.mesh import global_batch, mesh_rules
from train.objectives import causal_lm_loss
from tests.helpers import random_batch
from tests.train.test_sharding import config
trainer = init_trainer(config((2, 2, 2)), 64, devices=jax.devices()[:8])
with mesh_rules(trainer.mesh):
  batch = global_batch(random_batch(np.random.default_rng(0), 16, 16, 64), trainer.mesh)
  make_train_step(trainer, causal_lm_loss).lower(trainer.state, batch, jax.random.PRNGKey(0)).compile()
print('compiled')
'''


def test_fsdp_x_tensor_step_compiles_without_involuntary_rematerialization():
  """XLA logs on stderr when its SPMD partitioner must replicate a tensor to reshard it (the
  token-embedding gather under fsdp x tensor did); a fresh process (no compilation cache)
  compiles the (2, 2, 2) step without that warning. Its losses equal one device's above."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': root}
  out = subprocess.run([sys.executable, '-c', COMPILE_STEP], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and 'compiled' in out.stdout, out.stderr[-2000:]
  assert 'Involuntary full rematerialization' not in out.stderr, out.stderr[-2000:]
