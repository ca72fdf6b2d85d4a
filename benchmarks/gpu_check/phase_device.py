"""Phase 1, ``device``: GPU facts (or the CPU's thread count) and two ceilings: bf16 matmul FLOP/s (the
MFU denominator of the later phases) and device-to-device copy bytes/s."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch

from benchmarks.gpu_check.context import Context


def timed(ctx: Context, function: Callable[[], Any], reps: int) -> float:
    """Seconds per call of ``function`` over ``reps`` calls, synchronised."""
    ctx.sync()
    start = time.perf_counter()
    for _ in range(reps):
        function()
    ctx.sync()
    return (time.perf_counter() - start) / reps


def phase_device(ctx: Context) -> None:
    rec, s = ctx.rec, ctx.sizes
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        name = props.name
        rec.data["meta"]["gpu"] = {"name": name, "capability": f"{props.major}.{props.minor}",
                                   "multiprocessors": props.multi_processor_count,
                                   "memory_gib": props.total_memory / 2**30,
                                   "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda}
        rec.add("device", "GPU memory", props.total_memory / 2**30, "GiB", f"{name}, sm {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        name = platform.processor() or platform.machine()
        rec.add("device", "CPU threads", torch.get_num_threads(), "threads", f"no CUDA: {name}")
    n = s.matmul_n
    with rec.attempt("device", "bf16 matmul"):
        a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
        timed(ctx, lambda: a @ b, 2)
        rates = [2 * n**3 / timed(ctx, lambda: a @ b, s.matmul_reps) for _ in range(s.matmul_trials)]
        ctx.matmul_flops = max(rates)
        rec.add("device", f"bf16 matmul {n}^3 (best of {s.matmul_trials})", ctx.matmul_flops / 1e12, "TFLOP/s",
                f"median {statistics.median(rates) / 1e12:.4g}; the MFU denominator")
        del a, b
    with rec.attempt("device", "device copy"):
        src = torch.empty(s.copy_mib * 2**20, dtype=torch.uint8, device=ctx.device).fill_(1)
        dst = torch.empty_like(src)
        timed(ctx, lambda: dst.copy_(src), 2)
        seconds = min(timed(ctx, lambda: dst.copy_(src), 5) for _ in range(3))
        rec.add("device", f"device-to-device copy {s.copy_mib} MiB", 2 * src.numel() / seconds / 1e9, "GB/s",
                "read + write bytes")
        del src, dst
    ctx.free()
