"""One time-boxed GPU session: ``python -m benchmarks.gpu_check [--out DIR] [--tiny] [--budget-s 420]``.

Four phases, each boxed so that the whole run (Python start included) ends within ``--budget-s``;
time a phase leaves unused goes to the later ones. Each result is printed when it is measured and
everything so far is written to ``DIR/gpu_check.json`` after every result, so a kill loses nothing.
The last thing printed is one markdown table of all results (also ``DIR/gpu_check.md``).

1. ``device``: GPU facts and two ceilings: bf16 matmul TFLOP/s (8192^3) and device copy GB/s.
2. ``train_step``: samples/s of forward + BCE + backward + RMSprop on random batches of the paper
   network (batch 4 as in the paper, 16 and 32) for fp32, bf16 autocast, + channels_last, RMSprop
   for-loop / foreach / fused, three ways to compute the 4x upsample + BCE tail, and torch.compile;
   MFU against the measured matmul rate, peak memory, and the largest batch that fits.
3. ``data``: synthetic data generated here (``--data-dir``), DataModule throughput with the device
   augmentation path for 4, 8 and 15 workers against the GPU step, and device against CPU decoding.
4. ``paper_run``: a short bf16-mixed ``pytorch_lightning.Trainer`` run of the paper config on that
   data; ``DIR/paper_run.ckpt`` (bf16 weights, readable by ``lightning_vrn.models.load_model``).
5. ``compile`` (not in the default ``--phases``): what the first session had no time for: cuDNN
   benchmark mode off against on, the whole network + loss under ``torch.compile`` (default mode) at
   batch 32 and the largest batch, and CUDA graphs (``mode="reduce-overhead"``) at the paper's batch 4.

Imports nothing that needs OmegaConf, Open3D or W&B (the GPU machine has none of them).
``--tiny`` runs every phase at a tiny size on the CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Mapping  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import median_ms  # noqa: E402
from lightning_vrn.atomic import write_text  # noqa: E402
from lightning_vrn.geometry.grid import VoxelGrid  # noqa: E402

PHASES = ("device", "train_step", "data", "paper_run", "compile")
DEFAULT_PHASES = PHASES[:4]
OPTIM = {"lr": 1e-4, "lr_after": 1e-5, "drop_epoch": 40}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # fallback if the module has no image_mean/std
# tests/test_datamodule.py::test_device_path_on_cuda_matches_cpu_path: rare float64 rounding ties only.
VOXEL_MISMATCH_TOL, IMAGE_ATOL = 1e-4, 1e-4


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the paper run on the GPU and ``--tiny`` on the CPU."""

    grid: str = "200,192,192"
    net: tuple = (("features", 256), ("stacks", 2), ("hourglass_depth", 4))
    batches: tuple = (4, 16, 32)
    max_batch_cap: int = 512
    warmup: int = 3
    steps: int = 10
    step_cap_s: float = 2.5          # timed steps of one setting stop after this (at least 3 steps)
    config_min_s: float = 6.0        # a setting starts only with this much phase time left
    compile_min_s: float = 60.0      # torch.compile of the whole network starts only with this much left
    autotune_min_s: float = 200.0    # ... and max-autotune-no-cudagraphs only with this much
    autotune: bool = True
    compile_backend: str = "inductor"
    loss_chunks: int = 8
    matmul_n: int = 8192
    matmul_reps: int = 20
    matmul_trials: int = 5
    copy_mib: int = 1024
    test_samples: int = 64
    train_samples: tuple = (400, 800)  # sized to the time left, within these bounds (1500 left no time for the loader)
    loader_workers: tuple = (4, 8, 15)
    loader_s: float = 6.0
    loader_reserve_s: float = 40.0   # phase-3 time kept for the loader and augmentation measurements
    run_batch: int = 4               # the paper's batch for the Trainer run
    run_max_s: float = 240.0
    run_max_steps: int = -1
    run_after_s: float = 25.0        # Trainer set-up, test pass, checkpoint and reload after max_time
    reserves: tuple = (("device", 10), ("train_step", 170), ("data", 75), ("paper_run", 145), ("compile", 300))
    compile_batches: tuple = (32, 256)  # whole-network compile; CUDA graphs run at batches[0]
    margin_s: float = 10.0


PAPER = Sizes()
TINY = Sizes(grid="50,48,48", net=(("features", 16), ("stacks", 2), ("hourglass_depth", 2)), batches=(2, 4),
             max_batch_cap=16, warmup=1, steps=2, step_cap_s=0.5, config_min_s=0.0, compile_min_s=0.0,
             autotune=False, compile_backend="aot_eager", loss_chunks=4, matmul_n=256, matmul_reps=2,
             matmul_trials=2, copy_mib=16, test_samples=4, train_samples=(12, 12), loader_workers=(0, 2),
             loader_s=1.0, loader_reserve_s=0.0, run_batch=2, run_max_s=8.0, run_max_steps=6, run_after_s=0.0,
             compile_batches=(2, 4))


class PhaseTimeout(BaseException):
    """A phase ran past its hard limit (BaseException: per-setting handlers let it through)."""


