"""Prepared scans -> a test file: each scan at each of the dataset's poses, cropped, rendered and voxelised
(per-sample topology), resumably and in parallel; and the command line the scan datasets share."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from data_prep.arguments import add_grid_and_workers
from data_prep.render import RenderSettings, render
from data_prep.scans.cache import PreparedScan, cache_file, prepare_all
from data_prep.scans.landmarks import FACE_RADIUS_RATIO, FRONTAL_SIZE, frontal_view, render_frontal
from data_prep.scans.reading import ScanError, ScanSet, load_scan
from data_prep.synthetic import posed_sample, sample_rng
from data_prep.writing import check_finished, check_output, write_pending
from lightning_vrn import __version__
from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, front_z_shift, landmark_crop, leaves_grid
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop

FINISHED_KEYS = ("source", "seed", "scan_ids", "poses_deg", "landmarks_from", "face_radius_ratio", "scans_sha256")
"""File attributes a finished file must share with a rerun's to be left as it is
(:func:`data_prep.writing.check_finished`)."""


def make_scan_sample(scan: PreparedScan, pose: np.ndarray, grid: VoxelGrid, rng: np.random.Generator,
                     with_frontal: bool = False) -> dict[str, np.ndarray]:
    """One sample of ``scan`` at ``pose`` (pitch, yaw, roll radians) as :meth:`DatasetWriter.write` takes it
    (per-sample topology: ``vertices`` / ``triangles`` are the face region in crop coordinates)."""
    pose = np.asarray(pose, dtype=np.float64)
    size = grid.crop_size
    posed_landmarks = model_to_crop(scan.landmarks_3d, pose, 1.0, np.zeros(3))
    crop = landmark_crop(posed_landmarks[:, :2], size)
    posed_face = model_to_crop(scan.face_vertices, pose, crop.scale, np.zeros(3))
    translation = np.append(crop.translation, front_z_shift(grid, posed_face[:, 2]))
    vertices = model_to_crop(scan.vertices, pose, crop.scale, translation)
    face = posed_face + translation
    landmarks_3d = model_to_crop(scan.landmarks_3d, pose, crop.scale, translation)
    settings = RenderSettings.sample(rng)
    image, _ = render(vertices, scan.triangles, scan.albedo, size, settings)
    return posed_sample(image, face, scan.face_triangles, crop_rotation(pose), grid, landmarks_3d, pose, with_frontal,
                        triangles=scan.face_triangles.astype(np.int32))


# ----------------------------------------------------------------------------- conversion


def _setup_samples(cache_dir: Path, ids: Sequence[str], labels: Sequence[int] | None, poses_deg: np.ndarray,
                   grid: VoxelGrid, seed: int, name: str, with_frontal: bool) -> dict:
    return dict(cache_dir=cache_dir, ids=ids, labels=labels, poses=np.radians(poses_deg), grid=grid, seed=seed,
                name=name, with_frontal=with_frontal, loaded=(None, None))


def _make_sample(state: dict, index: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Sample ``index``: scan ``index // P`` at pose ``index % P`` (the last loaded scan is kept)."""
    scan_index, pose_index = divmod(index, len(state["poses"]))
    if state["loaded"][0] != scan_index:
        state["loaded"] = (scan_index, PreparedScan.load(cache_file(state["cache_dir"], state["ids"][scan_index])))
    sample = make_scan_sample(state["loaded"][1], state["poses"][pose_index], state["grid"],
                              sample_rng(state["seed"], state["name"], index), state["with_frontal"])
    if state["labels"] is not None:
        sample["expression_label"] = np.uint8(state["labels"][scan_index])
    return sample, {"leaves_grid": leaves_grid(sample["vertices"], state["grid"])}


