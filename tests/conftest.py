"""Test-wide setup: 8 forced CPU devices (sharding tests), f32 matmul precision, shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

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
