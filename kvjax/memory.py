"""Device memory: what a compiled program needs (XLA's compiled memory analysis) and clear out-of-memory errors.

:func:`program_memory` reads ``Compiled.memory_analysis()`` of a jitted function on given (abstract) arguments and
splits it into the numbers ``kvjax bench memory`` reports: ``peak_device_bytes`` = device arguments + temporaries +
device outputs, with the model weights excluded (they are reported apart as ``weights_bytes``), and ``host_bytes``
= arguments and outputs placed in host memory. XLA:CPU reports every buffer as device memory (its ``host_*``
fields are 0), so host placement is taken from the arguments' and outputs' shardings (``memory_kind``), which is
what the accelerator backends honour.

:func:`explain_oom` turns an out-of-memory failure of a stage (prefill, decode) into one error naming the stage,
the bytes the program needs and the bytes the device has.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

from .compat import DEVICE_MEMORY_KIND


#: XLA:CPU passes that upcast bfloat16 to float32 (bf16 arithmetic; the operands of a bf16 x bf16 -> f32 dot), which
#: accelerators do not: a bfloat16 program compiled on CPU for its memory analysis would show float32 copies of
#: every bf16 buffer (the KV cache, the weights, the LM head) that no TPU/GPU program has.
#: :func:`native_bf16_analysis` disables them for compile-only analyses.
CPU_BF16_UPCAST_PASSES = "float-normalization-bf16,operand_upcaster"


def native_bf16_analysis() -> bool:
    """Make XLA:CPU compile bfloat16 as bfloat16 for this process (disables :data:`CPU_BF16_UPCAST_PASSES` through
    ``XLA_FLAGS``). Only for compile-only memory analysis (the programs are never run), and only before the CPU
    backend starts (the flags are read once); returns whether it is in effect."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_BF16_UPCAST_PASSES in flags:
        return True
    try:
        from jax._src import xla_bridge

        if xla_bridge._backends:  # the backend exists already: too late to change its flags
            return False
    except (ImportError, AttributeError):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes={CPU_BF16_UPCAST_PASSES}".strip()
    return True


def tree_bytes(tree, kind: str | None = None) -> int:
    """Bytes of the array / ShapeDtypeStruct leaves of ``tree`` (only those in memory ``kind`` when given; a leaf
    without a sharding counts as device memory)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if kind is not None and leaf_kind(x) != kind:
            continue
        total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def leaf_kind(x) -> str:
    """Memory kind of an array / ShapeDtypeStruct ("device" when it has no sharding or kind)."""
    sh = getattr(x, "sharding", None)
    return (getattr(sh, "memory_kind", None) or DEVICE_MEMORY_KIND) if sh is not None else DEVICE_MEMORY_KIND


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Memory of one compiled program, bytes. ``peak_device_bytes`` excludes the weights (``weights_bytes``)."""

    peak_device_bytes: int
    weights_bytes: int
    host_bytes: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int


def program_memory(jitted, args: tuple, weights=None, out_shapes=None) -> ProgramMemory:
    """Compile ``jitted`` for ``args`` (arrays or ShapeDtypeStructs with shardings; nothing runs) and split XLA's
    memory analysis into device / host / weights bytes. ``weights`` is the sub-tree of ``args`` holding the model
    weights; ``out_shapes`` the output tree with shardings (``jitted.eval_shape`` when not given) for host placement.
    """
    compiled = jitted.trace(*args).lower().compile()
    ma = compiled.memory_analysis()
    if out_shapes is None:
        out_shapes = jax.eval_shape(jitted, *args)
        out_sh = compiled.output_shardings
        out_shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), out_shapes, out_sh)
    w = tree_bytes(weights) if weights is not None else 0
    arg_host = tree_bytes(args, "pinned_host") + tree_bytes(args, "unpinned_host")
    out_host = tree_bytes(out_shapes, "pinned_host") + tree_bytes(out_shapes, "unpinned_host")
    arg_dev = int(ma.argument_size_in_bytes) - arg_host - w
    out_dev = int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes) - out_host
    temp = int(ma.temp_size_in_bytes)
    # host buffers: a donated input and the output it becomes are one buffer (decode's host stores)
    host = max(arg_host, out_host) if int(ma.alias_size_in_bytes) else arg_host + out_host
    return ProgramMemory(peak_device_bytes=max(arg_dev, 0) + temp + max(out_dev, 0), weights_bytes=w,
                         host_bytes=host, argument_bytes=int(ma.argument_size_in_bytes),
                         temp_bytes=temp, output_bytes=int(ma.output_size_in_bytes))