def convert(scans: ScanSet, out: Path, grid: VoxelGrid, landmark_dir: Path | None = None,
            checkpoint: Path | None = None, workers: int = 1, seed: int = 0, with_frontal: bool = False,
            restart: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Write ``out`` (HDF5, per-sample topology) from ``scans``: every usable scan at every pose, scan-major.

    Prepared scans are cached in ``<out>.scans/``, each with its :func:`~data_prep.scans.cache.cache_key` (a scan
    whose file, landmark source, face radius or code changed is prepared again); a rerun resumes both passes.
    ``restart`` empties the cache and replaces an unfinished or finished ``out``. Without it, a finished ``out``
    made with the same arguments and prepared scans is left as it is, and one made otherwise raises
    FileExistsError (:func:`data_prep.writing.check_finished`, the rule of every producer). Returns the report
    (also written to ``<out>.report.json``): ``samples``, ``scans_used``, ``skipped`` {scan id: reason}.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out)
    check_output(out, restart=restart)
    poses_deg = np.asarray(scans.poses_deg, dtype=np.float64)
    attrs = {
        "face_model": "none (scans)",
        "source": scans.name,
        "seed": int(seed),
        "created_by": f"lightning_vrn.data_prep.{scans.name} {__version__}",
        "poses_deg": poses_deg,
        "landmarks_from": f"detector {checkpoint}" if checkpoint is not None else f"files {landmark_dir}",
        "face_radius_ratio": FACE_RADIUS_RATIO,
        "landmark_box_fraction": LANDMARK_BOX_FRACTION,
    }
    made_from = "from other scans or with other arguments"
    if out.exists() and not restart:  # the arguments first: their refusal prepares (and caches) nothing
        check_finished(out, grid, None, attrs, [key for key in FINISHED_KEYS if key in attrs], with_frontal,
                       made_from=made_from)
    cache_dir = out.with_name(out.name + ".scans")
    if restart and cache_dir.exists():
        shutil.rmtree(cache_dir)
    skipped, keys = prepare_all(scans, cache_dir, landmark_dir, checkpoint, workers, progress)
    used = [i for i, scan_id in enumerate(scans.ids) if scan_id not in skipped]
    for scan_id, reason in skipped.items():
        log(f"skipped {scan_id}: {reason}")
    if not used:
        raise ValueError(f"no usable scan among {len(scans.ids)} ({len(skipped)} skipped, reasons above); "
                         f"fix the inputs and rerun")
    ids = [scans.ids[i] for i in used]
    labels = None if scans.labels is None else [int(scans.labels[i]) for i in used]
    attrs.update(scan_ids=json.dumps(ids),
                 scans_sha256=hashlib.sha256(json.dumps([keys[scan_id] for scan_id in ids]).encode()).hexdigest())
    num_samples = len(ids) * len(poses_deg)
    report = {"out": str(out), "samples": num_samples, "poses": len(poses_deg), "scans_found": len(scans.ids),
              "scans_used": len(ids), "skipped": skipped}
    if out.exists() and not restart:
        check_finished(out, grid, num_samples, attrs, FINISHED_KEYS, with_frontal, made_from=made_from)
        log(f"{out} is already complete; skipping (--restart converts it again)")
        return report
    with DatasetWriter.for_scans(out, grid, num_samples, attrs, with_frontal=with_frontal, restart=restart,
                                 flags=("leaves_grid",), expression_names=scans.expression_names) as writer:
        write_pending(writer, _setup_samples, (cache_dir, ids, labels, poses_deg, grid, seed, scans.name, with_frontal),
                      _make_sample, workers, desc=scans.name, progress=progress)
        writer.finish()
    out.with_name(out.name + ".report.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {out}: {num_samples} samples from {len(ids)} of {len(scans.ids)} scans "
        f"({len(skipped)} skipped, listed in {out.name}.report.json)")
    return report


def save_frontal_renders(scans: ScanSet, folder: Path, progress: bool = True) -> dict[str, str]:
    """Write each scan's neutral frontal render (:data:`FRONTAL_SIZE` px, the frame of 68x2 landmark files) as
    ``folder/<scan id>.png``; returns the unreadable scans ``{scan id: reason}``."""
    from PIL import Image

    skipped = {}
    for path, scan_id in tqdm(list(zip(scans.paths, scans.ids)), desc="frontal renders", disable=not progress):
        try:
            scan = load_scan(path)
        except ScanError as error:
            skipped[scan_id] = str(error)
            continue
        target = folder / f"{scan_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_frontal(scan, frontal_view(scan.vertices, FRONTAL_SIZE), FRONTAL_SIZE)).save(target)
    return skipped


# ----------------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments both scan CLIs take."""
    parser.add_argument("--root", type=Path, required=True, help="the dataset's top folder")
    parser.add_argument("--out", type=Path, help="output HDF5 file (required unless --save-frontal)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--landmarks-model", type=Path, metavar="CKPT",
                        help="landmark_hourglass checkpoint: finds 68 landmarks on each scan's frontal render")
    source.add_argument("--landmarks", type=Path, metavar="DIR",
                        help="per-scan landmark files DIR/<scan id>.txt or .npy: 68 rows of x y z on the scan, or "
                             f"x y pixels on the {FRONTAL_SIZE} px frontal render (see --save-frontal)")
    source.add_argument("--save-frontal", type=Path, metavar="DIR",
                        help=f"only write each scan's {FRONTAL_SIZE} px frontal render as DIR/<scan id>.png "
                             "(to find landmarks with another detector), then stop")
    add_grid_and_workers(parser, "processes")
    parser.add_argument("--seed", type=int, default=0, help="seeds the lighting and backgrounds (default 0)")
    parser.add_argument("--frontal", action="store_true", help="also store frontal volumes (no-alignment ablation)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the prepared-scan cache and an unfinished or finished output, and start over "
                             "(a finished output made with the same arguments is otherwise left as it is; one made "
                             "otherwise is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace, scans: ScanSet) -> int:
    """Run a scan CLI's conversion (or ``--save-frontal``) after its own arguments made ``scans``."""
    if args.landmarks_model is not None and not args.landmarks_model.is_file():
        parser.error(f"--landmarks-model {args.landmarks_model} does not exist; train a landmark_hourglass first")
    if args.landmarks is not None and not args.landmarks.is_dir():
        parser.error(f"--landmarks {args.landmarks} is not a folder of per-scan landmark files")
    if args.out is None and args.save_frontal is None:
        parser.error("--out FILE.h5 is required (unless --save-frontal)")
    if args.save_frontal is not None:
        skipped = save_frontal_renders(scans, args.save_frontal, progress=not args.no_progress)
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}", file=sys.stderr)
        print(f"wrote {len(scans.ids) - len(skipped)} frontal renders to {args.save_frontal}", file=sys.stderr)
        return 0
    convert(scans, args.out, args.grid, args.landmarks, args.landmarks_model, args.workers, args.seed, args.frontal,
            args.restart, progress=not args.no_progress)
    return 0
