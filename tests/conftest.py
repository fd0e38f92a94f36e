"""Test session setup: 8 simulated CPU devices (must be set before JAX is imported), so data-parallel steps
are checked against the single-device step in the same process. Single-device tests pass parallel="none"."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_NETWORK", "1")