class DeviceMemoryError(MemoryError):
    """A stage ran out of device memory; the message names the stage and the bytes needed and available."""


def device_bytes_available() -> int | None:
    """Free bytes on the first device (``bytes_limit - bytes_in_use``), None where the backend does not say."""
    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if "bytes_limit" not in st:
        return None
    return int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))


def _is_oom(e: BaseException) -> bool:
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


@contextlib.contextmanager
def explain_oom(stage: str, jitted, *args):
    """Re-raise an out-of-memory failure inside the block as :class:`DeviceMemoryError` naming ``stage``, the bytes
    the program ``jitted(*args)`` needs (its compiled memory analysis) and the bytes the device has free."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only OOMs are translated, everything else re-raised as is
        if not _is_oom(e):
            raise
        try:
            ma = jitted.trace(*args).lower().compile().memory_analysis()
            need = int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes +
                       ma.temp_size_in_bytes)
            need_s = f"{need / 2**30:.2f} GiB ({need} bytes: arguments incl. weights + temporaries + outputs)"
        except Exception:  # noqa: BLE001
            need_s = "unknown"
        avail = device_bytes_available()
        avail_s = f"{avail / 2**30:.2f} GiB" if avail is not None else "unknown"
        raise DeviceMemoryError(f"out of device memory during {stage}: the program needs {need_s}, the device has "
                                f"{avail_s} free; use a smaller batch or prompt, an offloading policy, or "
                                f"Engine(offload_hidden=True) for prefill") from e


def abstract_params(mcfg, dtype, mesh=None) -> dict:
    """The model's parameters as ShapeDtypeStructs (nothing allocated), sharded as a loaded model is."""
    from models.transformer import param_partition_specs, param_shapes

    from .compat import DEVICE_MEMORY_KIND as kind

    specs = param_partition_specs(mcfg)
    out = {}
    for name, shape in param_shapes(mcfg).items():
        sh = (jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind) if mesh is None else
              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*specs[name]), memory_kind=kind))
        out[name] = jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype), sharding=sh)
    return out


def _abstract_prefill(mcfg, policy, prompt_tokens: int, batch: int, dtype, max_new: int, chunk: int,
                      offload_hidden: bool):
    """The prefill of :func:`stage_memory` on abstract inputs: ``(mcfg, run, args, state, shardings)`` with
    ``run(*args)`` the prefill function (its context raised to fit the prompt), ``state`` the policy state it
    builds as ShapeDtypeStructs with their shardings (``jax.eval_shape``: traced, nothing compiled) and
    ``shardings`` that state's sharding tree."""
    import functools

    import jax.numpy as jnp

    from . import cache as cache_mod
    from . import prefill as prefill_mod
    from .compat import HOST_MEMORY_KIND
    from .engine import generation_bucket
    from .policies.base import bucket_size

    mcfg = mcfg.replace(max_position_embeddings=max(mcfg.max_position_embeddings, prompt_tokens + max_new))
    Tb = bucket_size(prompt_tokens, 128)
    gb = generation_bucket(max_new)
    params = abstract_params(mcfg, dtype)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    host = dev.with_memory_kind(HOST_MEMORY_KIND)
    # the embedded prompt, in host memory (and donated) with offload_hidden, as the engine passes it
    x = jax.ShapeDtypeStruct((batch, Tb, mcfg.hidden_size), jnp.dtype(dtype), sharding=host if offload_hidden else dev)
    lens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dev)
    extra = policy.prepare_shapes(mcfg, jnp.dtype(dtype))
    fn = functools.partial(prefill_mod.prefill_hidden, cfg=mcfg, policies=(policy,), max_new=gb,
                           chunk=min(chunk, Tb), hidden_on_host=offload_hidden)
    run = lambda p, x, l, e: fn(p, x=x, lengths=l, extras=(e,))  # noqa: E731
    _, (abstract,) = jax.eval_shape(run, params, x, lens, extra)
    shard = cache_mod.state_shardings(abstract, None, mcfg, policy)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    return mcfg, run, (params, x, lens, extra), state, shard


