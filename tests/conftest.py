"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import xla_flags  # noqa: E402  (imports no jax)

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from train.xla_flags import set_cpu_defaults  # noqa: E402  (the XLA flags run.py uses)

set_cpu_defaults()

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

# Persistent XLA cache: the many small models built by tests compile once per machine, not per test.
# Set through the environment so the run.py subprocesses of the end-to-end tests share it too (a
# killed run and its restart compile the same step once). jax reads them when it is first imported.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.expanduser('~'), '.cache', 'lmlab', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
