"""Phase 5, ``fused`` (not in the default ``--phases``): the model's loss from the full-size logits against the
fused loss (``model.fused_loss``, :mod:`lightning_vrn.nets.upsampled_bce`), in the same run: its check against the
plain tail, then samples/s and peak memory of both at ``fused_batches`` (fp32 at the paper's batch, where the
``paper`` config trains in fp32, bf16-mixed at the larger ones) and of the fused loss alone at twice the largest
(where the plain loss did not fit on an H100: benchmarks/results_gpu.md)."""

from __future__ import annotations

import torch

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.steps import BF16, FP32, FUSED_BF16, FUSED_FP32, check_tail, measure_setting


def phase_fused(ctx: Context) -> None:
    s = ctx.sizes
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    model = ctx.build_model().to(ctx.device).train()
    with ctx.rec.attempt("fused", f"tail check {FUSED_FP32.name}"):  # the check runs in fp32, without autocast
        check_tail(ctx, FUSED_FP32, min(s.fused_batches), "fused")
    paper, *larger = s.fused_batches
    settings = [(FP32, paper), (FUSED_FP32, paper)]
    settings += [(variant, batch) for batch in larger for variant in (BF16, FUSED_BF16)]
    for variant, batch in settings:
        measure_setting(ctx, model, variant, batch, phase="fused")
    measure_setting(ctx, model, FUSED_BF16, 2 * larger[-1], label="larger batch", warmup=1, steps=2, phase="fused")
    del model
    ctx.free()
