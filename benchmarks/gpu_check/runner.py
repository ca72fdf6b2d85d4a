"""The command line and the driver: selects the phases, scales their reserves to ``--budget-s``, runs
each under its hard limit (an error or a timeout is recorded and the next phase runs), and ends with
the report (:meth:`benchmarks.gpu_check.report.Recorder.finish`)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

import benchmarks.gpu_check as package
from benchmarks.gpu_check import START
from benchmarks.gpu_check.budget import PhaseTimeout, hard_limit, phase_reserves
from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.phase_compile import phase_compile
from benchmarks.gpu_check.phase_data import phase_data
from benchmarks.gpu_check.phase_device import phase_device
from benchmarks.gpu_check.phase_fused import phase_fused
from benchmarks.gpu_check.phase_paper_run import phase_paper_run
from benchmarks.gpu_check.phase_train_step import phase_train_step
from benchmarks.gpu_check.report import Recorder, plain
from benchmarks.gpu_check.sizes import DEFAULT_PHASES, PAPER, PHASES, TINY
from lightning_vrn.geometry.grid import VoxelGrid

RUNNERS = {"device": phase_device, "train_step": phase_train_step, "data": phase_data, "paper_run": phase_paper_run,
           "fused": phase_fused, "compile": phase_compile}


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"),
                        help="gpu_check.json, gpu_check.md and paper_run.ckpt go here (a few MiB)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="synthetic data (GBs at the paper grid); default /tmp/gpu_check_data "
                             "(OUT/data with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="every phase at a tiny size on the CPU (tests)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for the whole run")
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default: all but fused and compile)")
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
    reserves = phase_reserves(sizes, selected, args.budget_s)
    if args.tiny and device.type == "cpu":  # tiny ops: one thread is as fast, and immune to busy cores
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False  # oneDNN's first steps per shape take seconds; tiny convs need no JIT
    args.out.mkdir(parents=True, exist_ok=True)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    import pytorch_lightning as pl

    meta = {"argv": sys.argv[1:], "tiny": args.tiny, "device": str(device), "budget_s": args.budget_s,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "pytorch_lightning": pl.__version__, "cpu_count": os.cpu_count(),
            "sizes": plain(asdict(sizes)), "phase_reserves_s": reserves, "data_dir": str(args.data_dir),
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
    ctx.rec.finish(args.budget_s)
    return 0
