"""Data-spine costs: voxelisation, generation, storage and loading. ``python -m benchmarks.data``.

Prints a markdown table (and ``--out FILE`` writes it). Times are medians of repeated runs, one
thread (``torch.set_num_threads(1)``), unless a row says otherwise. On a CUDA machine it adds the
device augmentation path (unpack bits and augment a batch on the GPU) against the CPU-worker path.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from benchmarks.common import face_like_mesh, median_ms, report  # noqa: E402
from data_prep.face_model import load_face_model  # noqa: E402
from data_prep.synthetic import generate_split  # noqa: E402
from lightning_vrn.dataset_file import REQUIRED_ATTRS, SAMPLE_KEYS, DatasetWriter, open_dataset  # noqa: E402
from datamodules.augment import AugmentSettings  # noqa: E402
from datamodules.dataset import FaceVolumeDataset, decode_batch  # noqa: E402
from lightning_vrn.geometry import VoxelGrid, crop_rotation, model_to_crop  # noqa: E402
from lightning_vrn.geometry.voxelise import voxelise  # noqa: E402

GRIDS = {"paper 200x192x192": VoxelGrid.parse("200,192,192"), "cpu 100x96x96": VoxelGrid.parse("100,96,96")}


def voxelisation_rows() -> list[tuple[str, str]]:
    grid = GRIDS["paper 200x192x192"]
    rows = []
    vertices, triangles = face_like_mesh(224)  # 50,176 vertices
    for yaw in (0, 70):
        rotation = crop_rotation((0.0, np.radians(yaw), 0.0))
        centre = vertices.mean(0)
        posed = (vertices - centre) @ rotation.T + centre
        ms = median_ms(lambda: voxelise(posed, triangles, rotation, grid), repeats=15)
        rows.append((f"voxelise {len(vertices):,}-vertex mesh, yaw {yaw}, paper grid", f"{ms:.1f} ms"))
    model = load_face_model("builtin")
    pose = np.radians([10.0, 45.0, 5.0])
    posed = model_to_crop(model.mean, pose, 0.65, (96.0, 96.0, 0.0))
    ms = median_ms(lambda: voxelise(posed, model.triangles, crop_rotation(pose), grid), repeats=15)
    rows.append((f"voxelise built-in face ({model.num_vertices:,} vertices), yaw 45, paper grid", f"{ms:.1f} ms"))
    return rows


def generation_and_storage_rows(workdir: Path, count: int) -> tuple[list[tuple[str, str]], dict[str, Path]]:
    rows, files = [], {}
    for name, grid in GRIDS.items():
        path = workdir / f"{grid.depth}.h5"
        start = time.perf_counter()
        generate_split(path, "builtin", grid, count, seed=0, split="bench", workers=1, progress=False)
        rate = count / (time.perf_counter() - start)
        rows.append((f"generate samples, {name}, 1 worker", f"{rate:.1f} samples/s"))
        with h5py.File(path, "r") as handle:
            per_field = {key: handle[key].id.get_storage_size() / count for key in ("images", "volumes", "vertices")}
        total = os.path.getsize(path) / count
        detail = ", ".join(f"{k} {v / 1024:.0f}" for k, v in per_field.items())
        rows.append((f"stored bytes per sample, {name}", f"{total / 1024:.0f} KiB ({detail} KiB)"))
        files[name] = path
    return rows, files


def generation_scaling_rows(workdir: Path, count: int) -> list[tuple[str, str]]:
    """Samples/s at the paper grid with 1 and 2 workers (and every core, when more), from one run; and the writing
    process's cost per sample, which bounds any number of workers (the projection for 16 cores, labelled so)."""
    grid, rows, rates = GRIDS["paper 200x192x192"], [], {}
    for workers in sorted({1, 2, len(os.sched_getaffinity(0))}):
        path = workdir / f"scaling-{workers}.h5"
        start = time.perf_counter()
        generate_split(path, "builtin", grid, count, seed=0, split="bench", workers=workers, progress=False)
        rates[workers] = count / (time.perf_counter() - start)
        rows.append((f"generate samples, paper grid, {workers} worker(s), {len(os.sched_getaffinity(0))} cores",
                     f"{rates[workers]:.1f} samples/s ({rates[workers] / rates[1]:.2f}x one worker)"))
    source = open_dataset(workdir / "scaling-1.h5")
    with DatasetWriter(workdir / "copy.h5", grid, count, source.num_vertices, source.triangles, source.face_region,
                       source.landmark_vertices, {key: source.attrs[key] for key in REQUIRED_ATTRS}, restart=True,
                       expression_names=source.expression_names,
                       num_expression_coefficients=source.num_expression_coefficients) as writer:
        key_of = {field: key for key, field in SAMPLE_KEYS.items()}
        samples = [{key_of[field]: value for field, value in source.read(i, source.fields).items()}
                   for i in range(count)]
        sent = [pickle.dumps(writer.encoder.encode(i, sample)) for i, sample in enumerate(samples)]
        start = time.perf_counter()
        for index, sample in enumerate(sent):   # what the writing process does: unpickle, copy the chunks
            writer.write_encoded(index, pickle.loads(sample))
        write_s = (time.perf_counter() - start) / count
    bound = 1.0 / write_s
    rows.append(("writing process per encoded sample (unpickle and write), paper grid", f"{1000 * write_s:.2f} ms (at most {bound:.0f} "
                 f"samples/s whatever the workers)"))
    projected = min(16 * rates[1], bound)
    rows.append(("generate samples, paper grid, 16 workers on 16 cores (projected: 16x one worker, capped by the "
                 "writing process)", f"{projected:.0f} samples/s ({projected / rates[1]:.1f}x one worker)"))
    return rows


