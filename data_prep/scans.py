"""Real textured 3D scans (Florence / MICC, BU-4DFE) -> test samples with per-sample ground truth (docs/datasets_scans.md).

Per scan (:func:`prepare_scan`, once, cached as ``.npz`` with its :func:`cache_key`):

- read the textured mesh (:func:`lightning_vrn.geometry.mesh_io.read_textured_mesh`) and sample its
  texture at the vertices (per-vertex albedo: the mean of the bilinear texture samples of the
  vertex's triangle corners); the scan's frame must be the model frame (y up, z towards the camera,
  as both datasets ship them); triangles are reversed when most of the surface faces away from +z;
- 68 landmarks in the scan's frame: from a per-scan file (68x3 on the scan, or 68x2 pixels on the
  frontal render, :func:`frontal_view`), or detected by a landmark checkpoint on the frontal render
  (:class:`LandmarkDetector`); 2D landmarks are lifted to 3D through the render's depth;
- the face region: the triangles whose three vertices lie within :data:`FACE_RADIUS_RATIO` outer
  interocular distances (landmarks 37 and 46, 1-based) of the nose tip (landmark 31, 1-based).

Per sample (:func:`make_scan_sample`: one scan at one pose): rotate the whole scan by the pose,
crop it by its 68-landmark box as the synthetic data is (:func:`lightning_vrn.geometry.crop.landmark_crop`,
no jitter), put the face region's nearest point at :func:`lightning_vrn.geometry.crop.front_z`
(:func:`~lightning_vrn.geometry.crop.front_z_shift`), render the whole textured scan with a random light
direction and colour over a random background, and voxelise the face region aligned with the image.
The sample's ``vertices`` / ``triangles`` are the face region in crop coordinates (its own topology),
``landmarks_3d`` the lifted landmarks (the NME's interocular distance).

:func:`convert` runs both passes in parallel and resumably, and skips and reports scans that cannot
be used (unreadable file, missing texture, no face found) without stopping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from data_prep.arguments import add_grid_and_workers
from data_prep.render import RenderSettings, TextureSettings, render
from data_prep.synthetic import posed_sample, sample_rng
from data_prep.writing import check_finished, check_output, parallel_map, write_pending
from lightning_vrn import __version__
from lightning_vrn.atomic import file_sha256
from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, front_z_shift, landmark_crop, leaves_grid
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.mesh_io import TexturedMesh, front_facing, read_textured_mesh
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.landmark_scheme import NUM_LANDMARKS, outer_interocular

FACE_RADIUS_RATIO = 1.0
"""Face-region radius about the nose tip in outer interocular distances (about 95 mm on an adult: the
radius commonly cropped from Florence scans; it keeps forehead, cheeks and chin and drops ears and neck)."""
NOSE_TIP = 30
"""0-based iBUG index of the nose tip (31, 1-based)."""
MIN_FACE_VERTICES = 100
"""A face region with fewer vertices means no face was found."""
FRONTAL_SIZE = 192
"""Side (px) of the frontal render that 68x2 landmark files refer to (``--save-frontal`` writes it)."""
FRONTAL_FILL = 0.9
"""The frontal render's scale: the scan's larger x/y extent spans this fraction of the image."""
LIFT_SEARCH_PX = 3
"""A 2D landmark off the rendered scan takes the depth of the nearest covered pixel within this many pixels."""
LANDMARK_SUFFIXES = (".txt", ".npy")
CACHE_VERSION = 1
"""Bump when :func:`prepare_scan` changes what it computes: every cached scan is prepared again."""
FINISHED_KEYS = ("source", "seed", "scan_ids", "poses_deg", "landmarks_from", "face_radius_ratio", "scans_sha256")
"""File attributes a finished file must share with a rerun's to be left as it is
(:func:`data_prep.writing.check_finished`)."""


class ScanError(ValueError):
    """A scan that cannot become samples (unreadable, untextured, no face): skipped and reported."""


@dataclass
class Scan:
    """A scan ready to render: ``vertices`` (V, 3) in its own units (model frame: y up, z towards the
    camera), ``triangles`` (T, 3) counter-clockwise seen from the front, ``albedo`` (V, 3) in [0, 1]."""

    vertices: np.ndarray
    triangles: np.ndarray
    albedo: np.ndarray


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


# ----------------------------------------------------------------------------- reading


def load_scan(path) -> Scan:
    """Read a textured ``.obj`` / ``.wrl`` scan and its texture; :class:`ScanError` names the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        mesh = read_textured_mesh(path)
    except (OSError, ValueError) as error:
        raise ScanError(str(error)) from None
    try:
        with Image.open(mesh.texture_path) as image:
            texture = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise ScanError(f"{path}: texture image {mesh.texture_path} cannot be read ({error})") from None
    if not np.isfinite(mesh.vertices).all():
        raise ScanError(f"{path}: the scan has NaN or inf coordinates")
    triangles = front_facing(mesh.vertices, mesh.triangles)
    return Scan(mesh.vertices, triangles, texture_albedo(mesh, texture))


