"""Preparing each scan once (read, landmarks, face region) into ``<out>.scans/<scan id>.npz`` with the key of
what it depends on; a scan whose key changed is prepared again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.scans.landmarks import (
    FACE_RADIUS_RATIO,
    FRONTAL_SIZE,
    LANDMARK_SUFFIXES,
    LandmarkDetector,
    face_region,
    landmark_file,
    read_landmark_file,
)
from data_prep.scans.reading import Scan, ScanError, ScanSet, load_scan
from data_prep.writing import parallel_map
from lightning_vrn import __version__
from lightning_vrn.atomic import file_sha256

CACHE_VERSION = 1
"""Bump when :func:`prepare_scan` changes what it computes: every cached scan is prepared again."""


@dataclass
class PreparedScan(Scan):
    """A :class:`Scan` with ``landmarks_3d`` (68, 3) and its face region ``face_vertices`` (F, 3) /
    ``face_triangles`` (T_f, 3), all in the scan's frame and units."""

    landmarks_3d: np.ndarray
    face_vertices: np.ndarray
    face_triangles: np.ndarray

    def save(self, path: Path, cache_key: str = "") -> None:
        """Write as ``.npz`` with its ``cache_key`` (:func:`cache_key`) via a temporary name (a kill never leaves a
        half-written cache)."""
        temp = path.with_name(path.name + ".tmp.npz")
        arrays = {name: getattr(self, name) for name in self.__dataclass_fields__}
        np.savez(temp, cache_key=np.array(cache_key), **arrays)
        temp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "PreparedScan":
        with np.load(path) as data:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    @staticmethod
    def stored_key(path: Path) -> str | None:
        """The cache key saved in the ``.npz`` at ``path``; None when it is missing, unreadable or keyless."""
        try:
            with np.load(path) as data:
                return str(data["cache_key"]) if "cache_key" in data.files else None
        except Exception:  # a missing, truncated or foreign file: prepare the scan again
            return None


def prepare_scan(path: Path, scan_id: str, landmark_dir: Path | None = None,
                 detector: LandmarkDetector | None = None) -> PreparedScan:
    """Read ``path``, find its landmarks (file in ``landmark_dir`` or ``detector``) and its face region."""
    scan = load_scan(path)
    if landmark_dir is not None:
        file = landmark_file(landmark_dir, scan_id)
        if file is None:
            raise ScanError(f"{path}: no landmark file {landmark_dir / scan_id}{{{','.join(LANDMARK_SUFFIXES)}}}; "
                            f"write 68 rows of 'x y' or 'x y z' there")
        landmarks_3d = read_landmark_file(file, scan)
    elif detector is not None:
        landmarks_3d = detector.find(scan, str(path))
    else:
        raise ValueError("prepare_scan needs landmark_dir or detector")
    face_vertices, face_triangles = face_region(scan.vertices, scan.triangles, landmarks_3d, str(path))
    return PreparedScan(scan.vertices, scan.triangles, scan.albedo, landmarks_3d, face_vertices, face_triangles)


# ----------------------------------------------------------------------------- the cache


_prepare_state: dict = {}


def _init_prepare(landmark_dir: Path | None, checkpoint: Path | None) -> None:
    _prepare_state.update(landmark_dir=landmark_dir,
                          detector=None if checkpoint is None else LandmarkDetector(checkpoint))


def _prepare_one(job: tuple[Path, str, Path, str]) -> tuple[str, str | None]:
    """Prepare one scan into its cache file (with its cache key); ``(scan id, None)`` or ``(scan id, why it was
    skipped)``."""
    path, scan_id, target, key = job
    try:
        prepared = prepare_scan(path, scan_id, _prepare_state["landmark_dir"], _prepare_state["detector"])
    except ScanError as error:
        return scan_id, str(error)
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared.save(target, key)
    return scan_id, None


def cache_file(cache_dir: Path, scan_id: str) -> Path:
    """Where the prepared scan ``scan_id`` is cached: ``cache_dir/<scan id>.npz``."""
    return cache_dir / f"{scan_id}.npz"


def _file_stamp(path: Path) -> list:
    """``[path, size, mtime_ns]`` of a file (``[path, None, None]`` when it is missing)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def cache_key(path: Path, scan_id: str, landmark_dir: Path | None, checkpoint_sha256: str | None) -> str:
    """What a prepared scan depends on, as JSON: the scan file (path, size, mtime), the landmark source (the
    scan's landmark file's path, size and mtime, or the detector checkpoint's SHA-256), :data:`FACE_RADIUS_RATIO`,
    :data:`FRONTAL_SIZE` and the code version (:data:`CACHE_VERSION`, the package version). A cached scan whose
    stored key differs is prepared again."""
    if checkpoint_sha256 is not None:
        landmarks = ["detector", checkpoint_sha256]
    else:
        file = None if landmark_dir is None else landmark_file(landmark_dir, scan_id)
        landmarks = ["file", None if file is None else _file_stamp(file)]
    return json.dumps({"cache_version": CACHE_VERSION, "code": __version__, "scan": _file_stamp(path),
                       "landmarks": landmarks, "face_radius_ratio": FACE_RADIUS_RATIO, "frontal_size": FRONTAL_SIZE})


def prepare_all(scans: ScanSet, cache_dir: Path, landmark_dir: Path | None, checkpoint: Path | None,
                workers: int = 1, progress: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Prepare every scan whose cache in ``cache_dir`` is missing or has another :func:`cache_key` (in ``workers``
    spawned processes); returns the skipped scans ``{scan id: reason}`` and every scan's key ``{scan id: key}``."""
    checkpoint_sha256 = None if checkpoint is None else file_sha256(checkpoint)
    keys = {scan_id: cache_key(path, scan_id, landmark_dir, checkpoint_sha256)
            for path, scan_id in zip(scans.paths, scans.ids)}
    jobs = [(path, scan_id, cache_file(cache_dir, scan_id), keys[scan_id])
            for path, scan_id in zip(scans.paths, scans.ids)
            if PreparedScan.stored_key(cache_file(cache_dir, scan_id)) != keys[scan_id]]
    skipped = {}
    with tqdm(total=len(scans.ids), initial=len(scans.ids) - len(jobs), desc=f"{scans.name} scans", unit="scan",
              disable=not progress) as bar:
        for scan_id, reason in parallel_map(_prepare_one, jobs, workers, _init_prepare, (landmark_dir, checkpoint)):
            if reason is not None:
                skipped[scan_id] = reason
            bar.update(1)
    return skipped, keys
