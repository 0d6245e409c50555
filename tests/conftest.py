"""Test-wide setup: 8 forced CPU devices (sharding tests), f32 matmul precision, shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import tempfile

# Many tests (and the CLI runs they start in subprocesses, which inherit these) compile the same programs: one
# persistent XLA compilation cache shared by the pytest-xdist workers compiles each of them once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / f"kvjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

# The library never looks beside the repository for data; tests and CI point it at ../shared/data when it exists.
if (SHARED / "data").is_dir():
    os.environ.setdefault("KVJAX_DATA", str(SHARED / "data"))


@pytest.fixture(scope="session")
def shared_dir():
    """../shared beside the checkout (real benchmark data, HIGGS grids); tests that need it skip when absent."""
    if not SHARED.exists():
        pytest.skip("../shared is not present")
    return SHARED
