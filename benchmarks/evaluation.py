"""Evaluation cost and the metric's own floor at the paper grid. ``python -m benchmarks.evaluation``.

For synthetic samples at 200x192x192 it scores the ground-truth volume against the sample's own
mesh (the discretisation floor: what NME reports for a perfect volume) and times one sample's
evaluation on one core, split into iso-surface and ICP + correspondence.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

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
from lightning_vrn.metrics.nme import sample_nme  # noqa: E402


def _bucket(values: np.ndarray, yaws: np.ndarray, lo: float, hi: float) -> str:
    inside = in_yaw_bucket(yaws, lo, hi)
    if not inside.any():
        return "no samples"
    return f"mean {values[inside].mean():.4f}, median {np.median(values[inside]):.4f} ({inside.sum()} samples)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=36)
    parser.add_argument("--grid", default="200,192,192")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    grid = VoxelGrid.parse(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.h5"
        generate_split(path, "builtin", grid, args.samples, seed=1, split="floor", progress=False)
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
    rows = [
        (f"NME floor (ground-truth volume vs its own mesh), {len(floors)} samples, grid {grid.describe()}",
         f"mean {floors.mean():.4f}, max {floors.max():.4f} (aligned mean {np.mean(aligned):.4f})"),
        *[(f"NME floor, absolute yaw {lo}-{hi} degrees", _bucket(floors, yaws, lo, hi)) for lo, hi in YAW_BUCKETS_DEG],
        ("evaluation of one sample, one core (median)", f"{np.median(total_ms):.0f} ms (iso-surface {np.median(iso_ms):.0f} ms)"),
    ]
    report(rows, args.out)


if __name__ == "__main__":
    main()
