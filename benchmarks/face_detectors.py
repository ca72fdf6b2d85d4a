"""Face detectors on real AFLW2000-3D photos: detection rate per |yaw| bucket, false positives, ms per photo.

``python -m benchmarks.face_detectors [--root ../shared/data/aflw2000_val] [--detector mtcnn mediapipe]
[--out benchmarks/results_face_detectors.md]``

Each detector runs on every whole photo (``imageNNNNN.jpg``; its ``.mat`` gives the 68 true landmarks,
``pt3d_68[:2]`` 1-based, and the yaw, ``Pose_Para[0, 1]``). A photo is a hit when some box's centre lies
inside the true landmarks' bounding box and the box's side (the square root of its area) is 0.5-2.5 times
that box's; every other box is a false positive. Time is the detector call alone, per photo, after one
warm-up photo; CPU time over wall time says how many cores it kept busy.

Detectors: ``mtcnn``, the product's (:class:`lightning_vrn.faces.FaceDetector`, one torch thread), and
``mediapipe``, mediapipe 0.10.21's short-range BlazeFace (its ``.tflite`` ships in the wheel), which does not
install beside the suite's pins: run it from a separate virtualenv holding numpy, pillow, scipy and
mediapipe (``pip install --no-deps mediapipe==0.10.21 opencv-python-headless matplotlib attrs``). So torch,
mediapipe and the project are imported only inside the branch that needs them.

``--out`` keeps one section per detector: a run rewrites its detectors' sections and keeps the others.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.io
from PIL import Image

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in photo pixels."""
YAW_BUCKETS_DEG = ((0, 30), (30, 60), (60, 90))
"""The AFLW2000-3D protocol's |yaw| buckets (as ``lightning_vrn.metrics.report``); the last takes |yaw| >= 90."""
SIZE_RANGE = (0.5, 2.5)
"""A hit's box side over the true landmarks' box side."""
TITLE = "# Face detectors on real AFLW2000-3D photos (`python -m benchmarks.face_detectors`)"


def mtcnn() -> tuple[Callable[[np.ndarray], list[Box]], str]:
    """The product's MTCNN on one torch thread, and a line naming its versions."""
    import torch

    from lightning_vrn.faces import FaceDetector

    torch.set_num_threads(1)
    detector = FaceDetector()
    about = (f"torch {torch.__version__}, weights of facenet-pytorch {version('facenet-pytorch')}, "
             f"min face 20 px, one torch thread")
    return (lambda image: [face.box for face in detector.detect(image)]), about


def mediapipe() -> tuple[Callable[[np.ndarray], list[Box]], str]:
    """mediapipe's short-range face detector (default confidence 0.5), and a line naming its versions."""
    import mediapipe as mp

    detector = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)

    def detect(image: np.ndarray) -> list[Box]:
        height, width = image.shape[:2]
        boxes = []
        for detection in detector.process(image).detections or []:
            box = detection.location_data.relative_bounding_box
            boxes.append((box.xmin * width, box.ymin * height,
                          (box.xmin + box.width) * width, (box.ymin + box.height) * height))
        return boxes

    about = (f"mediapipe {mp.__version__} short-range model (model_selection=0, min confidence 0.5), "
             f"numpy {np.__version__}, protobuf {version('protobuf')}, TFLite XNNPACK with mediapipe's default threads")
    return detect, about


DETECTORS = {"mtcnn": mtcnn, "mediapipe": mediapipe}


def read_truth(mat_path: Path) -> tuple[np.ndarray, float]:
    """``(68, 2)`` true landmarks (0-based photo pixels) and |yaw| in degrees of an AFLW2000-3D ``.mat``."""
    mat = scipy.io.loadmat(mat_path)
    return mat["pt3d_68"][:2].T - 1.0, abs(float(np.degrees(mat["Pose_Para"][0, 1])))


def is_hit(box: Box, truth: np.ndarray) -> bool:
    """Whether ``box``'s centre lies in the landmarks' bounding box and its side is within :data:`SIZE_RANGE`."""
    lo, hi = truth.min(axis=0), truth.max(axis=0)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    ratio = np.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0) / np.prod(hi - lo))
    return bool((lo <= centre).all() and (centre <= hi).all() and SIZE_RANGE[0] <= ratio <= SIZE_RANGE[1])


