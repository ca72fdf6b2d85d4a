"""68-point landmark NME of the photo pipeline on real AFLW2000-3D photos: detector box -> landmark hourglass.

``python -m benchmarks.photo_landmarks --landmarks DETECTOR.ckpt [--root ../shared/data/aflw2000_val]
[--out benchmarks/results_photo_landmarks.md]``

For each photo (``imageNNNNN.jpg`` + ``.mat``) the face detector runs on the whole photo; the face is the
detected box nearest the 68 true landmarks' box (a photo with none whose centre lies inside that box counts as
a miss). The landmark hourglass then runs as ``experiments.reconstruct`` runs it
(:func:`lightning_vrn.faces.reconstruction.hourglass_landmarks`: one pass on the crop of the detector's box).
Scored with the AFLW2000-3D protocol (:mod:`lightning_vrn.metrics.landmark_nme`: error over the true landmarks'
box size, per |yaw| bucket and balanced) against ``pt3d_68``'s x, y: every detected face, then the faces where
the hourglass is confident and unsure (mean heatmap peak at least / below
:data:`~lightning_vrn.faces.reconstruction.CONFIDENT_PEAK`), then the faces by quartile of that peak (how well
it predicts the error). For the same faces, the crop error of the authors' crop of the hourglass's landmarks and of
the crop from the detector's box (:func:`~lightning_vrn.faces.reconstruction.detector_box_crop`): the mean
distance, over the 68 true landmarks, between where each crop puts them and where the authors' crop of the true
landmarks does, as a fraction of the crop size (what chose the threshold). Also "true crop": one pass on the authors' crop of the true landmarks, as
``experiments.evaluate`` scores the same checkpoint on a converted file.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from benchmarks.face_detectors import read_truth
from lightning_vrn.atomic import write_text
from lightning_vrn.faces import FaceDetector
from lightning_vrn.faces.reconstruction import CONFIDENT_PEAK, detector_box_crop, hourglass_landmarks, image_batch
from lightning_vrn.geometry.crop import CropTransform, landmark_crop, resample_crop
from lightning_vrn.heatmaps import decode_heatmaps
from lightning_vrn.metrics.landmark_nme import LandmarkNME
from lightning_vrn.models import load_model


def nearest_face(faces, truth: np.ndarray):
    """The detected face whose box centre is nearest the true landmarks' box centre, if it lies inside that box."""
    lo, hi = truth.min(axis=0), truth.max(axis=0)
    centres = [np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) for f in faces]
    inside = [(np.linalg.norm(c - (lo + hi) / 2), i) for i, c in enumerate(centres) if (lo <= c).all() and (c <= hi).all()]
    return faces[min(inside)[1]] if inside else None


def crop_error(crop: CropTransform, truth: np.ndarray, size: int) -> float:
    """Mean distance (fraction of the crop) between where ``crop`` and the true landmarks' crop put them."""
    return float(np.linalg.norm(crop.apply(truth) - landmark_crop(truth, size).apply(truth), axis=1).mean() / size)


def score(rows: list[tuple[np.ndarray, np.ndarray, float]]) -> dict[str, float]:
    """Landmark NME summary (mean, per |yaw| bucket, balanced) of ``(predicted, true, yaw)`` rows."""
    metric = LandmarkNME()
    if rows:
        predicted, truth, yaw = (np.stack(column) for column in zip(*rows))
        metric.update(torch.from_numpy(predicted).float(), torch.from_numpy(truth).float(),
                      torch.from_numpy(yaw).float(), torch.arange(len(rows)))
    return {name.removeprefix("landmark_nme"): float(value) for name, value in metric.compute().items()}


def crop_columns(errors: np.ndarray) -> str:
    """The crop-error cell of a table row: landmarks / box."""
    return f"{errors[0]:.4f} / {errors[1]:.4f}"


def table_row(name: str, rows: list, crop_cell: str) -> str:
    """One markdown row: the landmark NMEs of ``rows`` (:func:`score`) and the crop-error cell."""
    s = score(rows)
    return (f"| {name} | {len(rows)} | {s['']:.4f} | {s['_yaw_0_30']:.4f} | {s['_yaw_30_60']:.4f} | "
            f"{s['_yaw_60_90']:.4f} | {s['_balanced']:.4f} | {crop_cell} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landmarks", type=Path, required=True, help="a landmark_hourglass checkpoint")
    parser.add_argument("--root", type=Path, default=Path("../shared/data/aflw2000_val"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_photo_landmarks.md"))
    parser.add_argument("--about", default="", help="what the checkpoint is (how it was trained), for the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, detector = load_model(args.landmarks), FaceDetector()
    size = model.grid.crop_size
    true_crop_rows, detected_rows, peaks, crop_errors = [], [], [], []
    photos = sorted(args.root.glob("image*.jpg"))
    seconds = 0.0
    for photo in tqdm(photos, desc="photos", unit="photo"):
        image = np.asarray(Image.open(photo).convert("RGB"))
        truth, abs_yaw_deg = read_truth(photo.with_suffix(".mat"))
        yaw = np.radians(abs_yaw_deg)  # the buckets take |yaw|
        crop = landmark_crop(truth, size)
        heatmaps = model.eval()({"image": image_batch([resample_crop(image, crop, size)])})["heatmaps"]
        true_crop_rows.append((crop.invert(decode_heatmaps(heatmaps)[0].numpy()), truth, yaw))
        start = time.perf_counter()
        face = nearest_face(detector.detect(image), truth)
        if face is None:
            continue
        points, peak = hourglass_landmarks(model, [image], [face])[0]
        seconds += time.perf_counter() - start
        detected_rows.append((points, truth, yaw))
        peaks.append(peak)
        crop_errors.append((crop_error(landmark_crop(points, size), truth, size),
                            crop_error(detector_box_crop(face, size), truth, size)))
    found, peaks, crop_errors = len(detected_rows), np.array(peaks), np.array(crop_errors).reshape(-1, 2)
    groups = {"hourglass on the detector's box": np.ones(found, bool),
              f"confident (peak >= {CONFIDENT_PEAK})": peaks >= CONFIDENT_PEAK,
              f"unsure (peak < {CONFIDENT_PEAK})": peaks < CONFIDENT_PEAK}
    edges = np.quantile(peaks, [0, 0.25, 0.5, 0.75, 1]) if found else np.zeros(5)
    for lo, hi in zip(edges[:-1], edges[1:]):
        groups[f"peak {lo:.2f}-{hi:.2f}"] = (peaks >= lo) & (peaks <= hi)
    lines = [
        "# Photo landmarks: detector box -> landmark hourglass, real AFLW2000-3D photos",
        "",
        f"`python -m benchmarks.photo_landmarks --landmarks {args.landmarks} --root {args.root}` on "
        f"{platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, one thread, "
        f"{time.strftime('%Y-%m-%d')}. {args.about}",
        "",
        f"{len(photos)} photos; the face detected in {found} ({len(photos) - found} missed); detector + hourglass "
        f"{1000 * seconds / max(found, 1):.0f} ms per photo. 68-point NME (AFLW2000-3D protocol), ground truth "
        f"`pt3d_68`; peak: the mean of the 68 heatmap maxima.",
        "",
        "| landmarks | faces | NME | yaw 0-30 | yaw 30-60 | yaw 60-90 | balanced | crop error: landmarks / box |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, chosen in groups.items():
        lines.append(table_row(name, [row for row, keep in zip(detected_rows, chosen) if keep],
                               crop_columns(crop_errors[chosen].mean(axis=0)) if chosen.any() else "-"))
    lines.append(table_row("true crop", true_crop_rows, "-"))
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
