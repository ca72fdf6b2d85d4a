"""300W-LP / AFLW2000-3D conversion cost: ``python -m benchmarks.conversion [--out FILE]``.

Needs ``../shared/data`` (16 real AFLW2000-3D samples and the mean BFM). It converts a folder of
``--pairs`` AFLW2000-3D-layout pairs (the 16 real ones repeated) at the paper grid with one and with
two worker processes, one BLAS thread each, and reports samples/s per core, bytes per sample and
the projected time for 300W-LP on 16 cores. The mean BFM has no bases, so the cost of applying the
full bases (199 shape + 29 expression components, measured separately on random bases of the full
size) is added to the per-sample time. A ``--flip`` copy costs only :func:`mirror_sample` (the
unmirrored sample is reused), measured too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import median_ms, report  # noqa: E402
from data_prep.aflw2000 import aflw2000_sources  # noqa: E402
from data_prep.bfm import load_bfm  # noqa: E402
from data_prep.mat_faces import Conversion, convert, make_sample, mirror_sample  # noqa: E402
from lightning_vrn.geometry.grid import PAPER_GRID  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
W300LP_SAMPLES = 61_225
"""300W-LP without its *_Flip folders (AFW 5,207 + HELEN 37,676 + IBUG 1,786 + LFPW 16,556)."""
TARGET_HOURS, TARGET_CORES = 2.0, 16
SHAPE_COMPONENTS, EXPRESSION_COMPONENTS = 199, 29


def build_folder(folder: Path, pairs: int) -> None:
    """``pairs`` AFLW2000-3D-layout pairs: the 16 real samples repeated under new names (symlinks)."""
    real = sorted((SHARED / "aflw2000_samples").glob("*.mat"))
    folder.mkdir(parents=True)
    for index in range(pairs):
        template = real[index % len(real)]
        for suffix in (".mat", ".jpg"):
            (folder / f"image{index:05d}{suffix}").symlink_to(template.with_suffix(suffix))


def conversion_seconds(folder: Path, workers: int, out_dir: Path) -> tuple[float, Path]:
    """(seconds of the whole command: checks, conversion, writing; the file written)."""
    conversion = Conversion(sources=aflw2000_sources(folder), model_spec=f"bfm:{SHARED / 'bfm_meta'}",
                            grid=PAPER_GRID, landmark_field="pt3d_68", mean_only=True,
                            attrs={"source": "AFLW2000-3D", "created_by": "benchmarks.conversion"})
    start = time.perf_counter()
    path, _ = convert(conversion, out_dir / f"{folder.name}-{workers}.h5", workers=workers, progress=False)
    return time.perf_counter() - start, path


def stored_kib(path: Path) -> dict[str, float]:
    """KiB per sample that each per-sample dataset of ``path`` takes on disk."""
    with h5py.File(path, "r") as f:
        count = f["images"].shape[0]
        return {name: f[name].id.get_storage_size() / count / 1024 for name in
                ("images", "volumes", "volumes_frontal", "vertices", "landmarks_2d", "landmarks_3d", "pose")}


def basis_ms(num_vertices: int) -> float:
    """Time to apply full-size random bases (199 + 29 components) to ``num_vertices`` vertices."""
    rng = np.random.default_rng(0)
    shape_basis = rng.standard_normal((SHAPE_COMPONENTS, num_vertices, 3), dtype=np.float32)
    expression_basis = rng.standard_normal((EXPRESSION_COMPONENTS, num_vertices, 3), dtype=np.float32)
    shape, expression = rng.standard_normal(SHAPE_COMPONENTS), rng.standard_normal(EXPRESSION_COMPONENTS)
    return median_ms(lambda: (np.tensordot(shape, shape_basis, axes=1)
                              + np.tensordot(expression, expression_basis, axes=1)), repeats=9)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=96, help="pairs to convert per measurement (default 96)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        raise SystemExit(f"needs the reference data at {SHARED}")
    model = load_bfm(SHARED / "bfm_meta")
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        build_folder(temp / "aflw", args.pairs)
        build_folder(temp / "tiny", 2)
        one_worker, path = conversion_seconds(temp / "aflw", 1, temp)  # its file is the one measured below
        seconds = {1: one_worker, 2: conversion_seconds(temp / "aflw", 2, temp)[0]}
        fixed = {workers: conversion_seconds(temp / "tiny", workers, temp)[0] for workers in (1, 2)}
        size = path.stat().st_size / args.pairs / 1024
        parts = stored_kib(path)
        source = aflw2000_sources(temp / "aflw")[0]
        sample, _ = make_sample(model, source, "pt3d_68", PAPER_GRID, True)
        mirror = median_ms(lambda: mirror_sample(sample, PAPER_GRID), repeats=9)
        shutil.rmtree(temp / "aflw")
    rate_one = (args.pairs - 2) / (seconds[1] - fixed[1])
    rate_two = (args.pairs - 2) / (seconds[2] - fixed[2])
    bases = basis_ms(model.num_vertices)
    per_sample_s = 1.0 / rate_one + bases / 1000.0
    per_core = 1.0 / per_sample_s
    rows = [
        (f"convert AFLW2000-3D layout, paper grid, mean BFM, 1 worker (checks + conversion + writing, "
         f"{args.pairs} samples less a 2-sample run)", f"{rate_one:.1f} samples/s"),
        ("same, 2 workers on this 2-core machine (shared with other jobs)",
         f"{rate_two:.1f} samples/s ({rate_two / rate_one:.2f}x)"),
        ("fixed cost per command (2-sample run): 1 worker / 2 workers (two spawned pools)",
         f"{fixed[1]:.1f} s / {fixed[2]:.1f} s"),
        (f"apply full bases (199 + 29 components, {model.num_vertices:,} vertices)", f"{bases:.1f} ms/sample"),
        ("per core with full bases (1 / (1/rate + bases))", f"{per_core:.1f} samples/s"),
        ("mirrored copy (--flip), paper grid", f"{mirror:.1f} ms/sample"),
        ("bytes per sample, paper grid", f"{size:.0f} KiB (" + ", ".join(
            f"{name} {kib:.0f}" for name, kib in parts.items() if kib >= 1) + " KiB)"),
    ]
    for label, samples, flip_samples in (("300W-LP", W300LP_SAMPLES, 0), ("300W-LP --flip", W300LP_SAMPLES,
                                                                          W300LP_SAMPLES)):
        seconds = (samples * per_sample_s + flip_samples * mirror / 1000.0) / TARGET_CORES
        verdict = "meets" if seconds / 3600.0 < TARGET_HOURS else "MISSES"
        rows.append((f"projected {label} ({samples + flip_samples:,} samples), {TARGET_CORES} cores, linear scaling",
                     f"{seconds / 60:.0f} min ({verdict} the {TARGET_HOURS:g} h target); "
                     f"{(samples + flip_samples) * size * 1024 / 1e9:.1f} GB"))
    report(rows, args.out)


if __name__ == "__main__":
    main()
