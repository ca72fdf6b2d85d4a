"""Phase 5, ``compile`` (not in the default ``--phases``): cuDNN benchmark mode off against on, the whole
model + loss under ``torch.compile`` at ``compile_batches``, and CUDA graphs at the paper's batch."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.steps import Variant, count_flops, measure_setting

BF16 = Variant("bf16", channels_last=False)
COMPILED_NET_NCHW = Variant("bf16, compiled net+loss", channels_last=False, tail="compiled_net")
CUDA_GRAPHS_FP32 = Variant("fp32, compiled net+loss, CUDA graphs", bf16=False, channels_last=False,
                           tail="compiled_net", mode="reduce-overhead")


def phase_compile(ctx: Context) -> None:
    """cuDNN benchmark off/on (eager bf16), the whole model + loss compiled (bf16, NCHW: the eager
    channels_last comparison is in benchmarks/results_gpu.md) at ``compile_batches``, and CUDA graphs in
    fp32 at the paper's batch (where the step is launch-bound)."""
    rec, s = ctx.rec, ctx.sizes
    model = ctx.build_model().to(ctx.device).train()
    with rec.attempt("compile", "forward FLOPs"):
        count_flops(ctx, model, "compile")
    small, large = s.compile_batches
    if ctx.cuda:
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            measure_setting(ctx, model, BF16, small, label=f"step cudnn.benchmark={benchmark}", phase="compile")
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
        measure_setting(ctx, model, variant, batch, phase="compile")
    ctx.compiled.clear()  # the compiled functions hold the model
    del model
    ctx.free()