def texture_albedo(mesh: TexturedMesh, texture: np.ndarray) -> np.ndarray:
    """``(V, 3)`` per-vertex albedo: the mean over a vertex's triangle corners of the bilinear sample of the
    ``(H, W, 3)`` texture (in [0, 1]) at the corner's texture coordinate (v up; clamped to the image).
    Vertices in no triangle get mid grey."""
    height, width = texture.shape[:2]
    uv = mesh.uv[mesh.uv_triangles.ravel()]                                   # (3T, 2)
    x = np.clip(uv[:, 0], 0.0, 1.0) * (width - 1)
    y = (1.0 - np.clip(uv[:, 1], 0.0, 1.0)) * (height - 1)
    x0 = np.clip(x.astype(np.int64), 0, max(width - 2, 0))
    y0 = np.clip(y.astype(np.int64), 0, max(height - 2, 0))
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    samples = ((1 - fy) * ((1 - fx) * texture[y0, x0] + fx * texture[y0, x1])
               + fy * ((1 - fx) * texture[y1, x0] + fx * texture[y1, x1]))
    corner_vertex = mesh.triangles.ravel()
    count = np.bincount(corner_vertex, minlength=len(mesh.vertices))
    albedo = np.stack([np.bincount(corner_vertex, samples[:, c], minlength=len(mesh.vertices)) for c in range(3)], 1)
    albedo[count == 0] = 0.5
    return albedo / np.maximum(count, 1)[:, None]


# ----------------------------------------------------------------------------- frontal view and landmarks


