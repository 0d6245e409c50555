"""JAX version shims (kvjax supports jax>=0.10.2): compute_on, memory spaces, meshes, host memory kind.

- ``compute_on``: in 0.10.2/0.11.0 ``jax.experimental.compute_on.compute_on`` is a context manager and
  ``compute_on2`` the function transform; at JAX HEAD ``compute_on2`` is gone and ``compute_on`` is the
  transform with a required ``out_memory_spaces``. :func:`on_host` always offers the transform form.
- ``jax.memory.Space`` replaced ``TransferToMemoryKind`` (removed Aug 2025).
- ``jax.make_mesh`` defaults to Explicit axes since 0.9; kvjax builds Auto meshes (sharding propagates
  from the inputs' NamedShardings) so the same code runs on one device and on a mesh.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

HOST_MEMORY_KIND = os.environ.get("KVJAX_HOST_MEMORY_KIND", "pinned_host")
DEVICE_MEMORY_KIND = "device"


def memory_space(kind: str):
    """``jax.memory.Space`` member for a memory kind name ("device", "pinned_host", "unpinned_host")."""
    space = jax.memory.Space
    return space.Device if kind == DEVICE_MEMORY_KIND else space.Host


def on_host(fn: Callable, out_device: bool = False) -> Callable:
    """Run ``fn`` as host compute (``compute_type="device_host"``); outputs stay in host memory unless
    ``out_device``. Works with both the 0.10/0.11 and the HEAD spelling of compute_on."""
    from jax.experimental import compute_on as co

    out_space = jax.memory.Space.Device if out_device else jax.memory.Space.Host
    transform = getattr(co, "compute_on2", None)
    if transform is not None:
        return transform(fn, compute_type="device_host", out_memory_spaces=out_space)

    def wrapped(*args):  # HEAD: compute_on is the transform
        return co.compute_on(fn, compute_type="device_host", out_memory_spaces=out_space)(*args)

    return wrapped


def host_context():
    """Context-manager form (0.10.2/0.11.0 ``compute_on("device_host")``); None where it no longer exists."""
    from jax.experimental import compute_on as co

    if getattr(co, "compute_on2", None) is not None:
        return co.compute_on("device_host")
    return None


def make_mesh(data: int = 1, model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh with Auto axes over the first ``data*model`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = data * model
    if n > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {n} devices; {len(devices)} available")
    arr = np.array(devices[:n]).reshape(data, model)
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(arr, ("data", "model"), axis_types=(auto, auto))


def supports_memory_kind(kind: str) -> bool:
    try:
        return any(m.kind == kind for m in jax.devices()[0].addressable_memories())
    except Exception:  # noqa: BLE001 - older runtimes
        return False