@contextlib.contextmanager
def hard_limit(seconds: float | None):
    """Raise :class:`PhaseTimeout` in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise PhaseTimeout(f"ran past its hard limit ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _plain(value: Any) -> Any:
    """JSON- and pickle-friendly copy: mappings -> dict, tuples -> list, tensors and numpy -> numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class Recorder:
    """Results as rows ``(phase, name, value, unit, note, extra)``; prints each and rewrites the JSON each time."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "phases": {}, "rows": [], "skipped": []}

    def add(self, phase: str, name: str, value: float, unit: str, note: str = "", **extra: Any) -> float:
        value = float(value)
        self.data["rows"].append({"phase": phase, "name": name, "value": value, "unit": unit, "note": note,
                                  "extra": _plain(extra)})
        print(f"[{phase}] {name}: {value:.4g} {unit}" + (f" ({note})" if note else ""), flush=True)
        self.save()
        return value

    def skip(self, phase: str, name: str, reason: str) -> None:
        self.data["skipped"].append({"phase": phase, "name": name, "reason": reason})
        print(f"[{phase}] {name}: skipped: {reason}", flush=True)
        self.save()

    @contextlib.contextmanager
    def attempt(self, phase: str, name: str):
        """Run one measurement; an Exception is recorded as a skip and the phase goes on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001: one failed measurement must not end the session
            print("".join(traceback.format_exception(type(error), error, error.__traceback__)[-4:]), end="")
            self.skip(phase, name, f"{type(error).__name__}: {str(error)[:300]}")

    def rows(self, phase: str | None = None) -> list[dict]:
        return [row for row in self.data["rows"] if phase is None or row["phase"] == phase]

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - START, 2)
        write_text(self.out / "gpu_check.json", json.dumps(self.data, indent=1, allow_nan=True) + "\n")

    def table(self) -> str:
        lines = ["| phase | measurement | value | unit | notes |", "|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['name']} | {r['value']:.4g} | {r['unit']} | {r['note']} |" for r in self.rows()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Variant:
    """One training-step setting: precision, memory format, optimiser arguments, how the loss tail runs."""

    name: str
    bf16: bool = True
    channels_last: bool = True
    optim: tuple = (("foreach", True),)
    tail: str = "eager"     # eager | contiguous | chunked | compiled | compiled_net
    mode: str = "default"   # torch.compile mode for tail == "compiled_net"

    @property
    def uint8_target(self) -> bool:
        """Chunked and compiled tails take the uint8 volume (4x fewer bytes) and cast it inside."""
        return self.tail in ("chunked", "compiled", "compiled_net")


EAGER_VARIANTS = (
    Variant("fp32", bf16=False, channels_last=False),
    Variant("bf16", channels_last=False),
    Variant("bf16+CL"),
    Variant("bf16+CL, RMSprop for-loop", optim=(("foreach", False),)),
    Variant("bf16+CL, RMSprop fused", optim=(("fused", True),)),
    Variant("bf16+CL, contiguous low-res logits", tail="contiguous"),
)
CHUNKED_TAIL = Variant("bf16+CL, chunked checkpointed tail", tail="chunked")
EAGER_VARIANTS += (CHUNKED_TAIL,)
COMPILED_TAIL = Variant("bf16+CL, compiled tail", tail="compiled")
COMPILED_NET = Variant("bf16+CL, compiled net+loss", tail="compiled_net")


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    grid: VoxelGrid
    rec: Recorder
    reserves: dict
    end: float
    matmul_flops: float | None = None      # measured bf16 matmul FLOP/s
    train_flops_per_sample: float | None = None
    rates: dict = field(default_factory=dict)     # (variant name, batch) -> samples/s
    peaks: dict = field(default_factory=dict)     # (variant name, batch) -> peak GiB (CUDA)
    module: Any = None                            # the LightningModule whose .net phase 2 times
    compiled: dict = field(default_factory=dict)  # variant name -> compiled callable
    best_workers: int | None = None
    train_path: Path | None = None
    test_path: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def net_settings(self) -> dict:
        return dict(self.sizes.net)

    def deadline(self, phase: str) -> float:
        """End of ``phase``: the session's end less the margin and the time reserved for the later phases."""
        later = [p for p in PHASES[PHASES.index(phase) + 1:] if p in self.reserves]
        return self.end - self.sizes.margin_s - sum(self.reserves[p] for p in later)

    def left(self, phase: str) -> float:
        return self.deadline(phase) - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def to_device(self, batch: Any) -> Any:
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {key: self.to_device(value) for key, value in batch.items()}
        return batch

    def build_model(self):
        from lightning_vrn.models import build_model

        return build_model("vrn", grid=self.grid.to_dict(), net=self.net_settings, optim=dict(OPTIM))


# ----- phase 1: device ---------------------------------------------------------------------------------

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


# ----- phase 2: training step --------------------------------------------------------------------------

def low_res_logits(net, x: torch.Tensor) -> torch.Tensor:
    """VRNNet up to the head's 1x1 conv: ``(B, D, S/4, S/4)`` logits before the bilinear x4."""
    return net.head.conv(net.hourglasses(net.stem(x)))


def _bce_sum(low: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    logits = F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)
    return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum")


def chunked_bce(low: torch.Tensor, target: torch.Tensor, size: tuple[int, int], chunks: int) -> torch.Tensor:
    """Mean BCE of the bilinear x4 of ``low`` against ``target``, over depth chunks, each recomputed in backward.

    Bilinear upsampling is per channel, so the chunks are exact; no full-size logits are kept.
    """
    total = sum(checkpoint(_bce_sum, lo, t, size, use_reentrant=False)
                for lo, t in zip(low.chunk(chunks, dim=1), target.chunk(chunks, dim=1)))
    return total / target.numel()


def tail_mean_bce(low: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The loss tail in one function (what the compiled-tail variant compiles): mean BCE of the x4 upsample."""
    return _bce_sum(low, target, size) / target.numel()


def loss_function(ctx: Context, net, variant: Variant) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(image in [0, 1], target) -> mean BCE`` for ``variant``; compiled functions are cached per variant."""
    mean = getattr(ctx.module, "image_mean", torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)).to(ctx.device)
    std = getattr(ctx.module, "image_std", torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)).to(ctx.device)
    size = (ctx.grid.height, ctx.grid.width)

    def whole(image, target):  # the suite's path: VRNNet (bilinear inside) then BCE on the logits
        return F.binary_cross_entropy_with_logits(net((image - mean) / std).float(), target.float())

    if variant.tail == "eager":
        return lambda image, target: F.binary_cross_entropy_with_logits(net((image - mean) / std), target)
    if variant.tail == "contiguous":
        def contiguous(image, target):
            low = low_res_logits(net, (image - mean) / std).contiguous()
            return F.binary_cross_entropy_with_logits(F.interpolate(low, size=size, mode="bilinear",
                                                                    align_corners=False), target)
        return contiguous
    if variant.tail == "chunked":
        return lambda image, target: chunked_bce(low_res_logits(net, (image - mean) / std), target, size,
                                                 ctx.sizes.loss_chunks)
    if variant.tail == "compiled":
        if variant.name not in ctx.compiled:
            ctx.compiled[variant.name] = torch.compile(tail_mean_bce, backend=ctx.sizes.compile_backend)
        tail = ctx.compiled[variant.name]

        def compiled_tail(image, target):
            low = low_res_logits(net, (image - mean) / std)
            with torch.autocast(ctx.device.type, enabled=False):
                return tail(low.float().contiguous(), target, size)
        return compiled_tail
    if variant.tail == "compiled_net":
        if variant.name not in ctx.compiled:
            options = {} if ctx.sizes.compile_backend != "inductor" else {"mode": variant.mode}
            ctx.compiled[variant.name] = torch.compile(whole, backend=ctx.sizes.compile_backend, dynamic=False,
                                                       **options)
        return ctx.compiled[variant.name]
    raise ValueError(f"unknown tail {variant.tail!r}")


