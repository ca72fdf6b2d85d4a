"""Evaluation cost and the metric's own floor. ``python -m benchmarks.evaluation [--evaluate CKPT --data REAL.h5]
[--scaling]``.

Default: for synthetic samples at 200x192x192 it scores the ground-truth volume against the sample's own
mesh (the discretisation floor: what NME reports for a perfect volume) and times one sample's
evaluation on one core, split into iso-surface and ICP + correspondence.

``--evaluate CKPT --data FILE``: ``experiments.evaluate`` end to end (a fresh process: imports, model, forward
passes, NME, reports) on the first ``--samples`` samples of FILE with each ``--workers`` count in turn, in one
run, so the ratios compare like with like; it checks that every count wrote the same per-sample table.
``--before DIR`` first times the ``experiments.evaluate`` of another checkout (``git worktree add DIR COMMIT``),
as it runs there, the base of the ratios; ``--icp-subsample K`` adds a run with the last worker count and that
subsample.

``--scaling [--data FILE]``: the NME pool alone on blurred, shifted ground-truth volumes (so that ICP has work to
do) of FILE's samples, or of synthetic samples at ``--grid``, per ``--workers`` count: seconds per sample, per
sample per core, and the speed-up over one worker (the pool's workers are started before the clock).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALLER_ENVIRONMENT = dict(os.environ)
"""The environment before the line below: what the ``--evaluate`` runs get (their own thread counts)."""
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import open3d as o3d  # noqa: E402
import torch  # noqa: E402

from data_prep.synthetic import generate_split  # noqa: E402
from lightning_vrn.dataset_file import open_dataset, unpack_volume  # noqa: E402
from lightning_vrn.geometry import VoxelGrid  # noqa: E402
from lightning_vrn.geometry.isosurface import volume_to_mesh  # noqa: E402
from lightning_vrn.landmark_scheme import outer_interocular  # noqa: E402
from benchmarks.common import report  # noqa: E402
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, in_yaw_bucket  # noqa: E402
from lightning_vrn.metrics.nme import NME, sample_nme  # noqa: E402
from lightning_vrn.metrics.pool import NMEPool, default_workers  # noqa: E402


def _bucket(values: np.ndarray, yaws: np.ndarray, lo: float, hi: float) -> str:
    inside = in_yaw_bucket(yaws, lo, hi)
    if not inside.any():
        return "no samples"
    return f"mean {values[inside].mean():.4f}, median {np.median(values[inside]):.4f} ({inside.sum()} samples)"


def machine() -> str:
    """Cores this process may use and the load average now (other work on the cores slows every timing)."""
    return f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f}"


def floor_rows(grid: VoxelGrid, samples: int) -> list[tuple[str, str]]:
    """The NME floor per yaw bucket and one sample's evaluation time, one core."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.h5"
        generate_split(path, "builtin", grid, samples, seed=1, split="floor", progress=False)
        data = open_dataset(path)
        floors, aligned, yaws, iso_ms, total_ms = [], [], [], [], []
        for i in range(len(data)):
            sample = data.read(i, ["volumes", "vertices", "landmarks_3d", "pose"])
            volume = unpack_volume(sample["volumes"], grid.width).astype(np.float32)
            gt = sample["vertices"][data.face_region]
            start = time.perf_counter()
            volume_to_mesh(volume, grid)
            iso_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            result = sample_nme(volume, gt, float(outer_interocular(sample["landmarks_3d"])), grid)
            total_ms.append(1000 * (time.perf_counter() - start))
            floors.append(result.nme)
            aligned.append(result.nme_aligned)
            yaws.append(abs(np.degrees(sample["pose"][1])))
    floors, yaws = np.array(floors), np.array(yaws)
    return [
        (f"NME floor (ground-truth volume vs its own mesh), {len(floors)} samples, grid {grid.describe()}",
         f"mean {floors.mean():.4f}, max {floors.max():.4f} (aligned mean {np.mean(aligned):.4f})"),
        *[(f"NME floor, absolute yaw {lo}-{hi} degrees", _bucket(floors, yaws, lo, hi)) for lo, hi in YAW_BUCKETS_DEG],
        ("evaluation of one sample, one core (median)", f"{np.median(total_ms):.0f} ms (iso-surface {np.median(iso_ms):.0f} ms)"),
    ]


