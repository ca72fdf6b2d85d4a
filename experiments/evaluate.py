"""Evaluate a checkpoint on a test file with the paper's NME.

``python -m experiments.evaluate --checkpoint CKPT --data TEST.h5 [--out DIR] [--train-data TRAIN.h5]``

Writes into ``--out`` (default: ``eval/`` beside the checkpoint's run directory):
``metrics.json`` (NME mean, median, per yaw bucket, rigidly aligned NME, and the baselines when
``--train-data`` is given), ``per_sample.csv``, ``ced.png`` (cumulative error curve, the paper's
Figure 7), ``reconstruction.obj`` (the median-error sample's iso-surface, vertex colours from the
image) and ``reconstruction.png`` (input, prediction and ground truth side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from itertools import repeat
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from experiments.baselines import MeanShapeBaseline, mean_training_volume
from lightning_vrn.atomic import atomic_path, write_text
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import write_obj
from lightning_vrn.landmarks import outer_interocular
from lightning_vrn.metrics.nme import EmptyPredictionError, sample_nme
from lightning_vrn.models import load_model
from lightning_vrn.visualise import save_ced, save_comparison, shade_mesh, vertex_colours_from_image

YAW_BUCKETS_DEG = ((0, 30), (30, 60), (60, 90))


def in_yaw_bucket(yaw_deg: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Boolean mask of ``lo <= |yaw| < hi`` degrees (the last bucket also takes ``|yaw| >= hi``)."""
    magnitude = np.abs(yaw_deg)
    return (magnitude >= lo) & ((magnitude < hi) | (hi == YAW_BUCKETS_DEG[-1][1]))


def summarise(nme: np.ndarray, nme_aligned: np.ndarray, yaw_deg: np.ndarray) -> dict:
    """Mean and median NME, the rigidly aligned mean, and the mean per |yaw| bucket (None where empty)."""
    ok = np.isfinite(nme)

    def mean(values, mask):
        return float(np.mean(values[mask])) if mask.any() else None

    summary = {
        "nme_mean": mean(nme, ok),
        "nme_median": float(np.median(nme[ok])) if ok.any() else None,
        "nme_aligned_mean": mean(nme_aligned, ok),
        "num_samples": int(len(nme)),
        "num_failed": int((~ok).sum()),
    }
    for lo, hi in YAW_BUCKETS_DEG:
        inside = ok & in_yaw_bucket(yaw_deg, lo, hi)
        summary[f"nme_yaw_{lo}_{hi}"] = mean(nme, inside)
        summary[f"count_yaw_{lo}_{hi}"] = int(inside.sum())
    return summary


class TestSet:
    """The test file's samples with what NME needs: face-region vertices, interocular distance, yaw."""

    def __init__(self, path: Path, grid, max_samples: int | None):
        self.file = open_dataset(path, expected_grid=grid)
        self.count = len(self.file) if max_samples is None else min(max_samples, len(self.file))
        self.face_region = self.file.face_region
        self.yaw_deg = np.degrees([self.file.read(i, ["pose"])["pose"][1] for i in range(self.count)])

    def sample(self, index: int, fields=("vertices", "landmarks_3d", "pose")) -> dict:
        """What scoring needs of sample ``index`` (the image only when asked: scoring never reads it)."""
        return self.file.read(index, list(fields))


def model_volumes(model, test: TestSet, batch_size: int) -> Iterator[np.ndarray]:
    """The model's soft volumes ``(D, H, W)`` for the test samples, in order, predicted in batches."""
    for start in range(0, test.count, batch_size):
        indices = range(start, min(start + batch_size, test.count))
        images = np.stack([test.file.read(i, ["images"])["images"] for i in indices])
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
        with torch.no_grad():
            yield from model.predict_step({"image": batch}).numpy()


def score(volumes: Iterable[np.ndarray], test: TestSet, grid, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """NME and rigidly aligned NME per test sample (NaN where the prediction has no surface)."""
    nme = np.full(test.count, np.nan)
    nme_aligned = np.full(test.count, np.nan)
    for i, volume in enumerate(tqdm(volumes, total=test.count, desc=desc, unit="sample")):
        sample = test.sample(i)
        interocular = float(outer_interocular(sample["landmarks_3d"]))
        try:
            result = sample_nme(volume, sample["vertices"][test.face_region], interocular, grid)
            nme[i], nme_aligned[i] = result.nme, result.nme_aligned
        except EmptyPredictionError as error:
            tqdm.write(f"sample {i}: {error}")
    return nme, nme_aligned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="test split HDF5 file")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--train-data", type=Path, default=None, help="training split: enables the baselines")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    for flag, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be a positive number of samples, got {value}")
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist: train first (python -m experiments.train ...)")
    model = load_model(args.checkpoint)
    grid = model.grid
    out = args.out or args.checkpoint.resolve().parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    test = TestSet(args.data, grid, args.max_samples)

    results = {"model": score(model_volumes(model, test, args.batch_size), test, grid, "NME (model)")}
    if args.train_data is not None:
        mean_volume = mean_training_volume(args.train_data, grid)
        results["mean training volume"] = score(repeat(mean_volume, test.count), test, grid, "NME (mean volume)")
        mean_shape = MeanShapeBaseline(test.file, grid)
        placed = (mean_shape.predict(test.sample(i)) for i in range(test.count))
        results["mean shape at GT pose"] = score(placed, test, grid, "NME (mean shape)")

    metrics = {name: summarise(nme, aligned, test.yaw_deg) for name, (nme, aligned) in results.items()}
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.data), grid=grid.describe())
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    _write_per_sample(out / "per_sample.csv", results, test.yaw_deg)
    save_ced(out / "ced.png", {name: nme[np.isfinite(nme)] for name, (nme, _) in results.items()})
    _write_reconstruction(out, model, test, results["model"][0], grid)

    print(json.dumps(metrics, indent=2))
    print(f"metrics:        {out / 'metrics.json'}")
    print(f"error curve:    {out / 'ced.png'}")
    print(f"mesh:           {out / 'reconstruction.obj'}")
    print(f"picture:        {out / 'reconstruction.png'}")
    return 0


def _write_per_sample(path: Path, results: dict, yaw_deg: np.ndarray) -> None:
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        names = list(results)
        writer.writerow(["index", "yaw_deg"] + [f"{n}: {k}" for n in names for k in ("nme", "nme_aligned")])
        for i in range(len(yaw_deg)):
            row = [i, f"{yaw_deg[i]:.2f}"]
            for name in names:
                row += [f"{value[i]:.6f}" for value in results[name]]
            writer.writerow(row)


def _write_reconstruction(out: Path, model, test: TestSet, nme: np.ndarray, grid) -> None:
    """The median-error sample: coloured .obj of the prediction and a side-by-side PNG."""
    finite = np.flatnonzero(np.isfinite(nme))
    index = int(finite[np.argsort(nme[finite])[len(finite) // 2]]) if len(finite) else 0
    sample = test.sample(index, ("images", "vertices"))
    image = sample["images"]
    batch = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float().div(255.0)
    with torch.no_grad():
        volume = model.predict_step({"image": batch})[0].numpy()
    vertices, triangles = volume_to_mesh(volume, grid)
    write_obj(out / "reconstruction.obj", vertices, triangles, vertex_colours_from_image(vertices, image))
    panels = {
        "prediction": shade_mesh(vertices, triangles, grid.crop_size),
        "ground truth": shade_mesh(sample["vertices"], test.file.triangles, grid.crop_size),
    }
    save_comparison(out / "reconstruction.png", image, panels, title=f"sample {index}: NME {nme[index]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
