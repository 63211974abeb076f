"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.xla_flags import set_cpu_defaults  # noqa: E402  (the XLA flags run.py uses)

set_cpu_defaults()

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

# Persistent XLA cache: the many small models built by tests compile once per machine, not per test.
import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(os.path.expanduser('~'), '.cache', 'lmlab', 'jax-tests'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
