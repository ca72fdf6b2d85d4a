"""Phase 2, ``train_step``: every training-step setting of :mod:`benchmarks.gpu_check.steps` at each batch,
checks of the alternative loss tails against the plain one, the largest batch that fits, and the whole
model + loss under ``torch.compile``."""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.steps import (
    CHUNKED_TAIL,
    COMPILED_NET,
    COMPILED_TAIL,
    EAGER_VARIANTS,
    best_variant,
    check_tail,
    count_flops,
    measure_setting,
)


def largest_batch_search(ctx: Context, model) -> None:
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
        result = measure_setting(ctx, model, variants[name], batch, label="larger batch", warmup=1, steps=2)
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


def phase_train_step(ctx: Context) -> None:
    rec, s = ctx.rec, ctx.sizes
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    model = ctx.build_model().to(ctx.device).train()
    with rec.attempt("train_step", "forward FLOPs"):
        count_flops(ctx, model, "train_step")
    for variant in EAGER_VARIANTS:
        for batch in s.batches:
            measure_setting(ctx, model, variant, batch)
    for batch in s.batches:
        measure_setting(ctx, model, COMPILED_TAIL, batch)
    for variant in (CHUNKED_TAIL, COMPILED_TAIL):
        if variant.tail == "chunked" or variant.name in ctx.compiled:
            with rec.attempt("train_step", f"tail check {variant.name}"):
                check_tail(ctx, variant, min(s.batches), "train_step")
    largest_batch_search(ctx, model)
    largest = max(s.batches)
    if ctx.left("train_step") >= s.compile_min_s:
        measure_setting(ctx, model, COMPILED_NET, largest)
    else:
        rec.skip("train_step", f"step {COMPILED_NET.name} b{largest}",
                 f"{ctx.left('train_step'):.0f} s of phase time left, compiling needs ~{s.compile_min_s:.0f}")
    autotune = replace(COMPILED_NET, name="bf16+CL, compiled net+loss max-autotune-no-cudagraphs",
                       mode="max-autotune-no-cudagraphs")
    if s.autotune and ctx.left("train_step") >= s.autotune_min_s:
        measure_setting(ctx, model, autotune, largest)
    else:
        rec.skip("train_step", f"step {autotune.name} b{largest}", "not with --tiny" if not s.autotune else
                 f"{ctx.left('train_step'):.0f} s of phase time left, max-autotune needs ~{s.autotune_min_s:.0f}")
    ctx.compiled.clear()  # the compiled functions hold the model
    del model
    ctx.free()
