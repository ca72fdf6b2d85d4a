"""The phases, and everything that differs between the paper run on the GPU (:data:`PAPER`) and ``--tiny``
on the CPU (:data:`TINY`)."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("device", "train_step", "data", "paper_run", "fused", "compile")
DEFAULT_PHASES = PHASES[:4]


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
    train_samples: tuple = (400, 800)  # sized to the time left, within these bounds (gpu_notes.md: why not more)
    loader_workers: tuple = (4, 8, 15)
    loader_s: float = 6.0
    loader_reserve_s: float = 40.0   # phase-3 time kept for the loader and augmentation measurements
    run_batch: int = 4               # the paper's batch for the Trainer run
    run_max_s: float = 240.0
    run_max_steps: int = -1
    run_after_s: float = 25.0        # Trainer set-up, evaluation pass, checkpoint and reload after max_time
    reserves: tuple = (("device", 10), ("train_step", 170), ("data", 75), ("paper_run", 145), ("fused", 90),
                       ("compile", 450))  # fused and compile: --budget-s 590 gives compile ~3 compiles of 150 s
    compile_batches: tuple = (32, 256)  # whole-network compile; CUDA graphs run at batches[0]
    fused_batches: tuple = (4, 32, 256)  # plain against fused loss (fp32 at the first, bf16 after); fused at 2x the last
    margin_s: float = 10.0


PAPER = Sizes()
TINY = Sizes(grid="50,48,48", net=(("features", 16), ("stacks", 2), ("hourglass_depth", 2)), batches=(2, 4),
             max_batch_cap=16, warmup=1, steps=2, step_cap_s=0.5, config_min_s=0.0, compile_min_s=0.0,
             autotune=False, compile_backend="aot_eager", loss_chunks=4, matmul_n=256, matmul_reps=2,
             matmul_trials=2, copy_mib=16, test_samples=4, train_samples=(12, 12), loader_workers=(0, 2),
             loader_s=1.0, loader_reserve_s=0.0, run_batch=2, run_max_s=8.0, run_max_steps=6, run_after_s=0.0,
             compile_batches=(2, 4), fused_batches=(2, 4, 8))
