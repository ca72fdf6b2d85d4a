"""Training-step settings (:class:`Variant`) of the paper model and their timing, shared by the
``train_step`` and ``compile`` phases.

Every setting is a step of :func:`benchmarks.train_step.step_function`: the model's own forward,
its optimiser from ``configure_optimizers`` (a variant may override its optim settings, e.g.
``foreach``), and its own loss (``model.losses``, from the logits before the upsampling for the fused
loss, ``model.fused_loss``) unless the variant computes the 4x upsample + BCE tail another way
(:func:`loss_function`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu_check.context import Context
from benchmarks.train_step import step_function, time_step_function
from lightning_vrn.models.volume import LOW_RES_LOGITS
from lightning_vrn.nets.upsampled_bce import upsampled_bce_with_logits
from lightning_vrn.nets.vrn import upsample


@dataclass(frozen=True)
class Variant:
    """One training-step setting: precision, memory format, optimiser settings, how the loss tail runs."""

    name: str
    bf16: bool = True
    channels_last: bool = True
    optim: tuple = (("foreach", True),)  # overrides of the model's optim settings
    tail: str = "eager"     # eager (the model's loss) | contiguous | chunked | compiled | compiled_net
    mode: str = "default"   # torch.compile mode for tail == "compiled_net"
    fused: bool = False     # the model's fused loss from the logits before the upsampling (eager or compiled_net)

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.bf16 else "32-true"

    @property
    def uint8_target(self) -> bool:
        """Chunked and compiled tails take the uint8 volume (4x fewer bytes) and cast it inside; the eager fused
        loss takes the float32 volume, as the model does in training (the DataModule casts it)."""
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
FP32 = EAGER_VARIANTS[0]
BF16 = EAGER_VARIANTS[1]
FUSED_FP32 = Variant("fp32, fused loss", bf16=False, channels_last=False, fused=True)
FUSED_BF16 = Variant("bf16, fused loss", channels_last=False, fused=True)


# ----- loss tails ------------------------------------------------------------------------------------

def low_res_logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's ``(B, D, S/4, S/4)`` logits before the bilinear x4 (:func:`upsample`)."""
    return model(batch, upsample_volume=False)[LOW_RES_LOGITS]