def loader_rows(files: dict[str, Path]) -> list[tuple[str, str]]:
    """Samples/s of one loader worker (the dataset's __getitem__ in one process, one thread)."""
    rows = []
    augment = AugmentSettings().to_dict()
    for name, path in files.items():
        cases = {
            "packed volume, no augmentation (device path)": FaceVolumeDataset(path, augment=None, on_device=True),
            "unpacked, no augmentation": FaceVolumeDataset(path, augment=None, on_device=False),
            "unpacked and augmented on the CPU": FaceVolumeDataset(path, augment=augment, on_device=False),
        }
        for case, dataset in cases.items():
            n = len(dataset)
            ms = median_ms(lambda: [dataset[i] for i in range(n)], repeats=3)
            rows.append((f"loader, {name}, {case}", f"{1000.0 * n / ms:.0f} samples/s per worker"))
    return rows


def device_rows(files: dict[str, Path]) -> list[tuple[str, str]]:
    """Batch of 8: CPU-worker augmentation vs unpack + augment on the GPU after transfer."""
    if not torch.cuda.is_available():
        return [("device augmentation", "no CUDA device here: not measured")]
    rows = []
    for name, path in files.items():
        dataset = FaceVolumeDataset(path, augment=AugmentSettings(on_device=True).to_dict(), on_device=True)
        raw = default_collate([dataset.raw_sample(i) for i in range(8)])
        grid = dataset.grid
        cpu_ms = median_ms(lambda: decode_batch(raw, grid), repeats=5)
        gpu_raw = {k: (v.cuda() if torch.is_tensor(v) else {kk: vv.cuda() for kk, vv in v.items()}) for k, v in raw.items()}

        def on_gpu():
            decode_batch(gpu_raw, grid)
            torch.cuda.synchronize()

        gpu_ms = median_ms(on_gpu, repeats=20, warmup=3)
        rows.append((f"augment batch of 8, {name}: CPU (1 thread) vs GPU", f"{cpu_ms:.0f} ms vs {gpu_ms:.1f} ms"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=24, help="samples generated per grid")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--scaling-only", action="store_true", help="only the generation rows against workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.scaling_only:
            report(generation_scaling_rows(Path(tmp), args.samples), args.out)
            return
        rows = voxelisation_rows()
        generation, files = generation_and_storage_rows(Path(tmp), args.samples)
        rows += generation + generation_scaling_rows(Path(tmp), args.samples) + loader_rows(files) + device_rows(files)
    report(rows, args.out)


if __name__ == "__main__":
    main()
