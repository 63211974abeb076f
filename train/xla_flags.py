"""XLA flags that must be in the environment before JAX starts its backend; measured wins only."""
import importlib.metadata
import os

# XLA CPU sends dots to YNNPACK fusions by default; Eigen's matmuls train nanoGPT's Shakespeare
# shapes 5-10% faster on x86 (benchmarks/train_throughput.py: 29.3 -> 27.9 ms/step at
# 4L/128/ctx64/b12, 1378 -> 1235 ms/step at 6L/384/ctx256/b16). The flag is experimental and
# XLA aborts on flags it does not know, so it is only added for the jaxlib line it was measured on.
CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
MEASURED_JAXLIB = '0.10.'


def set_cpu_defaults() -> None:
  """Add CPU_FLAGS to XLA_FLAGS unless the user set that flag already (their setting wins).
  Harmless on accelerators: XLA's CPU options only steer host computations there."""
  try:
    if not importlib.metadata.version('jaxlib').startswith(MEASURED_JAXLIB):
      return
  except importlib.metadata.PackageNotFoundError:
    return
  current = os.environ.get('XLA_FLAGS', '')
  extra = [f for f in CPU_FLAGS if f.split('=')[0] not in current]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
