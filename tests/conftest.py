"""Test session setup: 8 simulated CPU devices (must be set before JAX is imported), so data-parallel steps
are checked against the single-device step in the same process. Single-device tests pass parallel="none"."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_NETWORK", "1")
# Most of the suite's time is XLA compiling the same small programs again (every fit, every CLI run builds its
# own jitted steps). JAX's persistent compilation cache, shared by the test processes and the subprocesses they
# start, compiles each distinct program once; entries are keyed by the program and the jax version, so a stale
# entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "alignq_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