def _bce_sum(low: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    logits = upsample(low.float(), size)
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


def loss_function(ctx: Context, model, variant: Variant) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None:
    """``loss(batch) -> mean BCE`` for ``variant``'s tail; None for the model's own loss (the eager tail).

    Compiled functions are cached per variant in ``ctx.compiled``.
    """
    size = (ctx.grid.height, ctx.grid.width)
    if variant.tail == "eager" and variant.fused:
        return lambda batch: model.losses(model(batch, upsample_volume=False), batch)["loss"]
    if variant.tail == "eager":
        return None  # step_function's default: the model's training loss
    if variant.tail == "contiguous":
        def contiguous(batch):
            low = low_res_logits(model, batch).contiguous()
            return F.binary_cross_entropy_with_logits(upsample(low, size), batch["volume"])
        return contiguous
    if variant.tail == "chunked":
        return lambda batch: chunked_bce(low_res_logits(model, batch), batch["volume"], size, ctx.sizes.loss_chunks)
    if variant.tail == "compiled":
        if variant.name not in ctx.compiled:
            ctx.compiled[variant.name] = torch.compile(tail_mean_bce, backend=ctx.sizes.compile_backend)
        tail = ctx.compiled[variant.name]

        def compiled_tail(batch):
            low = low_res_logits(model, batch)
            with torch.autocast(ctx.device.type, enabled=False):
                return tail(low.float().contiguous(), batch["volume"], size)
        return compiled_tail
    if variant.tail == "compiled_net":
        if variant.name not in ctx.compiled:
            def whole(batch):  # the model's own forward and loss; the uint8 target is cast inside the graph
                outputs = model(batch, upsample_volume=not variant.fused)  # the fused loss itself runs eagerly
                return model.losses(outputs, {**batch, "volume": batch["volume"].float()})["loss"]

            options = {} if ctx.sizes.compile_backend != "inductor" else {"mode": variant.mode}
            ctx.compiled[variant.name] = torch.compile(whole, backend=ctx.sizes.compile_backend, dynamic=False,
                                                       **options)
        return ctx.compiled[variant.name]
    raise ValueError(f"unknown tail {variant.tail!r}")


def check_tail(ctx: Context, variant: Variant, batch: int, phase: str) -> None:
    """Loss and gradient of ``variant``'s tail (chunked, compiled or fused) against the plain interpolate + BCE,
    on the same low-res logits."""
    size = (ctx.grid.height, ctx.grid.width)
    low = torch.randn(batch, ctx.grid.depth, ctx.grid.height // 4, ctx.grid.width // 4, device=ctx.device) * 4
    low.requires_grad_(True)
    target = torch.randint(0, 2, (batch, *ctx.grid.shape), dtype=torch.uint8, device=ctx.device)
    reference = tail_mean_bce(low, target, size)
    (grad_ref,) = torch.autograd.grad(reference, low)
    if variant.tail == "chunked":
        value = chunked_bce(low, target, size, ctx.sizes.loss_chunks)
    elif variant.fused:
        value = upsampled_bce_with_logits(low, target)
    else:
        value = ctx.compiled[variant.name](low, target, size)
    (grad,) = torch.autograd.grad(value, low)
    loss_error = abs(value.item() - reference.item()) / abs(reference.item())
    grad_error = float((grad - grad_ref).abs().max() / grad_ref.abs().max())
    ctx.rec.add(phase, f"tail check {variant.name}: loss relative error", loss_error, "",
                f"gradient max error {grad_error:.2e} of max |grad|; fp32, against interpolate + BCE",
                grad_error=grad_error)


# ----- one setting -----------------------------------------------------------------------------------

def make_batch(ctx: Context, batch: int, variant: Variant) -> dict[str, torch.Tensor]:
    """Random ``"image"`` ``(B, 3, H, W)`` in [0, 1] and binary ``"volume"`` ``(B, D, H, W)`` (uint8 or float32)."""
    image = torch.rand(batch, 3, ctx.grid.height, ctx.grid.width, device=ctx.device)
    if variant.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 2, (batch, *ctx.grid.shape), dtype=torch.uint8, device=ctx.device)
    return {"image": image, "volume": target if variant.uint8_target else target.float()}


def model_optimizer(model, overrides: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser of ``model.configure_optimizers()`` with ``overrides`` of the model's optim settings.

    A TypeError when the settings have no such field (e.g. ``fused``: PyTorch's RMSprop has none).
    """
    settings = model.settings
    unknown = sorted(set(overrides) - {f.name for f in fields(settings.optim)})
    if unknown:
        raise TypeError(f"the model's optim settings have no {', '.join(unknown)}")
    model.settings = replace(settings, optim=replace(settings.optim, **overrides))
    try:
        return model.configure_optimizers()["optimizer"]
    finally:
        model.settings = settings


def time_setting(ctx: Context, model, variant: Variant, batch: int, warmup: int, steps: int) -> dict:
    """Median synchronised seconds per training step of ``variant`` at ``batch``; also first-step time, peak memory."""
    model.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    optimizer = model_optimizer(model, dict(variant.optim))
    loss = loss_function(ctx, model, variant)
    step = step_function(model, make_batch(ctx, batch, variant), variant.precision, optimizer=optimizer, loss=loss,
                         cuda_graphs=variant.mode == "reduce-overhead")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    timing = time_step_function(step, ctx.device, steps, warmup=warmup, max_s=ctx.sizes.step_cap_s)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    return {"seconds": timing.seconds, "first_s": timing.first_s, "steps": timing.steps, "loss": timing.loss,
            "peak_gib": peak}


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "ALLOC_FAILED" in str(error)))


def measure_setting(ctx: Context, model, variant: Variant, batch: int, label: str = "step",
                    warmup: int | None = None, steps: int | None = None, phase: str = "train_step") -> dict | None:
    """:func:`time_setting` and a result row (samples/s, ms/step, MFU, peak memory); None if skipped."""
    name = f"{label} {variant.name} b{batch}"
    if ctx.left(phase) < ctx.sizes.config_min_s:
        ctx.rec.skip(phase, name, "out of phase time")
        return None
    result, oom = None, False
    try:
        result = time_setting(ctx, model, variant, batch, ctx.sizes.warmup if warmup is None else warmup,
                              ctx.sizes.steps if steps is None else steps)
    except TypeError as error:  # e.g. an optimiser setting the model does not have
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


def best_variant(ctx: Context, batch: int, names: list[str] | None = None) -> str | None:
    """Name of the fastest measured setting at ``batch`` (among ``names`` when given)."""
    rates = {v: r for (v, b), r in ctx.rates.items() if b == batch and (names is None or v in names)}
    return max(rates, key=rates.get) if rates else None


def count_flops(ctx: Context, model, phase: str) -> None:
    """Record the model's forward FLOPs per sample (and set ``ctx.train_flops_per_sample`` = 3x, for the MFU)."""
    batch = {"image": torch.rand(2, 3, ctx.grid.height, ctx.grid.width, device=ctx.device)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        logits_dtype = str(model(batch)["volume_logits"].dtype).replace("torch.", "")
    forward = counter.get_total_flops() / 2
    ctx.train_flops_per_sample = 3 * forward
    params = sum(p.numel() for p in model.parameters())
    ctx.rec.add(phase, "forward FLOPs per sample", forward / 1e9, "GFLOP",
                f"{params / 1e6:.2f} M parameters; training ~3x = {3 * forward / 1e9:.1f} GFLOP; "
                f"bf16-autocast logits are {logits_dtype}", parameters=params, autocast_logits_dtype=logits_dtype)