def evaluate_rows(checkpoint: Path, data: Path, samples: int, workers: list[int], before: Path | None = None,
                  subsample: int = 1) -> list[tuple[str, str]]:
    """``experiments.evaluate`` on ``samples`` samples of ``data`` (in checkout ``before`` first, when given), with
    each worker count, and with the last count and ICP subsample ``subsample`` when it is not 1: wall seconds, the
    ratio to the first run, and which runs wrote the per-sample table of the first worker count."""
    runs = ([(f"checkout {before}", before, [])] if before else []) + \
        [(f"--nme-workers {count}", Path.cwd(), ["--nme-workers", str(count)]) for count in workers] + \
        ([(f"--nme-workers {workers[-1]} --icp-subsample {subsample}", Path.cwd(),
           ["--nme-workers", str(workers[-1]), "--icp-subsample", str(subsample)])] if subsample != 1 else [])
    seconds, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, (label, checkout, options) in enumerate(runs):
            out = Path(tmp) / str(number)
            command = [sys.executable, "-m", "experiments.evaluate", "--checkpoint", str(checkpoint.resolve()),
                       "--data", str(data.resolve()), "--max-samples", str(samples), "--out", str(out),
                       "--no-log-wandb", *options]
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=checkout, env=CALLER_ENVIRONMENT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            seconds[label] = time.perf_counter() - start
            tables[label] = (out / "model" / "test.csv").read_text()
    first, reference = runs[0][0], f"--nme-workers {workers[0]}"
    return [(f"`experiments.evaluate`, {samples} samples of {data.name}, {label}",
             f"{seconds[label]:.1f} s ({seconds[label] / seconds[first]:.2f}x the time of the first row); per-sample "
             f"table {'identical to' if tables[label] == tables[reference] else 'differs from'} {reference}'s")
            for label in seconds]


def scaling_rows(grid: VoxelGrid, samples: int, workers: list[int], data: Path | None = None) -> list[tuple[str, str]]:
    """The NME pool's seconds per sample for each worker count (workers started before the clock), on the first
    ``samples`` samples of ``data`` (its grid), or of synthetic samples generated at ``grid``."""
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = generate_split(Path(tmp) / "scaling.h5", "builtin", grid, samples, seed=2, split="scaling",
                                  progress=False)
        volumes, vertices, interocular, yaw, grid = _blurred_ground_truth(data, samples)
    rows, per_sample = [], {}
    for count in workers:
        with NMEPool(count) as pool:
            for future in [pool.submit(_ready, np.zeros(1)) for _ in range(2 * count)]:
                future.result()  # every worker started
            metric = NME(grid, pool=pool)
            start = time.perf_counter()
            for i in range(len(volumes)):
                metric.update(volumes[i][None], [vertices[i]], [interocular[i]], [yaw[i]], [i])
            metric.per_sample()
            per_sample[count] = (time.perf_counter() - start) / len(volumes)
        rows.append((f"NME pool, {len(volumes)} samples of {Path(data).name} at {grid.describe()} "
                     f"({len(vertices[0])} face-region vertices), {count} workers",
                     f"{per_sample[count]:.3f} s per sample, {per_sample[count] * count:.3f} s per sample per core, "
                     f"{per_sample[workers[0]] / per_sample[count]:.2f}x the speed of {workers[0]}"))
    return rows


def _blurred_ground_truth(path: Path, samples: int):
    """The first ``samples`` samples of ``path``: its ground-truth volumes blurred (a Gaussian of 2 voxels) and
    moved 2 voxels sideways, so that ICP has work to do, with their face-region vertices, interocular distances,
    yaws and the file's grid."""
    from scipy import ndimage

    data = open_dataset(path)
    volumes, vertices, interocular, yaw = [], [], [], []
    for i in range(min(samples, len(data))):
        sample = data.read(i, ["volumes", "vertices", "landmarks_3d", "pose"])
        volume = ndimage.gaussian_filter(unpack_volume(sample["volumes"], data.grid.width).astype(np.float32), 2.0)
        volumes.append(np.roll(volume, 2, axis=2))
        vertices.append(sample["vertices"][data.face_region])
        interocular.append(float(outer_interocular(sample["landmarks_3d"])))
        yaw.append(float(sample["pose"][1]))
    return volumes, vertices, interocular, yaw, data.grid


def _ready(_volume: np.ndarray) -> None:
    """A job that only makes sure its worker is running."""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None,
                        help="samples (default: 36 for the floor, 100 for --evaluate, 32 for --scaling)")
    parser.add_argument("--grid", default="200,192,192")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="CKPT",
                        help="time experiments.evaluate of this checkpoint on --data")
    parser.add_argument("--data", type=Path, default=None,
                        help="the test file for --evaluate; for --scaling, a file to take samples from (its grid)")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="with --evaluate: first time the experiments.evaluate of the checkout in DIR")
    parser.add_argument("--icp-subsample", type=int, default=1, metavar="K",
                        help="with --evaluate: one more run, the last worker count with --icp-subsample K")
    parser.add_argument("--scaling", action="store_true", help="time the NME pool per worker count")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts for --evaluate and --scaling (default: 1 and the cores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.evaluate is not None and args.data is None:
        parser.error("--evaluate needs --data, the test file to score")
    workers = [int(count) for count in args.workers.split(",")] if args.workers else sorted({1, default_workers()})
    torch.set_num_threads(1)  # one core here; the --evaluate runs get the caller's environment
    o3d.utility.set_max_threads(1)
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    rows = [("machine (before)", machine())]
    if args.evaluate is not None:
        rows += evaluate_rows(args.evaluate, args.data, args.samples or 100, workers, args.before, args.icp_subsample)
    elif args.scaling:
        rows += scaling_rows(VoxelGrid.parse(args.grid), args.samples or 32, workers, args.data)
    else:
        rows += floor_rows(VoxelGrid.parse(args.grid), args.samples or 36)
    report(rows + [("machine (after)", machine())], args.out)


if __name__ == "__main__":
    main()