def make_batch(ctx: Context, batch: int, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image ``(B, 3, H, W)`` in [0, 1] and binary target ``(B, D, H, W)`` (uint8 or float32)."""
    image = torch.rand(batch, 3, ctx.grid.height, ctx.grid.width, device=ctx.device)
    if variant.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 2, (batch, *ctx.grid.shape), dtype=torch.uint8, device=ctx.device)
    return image, target if variant.uint8_target else target.float()


def time_setting(ctx: Context, net, variant: Variant, batch: int, warmup: int, steps: int) -> dict:
    """Median synchronised seconds per training step of ``variant`` at ``batch``; also first-step time, peak memory."""
    net.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    optimizer = torch.optim.RMSprop(net.parameters(), lr=OPTIM["lr"], alpha=0.99, eps=1e-8, **dict(variant.optim))
    loss_fn = loss_function(ctx, net, variant)
    image, target = make_batch(ctx, batch, variant)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)

    def step():
        if variant.mode == "reduce-overhead":  # a new CUDA-graph step: the last step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = loss_fn(image, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach().clone()

    first = timed(ctx, step, 1)
    for _ in range(warmup - 1):
        step()
    times, start = [], time.perf_counter()
    while len(times) < steps and (len(times) < 3 or time.perf_counter() - start < ctx.sizes.step_cap_s):
        ctx.sync()
        began = time.perf_counter()
        loss = step()
        ctx.sync()
        times.append(time.perf_counter() - began)
    loss = float(loss)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    return {"seconds": statistics.median(times), "first_s": first, "steps": len(times), "loss": loss,
            "peak_gib": peak}


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "ALLOC_FAILED" in str(error)))


def measure_setting(ctx: Context, net, variant: Variant, batch: int, label: str = "step",
                    warmup: int | None = None, steps: int | None = None, phase: str = "train_step") -> dict | None:
    """:func:`time_setting` and a result row (samples/s, ms/step, MFU, peak memory); None if skipped."""
    name = f"{label} {variant.name} b{batch}"
    if ctx.left(phase) < ctx.sizes.config_min_s:
        ctx.rec.skip(phase, name, "out of phase time")
        return None
    result, oom = None, False
    try:
        result = time_setting(ctx, net, variant, batch, ctx.sizes.warmup if warmup is None else warmup,
                              ctx.sizes.steps if steps is None else steps)
    except TypeError as error:  # e.g. RMSprop(fused=True) where torch has no fused RMSprop
        ctx.rec.skip(phase, name, f"unsupported: {error}")
    except Exception as error:  # noqa: BLE001
        oom = is_oom(error)
        if not oom:
            print("".join(traceback.format_exception(type(error), error, error.__traceback__)[-4:]), end="")
        ctx.rec.skip(phase, name, "out of memory" if oom else f"{type(error).__name__}: {str(error)[:300]}")
    ctx.free()
    if result is None:
        return {"oom": True} if oom else None
    rate = batch / result["seconds"]
    note = f"{1000 * result['seconds']:.1f} ms/step, median of {result['steps']}"
    extra = {"ms_per_step": 1000 * result["seconds"], "first_step_s": result["first_s"], "loss": result["loss"]}
    if ctx.train_flops_per_sample and ctx.matmul_flops:
        extra["mfu_percent"] = 100 * ctx.train_flops_per_sample * rate / ctx.matmul_flops
        note += f", MFU {extra['mfu_percent']:.1f}%"
    if result["peak_gib"] is not None:
        extra["peak_gib"] = result["peak_gib"]
        note += f", peak {result['peak_gib']:.2f} GiB"
    if variant.tail.startswith("compiled"):
        note += f", first step (compile) {result['first_s']:.1f} s"
    ctx.rec.add(phase, name, rate, "samples/s", note, **extra)
    if label == "step":
        ctx.rates[(variant.name, batch)] = rate
        ctx.peaks[(variant.name, batch)] = result["peak_gib"]
    return {**result, "rate": rate}


def check_tail(ctx: Context, variant: Variant, batch: int) -> None:
    """Loss and gradient of ``variant``'s tail against the plain interpolate + BCE, on the same low-res logits."""
    size = (ctx.grid.height, ctx.grid.width)
    low = torch.randn(batch, ctx.grid.depth, ctx.grid.height // 4, ctx.grid.width // 4, device=ctx.device) * 4
    low.requires_grad_(True)
    target = torch.randint(0, 2, (batch, *ctx.grid.shape), dtype=torch.uint8, device=ctx.device)
    reference = tail_mean_bce(low, target, size)
    (grad_ref,) = torch.autograd.grad(reference, low)
    if variant.tail == "chunked":
        value = chunked_bce(low, target, size, ctx.sizes.loss_chunks)
    else:
        value = ctx.compiled[variant.name](low, target, size)
    (grad,) = torch.autograd.grad(value, low)
    loss_error = abs(value.item() - reference.item()) / abs(reference.item())
    grad_error = float((grad - grad_ref).abs().max() / grad_ref.abs().max())
    ctx.rec.add("train_step", f"tail check {variant.name}: loss relative error", loss_error, "",
                f"gradient max error {grad_error:.2e} of max |grad|; fp32, against interpolate + BCE",
                grad_error=grad_error)


def count_flops(ctx: Context, net, phase: str) -> None:
    """Record the forward FLOPs per sample (and set ``ctx.train_flops_per_sample`` = 3x, for the MFU)."""
    x = torch.rand(2, 3, ctx.grid.height, ctx.grid.width, device=ctx.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        logits_dtype = str(net(x).dtype).replace("torch.", "")
    forward = counter.get_total_flops() / 2
    ctx.train_flops_per_sample = 3 * forward
    params = sum(p.numel() for p in net.parameters())
    ctx.rec.add(phase, "forward FLOPs per sample", forward / 1e9, "GFLOP",
                f"{params / 1e6:.2f} M parameters; training ~3x = {3 * forward / 1e9:.1f} GFLOP; "
                f"bf16-autocast logits are {logits_dtype}", parameters=params, autocast_logits_dtype=logits_dtype)


def phase_train_step(ctx: Context) -> None:
    rec, s = ctx.rec, ctx.sizes
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    model = ctx.build_model()
    ctx.module = model.to(ctx.device)
    net = model.net.train()
    with rec.attempt("train_step", "forward FLOPs"):
        count_flops(ctx, net, "train_step")
    for variant in EAGER_VARIANTS:
        for batch in s.batches:
            measure_setting(ctx, net, variant, batch)
    for batch in s.batches:
        measure_setting(ctx, net, COMPILED_TAIL, batch)
    for variant in (CHUNKED_TAIL, COMPILED_TAIL):
        if variant.tail == "chunked" or variant.name in ctx.compiled:
            with rec.attempt("train_step", f"tail check {variant.name}"):
                check_tail(ctx, variant, min(s.batches))
    largest_batch_search(ctx, net)
    largest = max(s.batches)
    if ctx.left("train_step") >= s.compile_min_s:
        measure_setting(ctx, net, COMPILED_NET, largest)
    else:
        rec.skip("train_step", f"step {COMPILED_NET.name} b{largest}",
                 f"{ctx.left('train_step'):.0f} s of phase time left, compiling needs ~{s.compile_min_s:.0f}")
    autotune = replace(COMPILED_NET, name="bf16+CL, compiled net+loss max-autotune-no-cudagraphs",
                       mode="max-autotune-no-cudagraphs")
    if s.autotune and ctx.left("train_step") >= s.autotune_min_s:
        measure_setting(ctx, net, autotune, largest)
    else:
        rec.skip("train_step", f"step {autotune.name} b{largest}", "not with --tiny" if not s.autotune else
                 f"{ctx.left('train_step'):.0f} s of phase time left, max-autotune needs ~{s.autotune_min_s:.0f}")
    ctx.module = None
    del model, net
    ctx.free()


def best_variant(ctx: Context, batch: int, names: list[str] | None = None) -> str | None:
    """Name of the fastest measured setting at ``batch`` (among ``names`` when given)."""
    rates = {v: r for (v, b), r in ctx.rates.items() if b == batch and (names is None or v in names)}
    return max(rates, key=rates.get) if rates else None


def largest_batch_search(ctx: Context, net) -> None:
    """Double the batch of the fastest setting at the largest measured batch until it does not fit (or the cap)."""
    s, largest = ctx.sizes, max(ctx.sizes.batches)
    variants = {v.name: v for v in (*EAGER_VARIANTS, COMPILED_TAIL)}
    name = best_variant(ctx, largest, list(variants))
    if name is None:
        ctx.rec.skip("train_step", "largest batch", "no setting was measured")
        return
    fits = [(largest, ctx.rates[(name, largest)], ctx.peaks.get((name, largest)))]
    batch, stop = 2 * largest, f"{2 * largest} is over the cap {s.max_batch_cap}"
    while batch <= s.max_batch_cap:
        result = measure_setting(ctx, net, variants[name], batch, label="larger batch", warmup=1, steps=2)
        if not result or result.get("oom"):
            stop = f"{batch} {'did not fit' if result else 'was skipped or failed'}"
            break
        fits.append((batch, result["rate"], result["peak_gib"]))
        batch *= 2
        stop = f"{batch} is over the cap {s.max_batch_cap}"
    batch, rate, peak = fits[-1]
    note = f"{name}, {rate:.0f} samples/s; {stop}"
    extra = {"variant": name, "samples_per_s": rate, **({"peak_gib": peak} if peak is not None else {})}
    measured = [(b, p) for b, _, p in fits if p is not None]
    per_sample = (measured[-1][1] - measured[-2][1]) / (measured[-1][0] - measured[-2][0]) if len(measured) > 1 else 0
    if ctx.cuda and per_sample > 0:
        b2, p2 = measured[-1]
        total = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
        extra.update(gib_per_sample=per_sample, predicted_max_batch=int((total - (p2 - per_sample * b2)) / per_sample))
        note += f"; {1024 * per_sample:.0f} MiB per sample -> about {extra['predicted_max_batch']} would fit"
    ctx.rec.add("train_step", "largest batch that fits (doubling)", batch, "samples", note, **extra)


# ----- phase 3: data -----------------------------------------------------------------------------------

def generate(ctx: Context, split: str, count: int, workers: int) -> tuple[Path, float | None]:
    """``generate_split`` into the data folder; returns the path and samples/s (None if the file existed)."""
    from data_prep.synthetic import generate_split

    path = Path(ctx.args.data_dir) / f"{split}-{count}.h5"
    existed = path.exists()
    start = time.perf_counter()
    generate_split(path, "builtin", ctx.grid, count, seed=0, split=split, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    ctx.rec.data.setdefault("data", {})[split] = {
        "path": str(path), "num_samples": count, "seed": 0, "split": split, "grid": ctx.sizes.grid,
        "face_model": "builtin", "reused": existed,
        "regenerate": f"python -m data_prep.synthetic --out DIR --split {split}={count} --seed 0 "
                      f"--grid {ctx.sizes.grid}"}
    return path, None if existed else count / seconds


def existing_data(ctx: Context) -> None:
    """Files of an earlier run in the data folder (for ``--phases`` without ``data``)."""
    folder = Path(ctx.args.data_dir)
    for split in ("train", "test"):
        if getattr(ctx, f"{split}_path") is None:
            found = sorted(folder.glob(f"{split}-*.h5"), key=lambda p: int(p.stem.split("-")[1]))
            if found:
                setattr(ctx, f"{split}_path", found[-1])


def datamodule(ctx: Context, batch: int, workers: int, test: bool = False):
    from datamodules.datamodule import FaceVolumeDataModule

    return FaceVolumeDataModule(train_path=ctx.train_path, test_path=ctx.test_path if test else None,
                                grid=ctx.grid.to_dict(), batch_size=batch, num_workers=workers,
                                augment={"enabled": True, "on_device": True}, seed=0, pin_memory=True,
                                persistent_workers=workers > 0, eval_vertices=False)


def loader_rate(ctx: Context, batch: int, workers: int) -> tuple[float, float]:
    """Samples/s of the train loader + ``on_after_batch_transfer`` on the device (after the first batch), startup s."""
    dm = datamodule(ctx, batch, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def batches():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    start = time.perf_counter()
    dm.on_after_batch_transfer(ctx.to_device(next(stream)), 0)
    ctx.sync()
    first = time.perf_counter()
    samples = 0
    while time.perf_counter() - first < ctx.sizes.loader_s:
        out = dm.on_after_batch_transfer(ctx.to_device(next(stream)), 0)
        samples += out["image"].shape[0]
    ctx.sync()
    rate = samples / (time.perf_counter() - first)
    stream.close()
    del stream, loader, dm, out
    gc.collect()
    return rate, first - start


def compare_loader(ctx: Context, batch: int, rate: float) -> str:
    best = best_variant(ctx, batch)
    if best is None:
        return "no GPU step measured at this batch"
    return f"{rate / ctx.rates[(best, batch)]:.2f}x the best GPU step ({best}, {ctx.rates[(best, batch)]:.0f}/s)"


def compare_decoding(ctx: Context) -> None:
    """Decode (unpack + augment) one raw batch of 8 on the CPU and on the device: agreement and time."""
    from torch.utils.data import default_collate

    from datamodules.dataset import FaceVolumeDataset, decode_batch

    dataset = FaceVolumeDataset(ctx.train_path, augment={"enabled": True, "on_device": True}, on_device=True)
    raw = default_collate([dataset.raw_sample(i) for i in range(min(8, len(dataset)))])
    cpu = decode_batch(raw, ctx.grid)
    moved = ctx.to_device(raw)
    dev = {k: v.cpu() if torch.is_tensor(v) else v for k, v in decode_batch(moved, ctx.grid).items()}
    mismatch = float((cpu["volume"] != dev["volume"]).float().mean())
    image_diff = float((cpu["image"] - dev["image"]).abs().max())
    landmark_diff = float((cpu["landmarks_2d"] - dev["landmarks_2d"]).abs().max())
    ok = mismatch < VOXEL_MISMATCH_TOL and image_diff <= IMAGE_ATOL
    n = raw["image_uint8"].shape[0]
    ctx.rec.add("data", f"device vs CPU decode of {n}: equal voxels", 1.0 - mismatch, "fraction",
                f"{'within' if ok else 'OUTSIDE'} the gpu test's tolerance (mismatch < {VOXEL_MISMATCH_TOL}, "
                f"image atol {IMAGE_ATOL}); device {ctx.device.type}", within_tolerance=ok, voxel_mismatch=mismatch)
    ctx.rec.add("data", f"device vs CPU decode of {n}: max image difference", image_diff, "",
                f"max landmark difference {landmark_diff:.2e} px", landmark_diff=landmark_diff)
    cpu_ms = median_ms(lambda: decode_batch(raw, ctx.grid), repeats=3)
    dev_ms = median_ms(lambda: (decode_batch(moved, ctx.grid), ctx.sync()), repeats=10, warmup=2)
    ctx.rec.add("data", f"decode + augment {n} samples on the {ctx.device.type}", dev_ms, "ms",
                f"CPU ({torch.get_num_threads()} threads): {cpu_ms:.0f} ms", cpu_ms=cpu_ms)


def phase_data(ctx: Context) -> None:
    rec, s = ctx.rec, ctx.sizes
    cores = os.cpu_count() or 1
    workers = cores if ctx.cuda else min(2, cores)
    test_workers = workers if ctx.cuda else 1  # --tiny: in-process, no pool to start
    ctx.test_path, rate = generate(ctx, "test", s.test_samples, test_workers)
    if rate:
        rec.add("data", f"generate test split ({s.test_samples}, {test_workers} workers)", rate, "samples/s",
                "includes starting the worker pool")
    existing_data(ctx)
    if ctx.train_path is not None:  # an earlier run's train split: reuse it
        count = int(ctx.train_path.stem.split("-")[1])
    else:  # size the train split to the time left (the test split's rate includes the pool start: pessimistic)
        low, high = s.train_samples
        count = int(min(high, max(low, (rate or 0) * (ctx.left("data") - s.loader_reserve_s))))
    ctx.train_path, rate = generate(ctx, "train", count, workers)
    if rate:
        rec.add("data", f"generate train split ({count}, {workers} workers)", rate, "samples/s",
                "samples written per second of generate_split, pool start included")
    else:
        rec.skip("data", "generate train split", f"reused {ctx.train_path}")
    large, rates = max(s.batches), {}
    for workers in s.loader_workers:
        if ctx.left("data") < s.loader_s + 5:
            rec.skip("data", f"loader {workers} workers", "out of phase time")
            continue
        with rec.attempt("data", f"loader {workers} workers b{large}"):
            rate, startup = loader_rate(ctx, large, workers)
            rates[workers] = rec.add("data", f"train loader + device augmentation, {workers} workers, b{large}", rate,
                                     "samples/s", f"{compare_loader(ctx, large, rate)}; first batch after "
                                     f"{startup:.1f} s", startup_s=startup)
    if rates:
        ctx.best_workers = max(rates, key=rates.get)
        if s.run_batch != large and ctx.left("data") > s.loader_s + 5:
            with rec.attempt("data", f"loader b{s.run_batch}"):
                rate, startup = loader_rate(ctx, s.run_batch, ctx.best_workers)
                rec.add("data", f"train loader + device augmentation, {ctx.best_workers} workers, b{s.run_batch}",
                        rate, "samples/s", compare_loader(ctx, s.run_batch, rate), startup_s=startup)
    with rec.attempt("data", "device vs CPU decoding"):
        compare_decoding(ctx)


# ----- phase 4: Trainer run ----------------------------------------------------------------------------

def save_checkpoint(model, path: Path) -> int:
    """``load_model``-readable checkpoint with bf16 floating tensors; returns its size in bytes."""
    import pytorch_lightning as pl

    from lightning_vrn.atomic import atomic_path

    state = {key: (value.detach().to("cpu", torch.bfloat16) if value.is_floating_point() else value.detach().cpu())
             .contiguous() for key, value in model.state_dict().items()}
    payload = {"variant": model.variant, "hyper_parameters": _plain(dict(model.hparams)), "state_dict": state,
               "pytorch-lightning_version": pl.__version__, "saved_by": "benchmarks.gpu_check"}
    model.on_save_checkpoint(payload)  # whatever this version of the module records (variant, settings)
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return path.stat().st_size


def test_pass(ctx: Context, model, batch: int) -> dict:
    """Mean BCE and voxel IoU (logit > 0) of ``model`` on the test split, bf16 autocast on the device."""
    dm = datamodule(ctx, batch, 0, test=True)
    dm.setup("test")
    bce, iou, count = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
        for raw in dm.test_dataloader():
            finished = dm.on_after_batch_transfer(ctx.to_device(raw), 0)
            logits = model(finished)["volume_logits"].float()
            target = finished["volume"] > 0.5
            n = target.shape[0]
            bce += float(F.binary_cross_entropy_with_logits(logits, target.float())) * n
            predicted = logits > 0
            union = (predicted | target).flatten(1).sum(1).clamp(min=1)
            iou += float(((predicted & target).flatten(1).sum(1) / union).sum())
            count += n
    return {"bce": bce / count, "iou": iou / count, "samples": count, "last_batch": finished}


def phase_paper_run(ctx: Context) -> None:
    import pytorch_lightning as pl

    rec, s = ctx.rec, ctx.sizes
    existing_data(ctx)
    if ctx.train_path is None or ctx.test_path is None:
        raise RuntimeError(f"no train/test files in {ctx.args.data_dir}: run the data phase first")
    batch = ctx.args.run_batch or s.run_batch
    workers = ctx.best_workers if ctx.best_workers is not None else min(8, os.cpu_count() or 1)
    channels_last = ctx.cuda
    if ("bf16+CL", batch) in ctx.rates and ("bf16", batch) in ctx.rates:
        channels_last = ctx.rates[("bf16+CL", batch)] > ctx.rates[("bf16", batch)]
    model = ctx.build_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    class StepLog(pl.Callback):
        def __init__(self):
            self.losses, self.times, self.samples = [], [], 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            self.losses.append(loss.detach().float())
            self.times.append(time.perf_counter())
            self.samples += batch["image"].shape[0]

    log = StepLog()
    max_time = min(s.run_max_s, ctx.left("paper_run") - s.run_after_s)
    if max_time < 5:
        raise RuntimeError(f"only {ctx.left('paper_run'):.0f} s left: no time to train")
    trainer = pl.Trainer(accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision="bf16-mixed",
                         max_time=timedelta(seconds=max_time), max_steps=s.run_max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, benchmark=ctx.cuda or None,
                         callbacks=[log], log_every_n_steps=50)
    dm = datamodule(ctx, batch, workers)
    print(f"[paper_run] Trainer: bf16-mixed, batch {batch}, {workers} workers, device augmentation, "
          f"channels_last {channels_last}, max_time {max_time:.0f} s", flush=True)
    path = Path(ctx.args.out) / "paper_run.ckpt"
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        wall = time.perf_counter() - start
        if log.losses:
            size = save_checkpoint(model, path)
            rec.add("paper_run", "checkpoint size", size / 2**20, "MiB", f"{path.name}, bf16 weights",
                    path=str(path), under_16_mib=size < 16 * 2**20)
    losses = torch.stack(log.losses).cpu()
    steps = len(losses)
    k = max(1, min(50, steps // 5))
    rate = (log.samples - k * batch) / (log.times[-1] - log.times[k - 1]) if steps > k else float("nan")
    rec.add("paper_run", "optimiser steps", trainer.global_step, "steps",
            f"batch {batch}, {trainer.current_epoch + 1} epoch(s) started, fit wall time {wall:.0f} s "
            f"(max_time {max_time:.0f} s)", fit_wall_s=wall, epochs=trainer.current_epoch + 1, batch=batch,
            channels_last=channels_last, workers=workers)
    rec.add("paper_run", "samples seen", log.samples, "samples", f"train split {ctx.train_path.name}")
    if math.isfinite(rate):
        rec.add("paper_run", "training throughput (after the first steps)", rate, "samples/s",
                f"steps {k}..{steps}; includes device augmentation and Lightning overhead")
    curve = [float(c.mean()) for c in losses.chunk(min(10, steps))]
    rec.add("paper_run", f"train loss, mean of the first {k} steps", float(losses[:k].mean()), "BCE")
    rec.add("paper_run", f"train loss, mean of the last {k} steps (final)", float(losses[-k:].mean()), "BCE",
            "loss curve in tenths: " + ", ".join(f"{v:.4f}" for v in curve), curve=curve)
    model = model.to(ctx.device)
    result = test_pass(ctx, model, batch)
    rec.add("paper_run", f"test BCE ({result['samples']} samples)", result["bce"], "BCE",
            f"no augmentation; {ctx.test_path.name}")
    rec.add("paper_run", f"test voxel IoU ({result['samples']} samples)", result["iou"], "IoU", "logit > 0")
    check_reload(ctx, model, path, result["last_batch"])


def check_reload(ctx: Context, model, path: Path, batch: dict) -> None:
    """Load the checkpoint with ``load_model`` on the CPU; compare its occupancy with the trained model's."""
    from lightning_vrn.models import load_model

    loaded = load_model(path)
    image = batch["image"][:1].float().cpu()
    with torch.no_grad():
        predicted = loaded.predict_step({"image": image})
        reference = torch.sigmoid(model.eval().float()(
            {"image": image.to(ctx.device)})["volume_logits"].float()).cpu()
    if tuple(predicted.shape) != (1, *ctx.grid.shape):
        raise ValueError(f"reloaded model predicts {tuple(predicted.shape)}, expected (1, {ctx.grid.shape})")
    agree = float(((predicted > 0.5) == (reference > 0.5)).float().mean())
    ctx.rec.add("paper_run", "reloaded bf16 checkpoint: occupancy agreement", agree, "fraction",
                f"load_model on the CPU vs the trained fp32 model, one test image; max |p| difference "
                f"{float((predicted - reference).abs().max()):.3f}")


# ----- phase 5: compile ---------------------------------------------------------------------------

BF16 = Variant("bf16", channels_last=False)
COMPILED_NET_NCHW = Variant("bf16, compiled net+loss", channels_last=False, tail="compiled_net")
CUDA_GRAPHS_FP32 = Variant("fp32, compiled net+loss, CUDA graphs", bf16=False, channels_last=False,
                           tail="compiled_net", mode="reduce-overhead")


def phase_compile(ctx: Context) -> None:
    """cuDNN benchmark off/on (eager bf16), the whole network + loss compiled (bf16, NCHW: channels_last
    was slower eager) at ``compile_batches``, and CUDA graphs in fp32 at the paper's batch (launch-bound)."""
    rec, s = ctx.rec, ctx.sizes
    model = ctx.build_model()
    ctx.module = model.to(ctx.device)
    net = model.net.train()
    with rec.attempt("compile", "forward FLOPs"):
        count_flops(ctx, net, "compile")
    small, large = s.compile_batches
    if ctx.cuda:
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            measure_setting(ctx, net, BF16, small, label=f"step cudnn.benchmark={benchmark}", phase="compile")
    for variant, batch in ((COMPILED_NET_NCHW, small), (CUDA_GRAPHS_FP32, s.batches[0]), (COMPILED_NET_NCHW, large)):
        if ctx.left("compile") < s.compile_min_s:
            rec.skip("compile", f"step {variant.name} b{batch}",
                     f"{ctx.left('compile'):.0f} s of phase time left, compiling needs ~{s.compile_min_s:.0f}")
            continue
        if ctx.sizes.compile_backend != "inductor" and variant.mode != "default":
            rec.skip("compile", f"step {variant.name} b{batch}", f"mode {variant.mode} needs inductor")
            continue
        torch._dynamo.reset()  # a fresh compile per batch size and mode (dynamic=False)
        ctx.compiled.clear()
        measure_setting(ctx, net, variant, batch, phase="compile")
    ctx.module = None
    del model, net
    ctx.free()


# ----- driver ------------------------------------------------------------------------------------------

RUNNERS = {"device": phase_device, "train_step": phase_train_step, "data": phase_data, "paper_run": phase_paper_run,
           "compile": phase_compile}


def run_phase(ctx: Context, phase: str) -> None:
    start = time.perf_counter()
    left = ctx.left(phase)
    print(f"\n== {phase}: {left:.0f} s until its deadline ({time.perf_counter() - START:.0f} s elapsed) ==",
          flush=True)
    status, error = "ok", None
    last = phase == list(ctx.reserves)[-1]  # the last phase must end by the budget; the others may borrow from it
    try:
        with hard_limit(None if ctx.args.tiny else max(left + 2.0, 5.0) if last else max(left + 10.0, 30.0)):
            RUNNERS[phase](ctx)
    except PhaseTimeout as timeout:
        status, error = "timeout", str(timeout)
    except Exception as exc:  # noqa: BLE001: the next phase still runs
        traceback.print_exc()
        status, error = "error", f"{type(exc).__name__}: {exc}"
    ctx.free()
    elapsed = time.perf_counter() - start
    ctx.rec.data["phases"][phase] = {"status": status, "elapsed_s": elapsed, "error": error}
    ctx.rec.add(phase, "phase wall time", elapsed, "s", status + (f": {error[:200]}" if error else ""))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"),
                        help="gpu_check.json, gpu_check.md and paper_run.ckpt go here (a few MiB)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="synthetic data (GBs at the paper grid); default /tmp/gpu_check_data "
                             "(OUT/data with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="every phase at a tiny size on the CPU (tests)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for the whole run")
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default: all but compile)")
    parser.add_argument("--run-batch", type=int, default=None, help="batch of the Trainer run (default 4, the paper's)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = parser.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; valid: {','.join(PHASES)}")
    if args.data_dir is None:
        args.data_dir = args.out / "data" if args.tiny else Path("/tmp/gpu_check_data")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else PAPER
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    selected = args.phases.split(",")
    reserves = {phase: seconds for phase, seconds in sizes.reserves if phase in selected}
    scale = args.budget_s / (sum(reserves.values()) + sizes.margin_s + 10.0)  # 420 s for the default phases
    reserves = {phase: seconds * scale for phase, seconds in reserves.items()}
    if args.tiny and device.type == "cpu":  # tiny ops: one thread is as fast, and immune to busy cores
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False  # oneDNN's first steps per shape take seconds; tiny convs need no JIT
    args.out.mkdir(parents=True, exist_ok=True)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    import pytorch_lightning as pl

    meta = {"argv": sys.argv[1:], "tiny": args.tiny, "device": str(device), "budget_s": args.budget_s,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "pytorch_lightning": pl.__version__, "cpu_count": os.cpu_count(),
            "sizes": _plain(asdict(sizes)), "phase_reserves_s": reserves, "data_dir": str(args.data_dir),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "mkldnn": torch.backends.mkldnn.enabled,
            "finished": False}
    ctx = Context(args=args, sizes=sizes, device=device, grid=VoxelGrid.parse(sizes.grid),
                  rec=Recorder(args.out, meta), reserves=reserves, end=START + args.budget_s)
    print(f"gpu_check: device {device}, grid {sizes.grid}, net {dict(sizes.net)}, budget {args.budget_s:.0f} s "
          f"(phase reserves {', '.join(f'{p} {r:.0f} s' for p, r in reserves.items())}), out {args.out}", flush=True)
    for phase in PHASES:
        if phase in selected:
            run_phase(ctx, phase)
    meta["finished"] = True
    ctx.rec.save()
    table = ctx.rec.table()
    write_text(args.out / "gpu_check.md", table + "\n")
    for item in ctx.rec.data["skipped"]:
        print(f"skipped [{item['phase']}] {item['name']}: {item['reason']}")
    print(f"\ntotal {time.perf_counter() - START:.0f} s of {args.budget_s:.0f}; results in {args.out}\n", flush=True)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