def measure(name: str, photos: list[Path]) -> tuple[str, list[tuple[str, str]]]:
    """Run detector ``name`` over ``photos``: a line naming its versions and the ``(measurement, result)`` rows."""
    detect, about = DETECTORS[name]()
    detect(np.asarray(Image.open(photos[0]).convert("RGB")))  # warm-up
    hits, yaws, false_positives, wall_ms, cpu_ms = [], [], 0, [], 0.0
    for photo in photos:
        image = np.asarray(Image.open(photo).convert("RGB"))
        truth, yaw = read_truth(photo.with_suffix(".mat"))
        start, start_cpu = time.perf_counter(), time.process_time()
        boxes = detect(image)
        wall_ms.append(1000 * (time.perf_counter() - start))
        cpu_ms += 1000 * (time.process_time() - start_cpu)
        box_hits = [is_hit(box, truth) for box in boxes]
        hits.append(any(box_hits))
        false_positives += box_hits.count(False)
        yaws.append(yaw)
    hits, yaws = np.array(hits), np.array(yaws)
    rows = [("photos", str(len(photos))), ("detection rate, all", rate(hits))]
    for lo, hi in YAW_BUCKETS_DEG:
        inside = (yaws >= lo) & ((yaws < hi) | (hi == YAW_BUCKETS_DEG[-1][1]))
        rows.append((f"detection rate, absolute yaw {lo}-{hi} degrees", rate(hits[inside])))
    rows += [
        ("false positives per photo", f"{false_positives / len(photos):.3f} ({false_positives} boxes)"),
        ("ms per photo, median / mean (after one warm-up photo)", f"{np.median(wall_ms):.1f} / {np.mean(wall_ms):.1f}"),
        ("CPU time over wall time while detecting", f"{cpu_ms / sum(wall_ms):.2f}"),
    ]
    return about, rows


def rate(hits: np.ndarray) -> str:
    """``hits``' percentage with its counts."""
    return f"{100 * hits.mean():.1f}% ({hits.sum()} of {len(hits)})" if len(hits) else "no photos"


def section(name: str, root: Path, about: str, rows: list[tuple[str, str]]) -> str:
    """A detector's markdown section: how it ran, then its table."""
    machine = f"{platform.node()} ({platform.processor() or platform.machine()})"
    return "\n".join([
        f"## {name}", "",
        f"`--detector {name} --root {root}` on {machine}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}: {about}.", "",
        "| measurement | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
    ])


def merge(out: Path, sections: dict[str, str]) -> str:
    """``out``'s text with ``sections`` replacing (or joining) its detectors' sections, in :data:`DETECTORS` order."""
    kept = {}
    if out.exists():
        for chunk in re.split(r"(?m)^(?=## )", out.read_text())[1:]:
            kept[chunk.split()[1]] = chunk.rstrip("\n") + "\n"
    kept.update(sections)
    header = (f"{TITLE}\n\nA hit: a box whose centre lies inside the 68 true landmarks' box and whose side "
              f"is {SIZE_RANGE[0]}-{SIZE_RANGE[1]} times that box's; a false positive: any other box. "
              f"Each section is its own run (the detectors need different environments).\n")
    return "\n".join([header] + [kept[name] for name in DETECTORS if name in kept])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/aflw2000_val"))
    parser.add_argument("--detector", nargs="+", choices=sorted(DETECTORS), default=["mtcnn"])
    parser.add_argument("--out", type=Path, default=None, help="also write (merge) the sections here")
    args = parser.parse_args(argv)
    photos = sorted(args.root.glob("image*.jpg"))
    if not photos:
        parser.error(f"no imageNNNNN.jpg under {args.root}")
    sections = {}
    for name in args.detector:
        sections[name] = section(name, args.root, *measure(name, photos))
        print(sections[name])
    if args.out:
        from lightning_vrn.atomic import write_text

        write_text(args.out, merge(args.out, sections))


if __name__ == "__main__":
    main()