def stage_memory(mcfg, policy, prompt_tokens: int, batch: int, dtype="bfloat16", max_new: int = 64,
                 chunk: int = 512, offload_hidden: bool = False) -> dict[str, ProgramMemory]:
    """Compiled memory of the two stages of a run, from abstract inputs only (compile, no allocation):
    ``"prefill"`` (the layer-by-layer prefill that builds the policy state, :func:`kvjax.prefill.prefill`) and
    ``"decode"`` (one decode step, :func:`kvjax.decode.decode_step`, state donated). The prompt bucket is
    ``prompt_tokens`` rounded up to a power of two, as the engine pads."""
    from . import decode as decode_mod
    from . import prefill as prefill_mod

    mcfg, run, args, state, shard = _abstract_prefill(mcfg, policy, prompt_tokens, batch, dtype, max_new, chunk,
                                                      offload_hidden)
    params, _, lens, _ = args
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pre = jax.jit(run, out_shardings=(dev, (shard,)), donate_argnums=(1,) if offload_hidden else ())
    out = {"prefill": program_memory(pre, args, weights=params)}

    def step(p, st, tok, pos):
        st = prefill_mod.place_host_fields(policy, st)  # a ShapeDtypeStruct input has a device aval (JAX 0.10)
        logits, st, _ = decode_mod.decode_step(p, mcfg, policy, st, tok, pos)
        return logits, st

    dec = jax.jit(step, donate_argnums=(1,), out_shardings=(dev, shard))
    out["decode"] = program_memory(dec, (params, state, lens, lens), weights=params)
    return out


def state_memory(mcfg, policy, prompt_tokens: int, batch: int = 1, dtype="bfloat16", max_new: int = 64,
                 chunk: int = 512) -> dict:
    """The analytic estimate beside :func:`stage_memory`: the policy's ``memory_report`` on the state the prefill
    builds for ``batch`` prompts of ``prompt_tokens`` tokens (traced with ``jax.eval_shape``: nothing compiled or
    allocated) and the weights' bytes. Activations and XLA temporaries are not included, so it is a lower bound
    of the device peak. Returns ``{"device_bytes", "host_bytes", "weights_bytes", "report"}`` (bytes; host =
    every non-device memory kind)."""
    _, _, args, state, _ = _abstract_prefill(mcfg, policy, prompt_tokens, batch, dtype, max_new, chunk, False)
    rep = policy.memory_report(state, [prompt_tokens] * batch)
    kinds = rep["by_kind"]
    return {"device_bytes": int(kinds.get(DEVICE_MEMORY_KIND, 0)),
            "host_bytes": int(sum(v for k, v in kinds.items() if k != DEVICE_MEMORY_KIND)),
            "weights_bytes": tree_bytes(args[0]), "report": rep}


__all__ = ["CPU_BF16_UPCAST_PASSES", "DeviceMemoryError", "ProgramMemory", "abstract_params", "native_bf16_analysis", "device_bytes_available", "explain_oom",
           "leaf_kind", "program_memory", "stage_memory", "state_memory", "tree_bytes"]