@dataclass(frozen=True)
class FrontalView:
    """The orthographic frontal render's placement: ``crop = model_to_crop(vertices, 0, scale, translation)``."""

    scale: float              # px per scan unit
    translation: np.ndarray   # (3,) crop position of the scan origin (px)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        return model_to_crop(points, np.zeros(3), self.scale, self.translation)

    def to_scan(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_crop` for ``(N, 3)`` crop points."""
        return (np.asarray(points, dtype=np.float64) - self.translation) / self.scale * np.array([1.0, -1.0, -1.0])


def frontal_view(vertices: np.ndarray, size: int, landmarks_2d_scan: np.ndarray | None = None) -> FrontalView:
    """Placement of the frontal render of ``size`` px: the scan's x/y box filling :data:`FRONTAL_FILL` of it,
    centred; or, given ``(68, 2)`` scan-frame x/y landmarks, their box placed as
    :func:`~lightning_vrn.geometry.crop.landmark_crop` places a face. The nearest point is at z = 0."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if landmarks_2d_scan is None:
        lo, hi = vertices[:, :2].min(0), vertices[:, :2].max(0)
        scale = FRONTAL_FILL * size / max(float((hi - lo).max()), 1e-12)
        centre = (size - 1) / 2.0
        translation = np.array([centre - scale * 0.5 * (lo[0] + hi[0]), centre + scale * 0.5 * (lo[1] + hi[1])])
    else:
        flipped = np.asarray(landmarks_2d_scan, dtype=np.float64) * [1.0, -1.0]  # y down, as in the crop
        crop = landmark_crop(flipped, size)
        scale, translation = crop.scale, np.asarray(crop.translation)
    return FrontalView(scale, np.append(translation, scale * vertices[:, 2].max()))


def neutral_settings() -> RenderSettings:
    """Lighting for the frontal render that landmarks are found on: white light from the camera, grey background."""
    grey = np.full(3, 0.5)
    background = TextureSettings("noise", grey, grey, 0.0, 0.1, 0.0, 0.0, 0)
    return RenderSettings(light_direction=np.array([0.0, 0.0, -1.0]), light_colour=np.full(3, 0.7), ambient=0.4,
                          skin_tone=grey, background=background)


def render_frontal(scan: Scan, view: FrontalView, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 frontal render of ``scan`` placed by ``view`` under :func:`neutral_settings`."""
    return render(view.to_crop(scan.vertices), scan.triangles, scan.albedo, size, neutral_settings())[0]


def lift_landmarks(landmarks_px: np.ndarray, scan: Scan, view: FrontalView, size: int, where: str) -> np.ndarray:
    """``(68, 2)`` pixels on the frontal render (``view``, ``size``) -> ``(68, 3)`` scan-frame points on the surface.

    Depth: bilinear over the covered pixels around each landmark (the nearest covered pixel within
    :data:`LIFT_SEARCH_PX` when none of the four is covered). :class:`ScanError` (naming ``where``) for
    a landmark off the scan.
    """
    landmarks_px = np.asarray(landmarks_px, dtype=np.float64)
    depth = rasterise(view.to_crop(scan.vertices), scan.triangles, size, size).depth
    covered = np.isfinite(depth)
    rows, cols = np.nonzero(covered)
    lifted = np.empty((NUM_LANDMARKS, 3))
    for i, (x, y) in enumerate(landmarks_px):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        weights, values = [], []
        for yy, xx, weight in ((y0, x0, (1 - (x - x0)) * (1 - (y - y0))), (y0, x0 + 1, (x - x0) * (1 - (y - y0))),
                               (y0 + 1, x0, (1 - (x - x0)) * (y - y0)), (y0 + 1, x0 + 1, (x - x0) * (y - y0))):
            if 0 <= yy < size and 0 <= xx < size and covered[yy, xx]:
                weights.append(weight)
                values.append(depth[yy, xx])
        if sum(weights) > 1e-9:
            z = float(np.dot(weights, values) / sum(weights))
        else:
            distance = np.hypot(cols - x, rows - y) if len(rows) else np.array([np.inf])
            nearest = int(distance.argmin())
            if distance[nearest] > LIFT_SEARCH_PX:
                raise ScanError(f"{where}: landmark {i + 1} (1-based) at ({x:.1f}, {y:.1f}) px of the frontal render "
                                f"is not on the scan: no face found (check the landmarks or the scan's orientation)")
            z = float(depth[rows[nearest], cols[nearest]])
        lifted[i] = (x, y, z)
    return view.to_scan(lifted)


class LandmarkDetector:
    """68 landmarks of a frontal render by a trained landmark checkpoint (``landmark_hourglass``).

    Two passes: the whole scan framed by :func:`frontal_view`, then the face re-framed by the first
    pass's landmarks as the detector was trained (``sqrt(w h)`` of the landmark box at
    :data:`~lightning_vrn.geometry.crop.LANDMARK_BOX_FRACTION` of its crop).
    """

    def __init__(self, checkpoint):
        import torch

        from lightning_vrn.models import load_model

        torch.set_num_threads(1)
        self.model = load_model(checkpoint)
        if not callable(getattr(self.model, "landmarks", None)):
            raise ValueError(f"--landmarks-model {checkpoint}: variant {self.model.variant!r} predicts no landmarks; "
                             f"pass a landmark_hourglass checkpoint (python -m experiments.train with its config)")
        self.crop_size = self.model.grid.crop_size

    def detect(self, image: np.ndarray) -> np.ndarray:
        """``(S, S, 3)`` uint8 render at the detector's crop size -> ``(68, 2)`` float64 pixels."""
        import torch

        batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)}
        return self.model.landmarks(batch)[0].double().numpy()

    def find(self, scan: Scan, where: str) -> np.ndarray:
        """``(68, 3)`` scan-frame landmarks of ``scan``."""
        view = frontal_view(scan.vertices, self.crop_size)
        landmarks = lift_landmarks(self.detect(render_frontal(scan, view, self.crop_size)), scan, view,
                                   self.crop_size, where)
        view = frontal_view(scan.vertices, self.crop_size, landmarks[:, :2])
        return lift_landmarks(self.detect(render_frontal(scan, view, self.crop_size)), scan, view,
                              self.crop_size, where)


def landmark_file(landmark_dir: Path, scan_id: str) -> Path | None:
    """``landmark_dir/<scan id>.txt`` or ``.npy`` (the scan's path under the root, suffix replaced), if present."""
    for suffix in LANDMARK_SUFFIXES:
        candidate = landmark_dir / f"{scan_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_landmark_file(path: Path, scan: Scan) -> np.ndarray:
    """``(68, 3)`` scan-frame landmarks from a file of 68 rows: x y z on the scan, or x y pixels on the frontal
    render (:func:`frontal_view` at :data:`FRONTAL_SIZE`), lifted. Text: whitespace or commas."""
    try:
        values = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except ValueError:
        try:
            values = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as error:
            raise ScanError(f"{path}: not a table of numbers ({error}); write 68 rows of 'x y' or 'x y z'") from None
    values = np.asarray(values, dtype=np.float64)
    if values.shape not in ((NUM_LANDMARKS, 2), (NUM_LANDMARKS, 3)) or not np.isfinite(values).all():
        raise ScanError(f"{path}: landmarks must be 68 finite rows of 'x y' (pixels on the {FRONTAL_SIZE} px frontal "
                        f"render) or 'x y z' (on the scan), got shape {values.shape}")
    if values.shape[1] == 3:
        return values
    return lift_landmarks(values, scan, frontal_view(scan.vertices, FRONTAL_SIZE), FRONTAL_SIZE, str(path))


# ----------------------------------------------------------------------------- face region


def face_region(vertices: np.ndarray, triangles: np.ndarray, landmarks_3d: np.ndarray,
                where: str) -> tuple[np.ndarray, np.ndarray]:
    """The sub-mesh ``(F, 3)``, ``(T_f, 3)`` of triangles whose corners all lie within
    :data:`FACE_RADIUS_RATIO` interocular distances of the nose tip; unused vertices dropped."""
    interocular = float(outer_interocular(landmarks_3d))
    if not interocular > 0:
        raise ScanError(f"{where}: the outer eye corners coincide: no face found")
    inside = np.linalg.norm(vertices - landmarks_3d[NOSE_TIP], axis=1) <= FACE_RADIUS_RATIO * interocular
    kept = triangles[inside[triangles].all(axis=1)]
    used = np.unique(kept)
    if len(used) < MIN_FACE_VERTICES:
        raise ScanError(f"{where}: only {len(used)} scan vertices within {FACE_RADIUS_RATIO:g} interocular distances "
                        f"of the nose tip: no face found (check the landmarks)")
    new_id = np.full(len(vertices), -1, dtype=np.int64)
    new_id[used] = np.arange(len(used))
    return vertices[used], new_id[kept]


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


# ----------------------------------------------------------------------------- samples


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


@dataclass(frozen=True)
class ScanSet:
    """What a dataset CLI found: ``paths`` of the scans, their ``ids`` (paths under the root without suffix),
    ``labels`` (expression label id per scan, or None) with ``expression_names``, and ``poses_deg`` (P, 3)."""

    name: str
    paths: Sequence[Path]
    ids: Sequence[str]
    poses_deg: np.ndarray
    labels: Sequence[int] | None = None
    expression_names: Sequence[str] | None = None


# ----------------------------------------------------------------------------- conversion

_prepare_state: dict = {}


def _init_prepare(landmark_dir: Path | None, checkpoint: Path | None) -> None:
    _prepare_state.update(landmark_dir=landmark_dir,
                          detector=None if checkpoint is None else LandmarkDetector(checkpoint))


def _prepare_one(job: tuple[Path, str, Path, str]) -> tuple[str, str | None]:
    """Prepare one scan into its cache file (with its cache key); ``(scan id, None)`` or ``(scan id, why it was
    skipped)``."""
    path, scan_id, cache_file, key = job
    try:
        prepared = prepare_scan(path, scan_id, _prepare_state["landmark_dir"], _prepare_state["detector"])
    except ScanError as error:
        return scan_id, str(error)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    prepared.save(cache_file, key)
    return scan_id, None


def _cache_file(cache_dir: Path, scan_id: str) -> Path:
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
    jobs = [(path, scan_id, _cache_file(cache_dir, scan_id), keys[scan_id])
            for path, scan_id in zip(scans.paths, scans.ids)
            if PreparedScan.stored_key(_cache_file(cache_dir, scan_id)) != keys[scan_id]]
    skipped = {}
    with tqdm(total=len(scans.ids), initial=len(scans.ids) - len(jobs), desc=f"{scans.name} scans", unit="scan",
              disable=not progress) as bar:
        for scan_id, reason in parallel_map(_prepare_one, jobs, workers, _init_prepare, (landmark_dir, checkpoint)):
            if reason is not None:
                skipped[scan_id] = reason
            bar.update(1)
    return skipped, keys


def _setup_samples(cache_dir: Path, ids: Sequence[str], labels: Sequence[int] | None, poses_deg: np.ndarray,
                   grid: VoxelGrid, seed: int, name: str, with_frontal: bool) -> dict:
    return dict(cache_dir=cache_dir, ids=ids, labels=labels, poses=np.radians(poses_deg), grid=grid, seed=seed,
                name=name, with_frontal=with_frontal, loaded=(None, None))


def _make_sample(state: dict, index: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Sample ``index``: scan ``index // P`` at pose ``index % P`` (the last loaded scan is kept)."""
    scan_index, pose_index = divmod(index, len(state["poses"]))
    if state["loaded"][0] != scan_index:
        state["loaded"] = (scan_index, PreparedScan.load(_cache_file(state["cache_dir"], state["ids"][scan_index])))
    sample = make_scan_sample(state["loaded"][1], state["poses"][pose_index], state["grid"],
                              sample_rng(state["seed"], state["name"], index), state["with_frontal"])
    if state["labels"] is not None:
        sample["expression_label"] = np.uint8(state["labels"][scan_index])
    return sample, {"leaves_grid": leaves_grid(sample["vertices"], state["grid"])}


def convert(scans: ScanSet, out: Path, grid: VoxelGrid, landmark_dir: Path | None = None,
            checkpoint: Path | None = None, workers: int = 1, seed: int = 0, with_frontal: bool = False,
            restart: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Write ``out`` (HDF5, per-sample topology) from ``scans``: every usable scan at every pose, scan-major.

    Prepared scans are cached in ``<out>.scans/``, each with its :func:`cache_key` (a scan whose file, landmark
    source, face radius or code changed is prepared again); a rerun resumes both passes. ``restart`` empties
    the cache and replaces an unfinished or finished ``out``. Without it, a finished ``out`` made with the same
    arguments and prepared scans is left as it is, and one made otherwise raises FileExistsError
    (:func:`data_prep.writing.check_finished`, the rule of every producer). Returns the report (also written
    to ``<out>.report.json``): ``samples``, ``scans_used``, ``skipped`` {scan id: reason}.
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


def find_scans(root: Path, pattern: str, suffix_hint: str) -> list[Path]:
    """Sorted files under ``root`` matching the glob ``pattern``; an error naming both when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder; pass the dataset's top folder")
    paths = sorted(path for path in root.glob(pattern) if path.is_file())
    if not paths:
        raise FileNotFoundError(f"no scan matches {pattern!r} under {root}; check --root, or pass --pattern for "
                                f"another layout (the {suffix_hint} files)")
    return paths


def scan_id(path: Path, root: Path) -> str:
    """A scan's id: its path under ``root`` without the suffix (``subject_01/Model/frontal1/obj/110920150452``)."""
    return Path(path).relative_to(root).with_suffix("").as_posix()


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
