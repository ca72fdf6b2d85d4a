"""Phase 6, ``compile`` (not in the default ``--phases``): cuDNN benchmark mode off against on, then what the
second session had no time for first: CUDA graphs at the paper's batch, the whole model + loss under
``torch.compile`` at the larger of ``compile_batches``, with the plain and with the fused loss, and last at the
smaller (measured once already: benchmarks/results_gpu.md)."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.steps import BF16, Variant, count_flops, measure_setting

COMPILED_NET_NCHW = Variant("bf16, compiled net+loss", channels_last=False, tail="compiled_net")
COMPILED_NET_FUSED = Variant("bf16, compiled net + fused loss", channels_last=False, tail="compiled_net", fused=True)
CUDA_GRAPHS_FP32 = Variant("fp32, compiled net+loss, CUDA graphs", bf16=False, channels_last=False,
                           tail="compiled_net", mode="reduce-overhead")


def phase_compile(ctx: Context) -> None:
    """cuDNN benchmark off/on (eager bf16), CUDA graphs in fp32 at the paper's batch (where the step is
    launch-bound), then the whole model + loss compiled (bf16, NCHW: the eager channels_last comparison is in
    benchmarks/results_gpu.md) at the larger of ``compile_batches`` with the plain and the fused loss (the fused
    loss itself runs eagerly between compiled graphs), and at the smaller. Their eager baselines are the
    ``fused`` phase's rows (run both phases together for ratios within one run)."""
    rec, s = ctx.rec, ctx.sizes
    model = ctx.build_model().to(ctx.device).train()
    with rec.attempt("compile", "forward FLOPs"):
        count_flops(ctx, model, "compile")
    small, large = s.compile_batches
    if ctx.cuda:
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            measure_setting(ctx, model, BF16, small, label=f"step cudnn.benchmark={benchmark}", phase="compile")
    for variant, batch in ((CUDA_GRAPHS_FP32, s.batches[0]), (COMPILED_NET_NCHW, large), (COMPILED_NET_FUSED, large),
                           (COMPILED_NET_NCHW, small)):
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
