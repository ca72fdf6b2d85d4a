"""300W-LP / AFLW2000-3D samples (a photo + a ``.mat`` of 3DMM parameters) -> dataset-file samples.

Shared by ``python -m data_prep.aflw2000`` and ``python -m data_prep.w300lp``.

**Vertices** (exactly ``../shared/data/README.md``): with ``Pose_Para = (pitch, yaw, roll, tx, ty,
tz, s)`` (radians, pixels, pixels per micrometre) and the BFM of :mod:`data_prep.bfm`,
``V = s * R @ (mean + w_shp @ Shape_Para + w_exp @ Exp_Para) + t`` with ``R = Rx(pitch) Ry(yaw)
Rz(roll)`` (:func:`lightning_vrn.geometry.pose.euler_to_matrix`), then ``y = H + 1 - y`` (H the photo's
height): 1-based image pixels, y down, z raw (toward the camera). In our convention (0-based pixel
centres, z away from the camera) that is ``x - 1``, ``H - y_model``, ``-z``, i.e.
``model_to_crop(mean + ..., pose, s, (tx - 1, H - ty, -tz))``. ``pt3d_68`` (AFLW2000-3D) and
``pt2d`` (300W-LP, 2 x 68) are 1-based image pixels: we subtract 1 from x and y and negate z.

**Crop** (as the authors, and as the synthetic data): :func:`~lightning_vrn.geometry.crop.landmark_crop`
of the 68 annotated landmarks (``pt3d_68``'s x, y or ``pt2d``), no jitter; the photo is resampled
into the crop with an antialiased bilinear filter (black outside the photo); the mesh gets the same
scale, and its nearest point goes to :func:`lightning_vrn.geometry.crop.front_z` (:func:`~lightning_vrn.geometry.crop.front_z_shift`),
as in the synthetic data.

**Sample**: ``volume`` (:func:`voxelise`) and ``volume_frontal`` (:func:`voxelise_frontal`) of the cut
face mesh (:mod:`data_prep.bfm`: ears and neck out), ``vertices`` that mesh in crop coordinates,
``pose`` ``Pose_Para[:3]``. Landmarks: AFLW2000-3D's ``landmarks_3d`` is ``pt3d_68`` (the benchmark's
ground truth) and ``landmarks_2d`` its x, y. 300W-LP has no 3D landmarks: ``landmarks_2d`` is
``pt2d`` and ``landmarks_3d`` the model's 68 keypoint vertices, which differ from ``pt2d`` on the jaw
of turned faces (``pt2d`` follows the visible outline). A mirrored copy (300W-LP ``--flip``) mirrors
the finished crop: image, volumes and meshes ``x -> S - 1 - x`` (vertex order kept), landmarks
re-indexed with :data:`lightning_vrn.landmark_scheme.FLIP`, pose ``(pitch, -yaw, -roll)``
(:func:`~lightning_vrn.geometry.pose.mirror_pose`; docs/conventions.md, "Pose"). The landmark crop of a
mirrored photo is the mirrored crop, so this equals converting the mirrored photo.

**Skipped samples**: every source is checked first (:func:`inspect_source`, in parallel): the
``.mat`` reads and has each field with the right shape, finite values and as many shape and
expression parameters as the BFM has components (3DDFA's train.configs: at least its 40 and 10, the rest
unused; :func:`parameters_for_model`); the photo exists and decodes; the model's
keypoints land within :data:`MAX_KEYPOINT_OFFSET_FRACTION` of the crop of their annotated landmarks
(else the mesh is off the crop). Sources failing a check are listed with the reason in
``<out>.skipped.csv`` and left out of the file, whose ``N`` is the number that pass; the file's
sample ``i`` is line ``i`` of ``<out>.sources.txt``. A sample that passed the checks and still fails
later is a bug and stops the run (the partial file keeps what was written).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from data_prep.arguments import add_grid_and_workers
from data_prep.face_model import FaceModel, load_face_model
from data_prep.writing import check_finished, check_output, parallel_map, write_pending
from lightning_vrn.atomic import atomic_path
from lightning_vrn.dataset_file import DatasetWriter, open_dataset
from lightning_vrn.geometry.crop import (LANDMARK_BOX_FRACTION, CropTransform, front_z_shift, landmark_crop, leaves_grid,
                                         resample_crop)
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, mirror_pose, model_to_crop
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal
from lightning_vrn.landmark_scheme import FLIP, NUM_LANDMARKS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PARAMETER_FIELDS = {"Pose_Para": (7,), "Shape_Para": None, "Exp_Para": None}
"""Fields every ``.mat`` needs -> the number of values (None: as many as the BFM's components)."""
LANDMARK_FIELDS = {"pt3d_68": 3, "pt2d": 2}
"""Landmark field -> its rows (AFLW2000-3D: ``pt3d_68`` 3 x 68; 300W-LP: ``pt2d`` 2 x 68)."""
MAX_KEYPOINT_OFFSET_FRACTION = 0.15
"""A source whose model keypoints lie further than this fraction of the crop size (mean over the 68)
from its annotated landmarks, in the crop, is skipped as "mesh off the crop" (29 px at 192; the mean
face alone is 1-4 px off on the real samples)."""
FINISHED_KEYS = ("face_model_spec", "mean_only", "sources_sha256", "reannotated_sha256")
"""File attributes a finished file must share with a rerun's to be left as it is
(:func:`data_prep.writing.check_finished`)."""
SKIP_REASONS = ("unreadable_mat", "missing_field", "bad_shape", "not_finite", "parameter_count", "missing_image",
                "unreadable_image", "mesh_off_crop")


class SampleSkipped(Exception):
    """A source that cannot become a sample: ``reason`` (one of :data:`SKIP_REASONS`) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Source:
    """One sample to make: the ``.mat`` and its photo, mirrored if ``flip``."""

    mat_path: Path
    image_path: Path | None
    flip: bool = False

    @property
    def name(self) -> str:
        return self.mat_path.stem + ("#flip" if self.flip else "")


@dataclass
class MatParams:
    """What a ``.mat`` holds for one face: ``pose`` (3,) radians, ``scale`` px per BFM unit,
    ``translation`` (3,) px, ``shape`` (K,) and ``expression`` (E,) parameters, ``landmarks`` (68, 2 or 3)
    0-based image pixels (z away from the camera)."""

    pose: np.ndarray
    scale: float
    translation: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    landmarks: np.ndarray


def add_common_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The arguments of both ``.mat`` dataset commands (aflw2000, w300lp) but ``--root``; ``out_help``
    describes ``--out``."""
    parser.add_argument("--bfm", required=True,
                        help="Basel Face Model file or folder, e.g. 3DDFA's train.configs (see docs/datasets.md)")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    add_grid_and_workers(parser, "processes converting samples")
    parser.add_argument("--mean-only", action="store_true",
                        help="use the BFM's mean face and ignore Shape_Para/Exp_Para (for a BFM without bases)")
    parser.add_argument("--restart", action="store_true",
                        help="discard unfinished or finished output and start over (a finished output made with "
                             "the same arguments is otherwise left as it is; one made otherwise is refused)")


def find_image(mat_path: Path) -> Path | None:
    """The photo beside ``mat_path`` with the same stem and a suffix of :data:`IMAGE_SUFFIXES`, or None."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (mat_path.with_suffix(suffix), mat_path.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def read_mat(path: Path, landmark_field: str) -> MatParams:
    """Read and check one ``.mat``; raise :class:`SampleSkipped` naming what is wrong."""
    try:
        data = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises many kinds for a damaged file
        raise SampleSkipped("unreadable_mat", f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
    arrays = {}
    for name, size in (*PARAMETER_FIELDS.items(), (landmark_field, None)):
        if name not in data:
            raise SampleSkipped("missing_field", f"no {name}")
        value = np.asarray(data[name])
        if not np.issubdtype(value.dtype, np.number):
            raise SampleSkipped("bad_shape", f"{name} has dtype {value.dtype}, not numbers")
        arrays[name] = value.astype(np.float64)
    landmarks = arrays[landmark_field]
    rows = LANDMARK_FIELDS[landmark_field]
    if landmarks.shape != (rows, NUM_LANDMARKS):
        raise SampleSkipped("bad_shape", f"{landmark_field} has shape {landmarks.shape}, expected ({rows}, {NUM_LANDMARKS})")
    for name, size in PARAMETER_FIELDS.items():
        value = arrays[name]
        if value.ndim > 2 or (value.ndim == 2 and 1 not in value.shape) or (size and value.size != size[0]):
            expected = f"{size[0]} values" if size else "a vector"
            raise SampleSkipped("bad_shape", f"{name} has shape {value.shape}, expected {expected}")
        arrays[name] = value.reshape(-1)
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise SampleSkipped("not_finite", f"{name} contains NaN or inf")
    pose = arrays["Pose_Para"]
    if pose[6] <= 0:
        raise SampleSkipped("bad_shape", f"Pose_Para scale is {pose[6]:g}, must be positive")
    landmarks = landmarks.T.copy()
    landmarks[:, :2] -= 1.0
    if rows == 3:
        landmarks[:, 2] *= -1.0
    return MatParams(pose=pose[:3], scale=float(pose[6]), translation=pose[3:6], shape=arrays["Shape_Para"],
                     expression=arrays["Exp_Para"], landmarks=landmarks)


def parameters_for_model(model: FaceModel, params: MatParams, mean_only: bool) -> MatParams:
    """``params`` as ``model`` applies them; :class:`SampleSkipped` unless they fit its bases.

    Any count with ``mean_only`` (unused). A model with ``leading_components`` (3DDFA's train.configs: the first
    40 shape and 10 expression columns) takes the first K ``Shape_Para`` and E
    ``Exp_Para`` of longer vectors; every other model needs exactly as many values as components.
    """
    if mean_only:
        return params
    leading = model.leading_components
    for label, values, basis in (("Shape_Para", params.shape, model.identity_basis),
                                 ("Exp_Para", params.expression, model.expression_basis)):
        if len(values) < len(basis) or (len(values) > len(basis) and not leading):
            uses = "uses the first" if leading else "has"
            raise SampleSkipped("parameter_count", f"{label} has {len(values)} values, the BFM {model.name!r} {uses} "
                                                   f"{len(basis)} components")
    return replace(params, shape=params.shape[:len(model.identity_basis)],
                   expression=params.expression[:len(model.expression_basis)])


def ground_truth(model: FaceModel, mean_only: bool) -> str:
    """What a converted file's meshes are (its ``ground_truth`` attribute; docs/datasets.md)."""
    if mean_only:
        return f"mean face of {model.name} at the fitted pose (Shape_Para and Exp_Para ignored)"
    shape, expression = len(model.identity_basis), len(model.expression_basis)
    if model.leading_components:
        return f"first {shape} Shape_Para and first {expression} Exp_Para on the {model.name} bases"
    return f"all {shape} Shape_Para and {expression} Exp_Para on the {model.name} bases"


def image_vertices(model: FaceModel, params: MatParams, image_height: int, mean_only: bool,
                   vertex_ids: np.ndarray | None = None) -> np.ndarray:
    """``(V, 3)`` float64 vertices (or those of ``vertex_ids``) in 0-based image pixels, z away from the camera.

    ``mean_only`` uses the model's mean and ignores the shape and expression parameters.
    """
    ids = slice(None) if vertex_ids is None else vertex_ids
    shape = model.mean[ids].astype(np.float64)
    if not mean_only:
        shape = shape + np.tensordot(params.shape, model.identity_basis[:, ids], axes=1)
        shape = shape + np.tensordot(params.expression, model.expression_basis[:, ids], axes=1)
    tx, ty, tz = params.translation
    return model_to_crop(shape, params.pose, params.scale, (tx - 1.0, image_height - ty, -tz))


def read_image(path: Path | None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB photo; :class:`SampleSkipped` if it is missing or does not decode."""
    if path is None:
        raise SampleSkipped("missing_image", f"no photo beside the .mat (looked for {', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise SampleSkipped("missing_image", f"{path} does not exist") from None
    except Exception as error:  # PIL raises several kinds for truncated or foreign files
        raise SampleSkipped("unreadable_image", f"{path.name}: {' '.join(str(error).split())[:200]}") from None


def inspect_source(model: FaceModel, source: Source, landmark_field: str, grid: VoxelGrid,
                   mean_only: bool) -> tuple[MatParams, np.ndarray, CropTransform]:
    """Read and check one source (module docstring, "Skipped samples"): its parameters, photo and crop."""
    params = parameters_for_model(model, read_mat(source.mat_path, landmark_field), mean_only)
    image = read_image(source.image_path)
    crop = landmark_crop(params.landmarks[:, :2], grid.crop_size)
    keypoints = crop.apply(image_vertices(model, params, image.shape[0], mean_only, model.landmark_vertices)[:, :2])
    offset = np.linalg.norm(keypoints - crop.apply(params.landmarks[:, :2]), axis=1).mean()
    if offset > MAX_KEYPOINT_OFFSET_FRACTION * grid.crop_size:
        raise SampleSkipped("mesh_off_crop", f"the model's keypoints lie {offset:.0f} px (mean) from the annotated "
                                             f"landmarks in the {grid.crop_size} px crop: parameters and landmarks disagree")
    return params, image, crop


def make_sample(model: FaceModel, source: Source, landmark_field: str, grid: VoxelGrid,
                mean_only: bool) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """One :meth:`DatasetWriter.write` sample of ``source`` (module docstring) and its ``leaves_grid`` flag."""
    key = (id(model), source.mat_path, source.image_path, landmark_field, grid, mean_only)
    if _last_sample.get("key") != key:
        _last_sample.update(key=key, made=_unmirrored_sample(model, source, landmark_field, grid, mean_only))
    sample, flags = _last_sample["made"]
    return (mirror_sample(sample, grid) if source.flip else dict(sample)), dict(flags)


_last_sample: dict = {}
"""The last unmirrored sample made in this process: a mirrored copy (the next sample) needs only
:func:`mirror_sample`. Its arrays are never modified (the writer packs volumes into a new dict)."""


def _unmirrored_sample(model: FaceModel, source: Source, landmark_field: str, grid: VoxelGrid,
                       mean_only: bool) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """The sample of ``source``'s ``.mat`` and photo, not mirrored, and its flags."""
    params, image, crop = inspect_source(model, source, landmark_field, grid, mean_only)
    source_vertices = image_vertices(model, params, image.shape[0], mean_only)
    z_shift = front_z_shift(grid, source_vertices[:, 2], crop.scale)
    vertices = crop.apply(source_vertices, z_shift)
    rotation = crop_rotation(params.pose)
    if landmark_field == "pt3d_68":
        landmarks_3d = crop.apply(params.landmarks, z_shift)
    else:
        landmarks_3d = vertices[model.landmark_vertices]
    sample = {
        "image": resample_crop(image, crop, grid.crop_size),
        "volume": voxelise(vertices, model.triangles, rotation, grid),
        "volume_frontal": voxelise_frontal(vertices, model.triangles, rotation, grid),
        "landmarks_2d": crop.apply(params.landmarks[:, :2]).astype(np.float32),
        "landmarks_3d": landmarks_3d.astype(np.float32),
        "pose": params.pose.astype(np.float32),
        "vertices": vertices.astype(np.float32),
    }
    return sample, {"leaves_grid": leaves_grid(vertices, grid)}


def mirror_sample(sample: dict[str, np.ndarray], grid: VoxelGrid) -> dict[str, np.ndarray]:
    """The horizontally mirrored sample (module docstring): ``x -> S - 1 - x``, landmarks re-indexed by FLIP."""
    last = grid.crop_size - 1
    mirrored = {key: np.ascontiguousarray(sample[key][..., ::-1]) for key in ("volume", "volume_frontal")}
    mirrored["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
    for key in ("landmarks_2d", "landmarks_3d", "vertices"):
        points = sample[key].copy()
        points[:, 0] = last - points[:, 0]
        mirrored[key] = points[FLIP] if key.startswith("landmarks") else points
    mirrored["pose"] = mirror_pose(sample["pose"])
    return mirrored


# --- conversion: check every source, then write the good ones -------------------------------------

@dataclass(frozen=True)
class Conversion:
    """What a dataset command converts: ``sources`` in file order, the BFM ``model_spec``, the grid,
    the landmark field, ``mean_only`` (ignore Shape_Para / Exp_Para), the file ``attrs`` to add and
    ``reannotated``: source name -> (68, 2) 0-based photo pixels of a second landmark annotation, stored
    through the sample's crop as ``landmarks_2d_reannotated`` (None: none; sources without mirrored copies)."""

    sources: tuple[Source, ...]
    model_spec: str
    grid: VoxelGrid
    landmark_field: str
    mean_only: bool
    attrs: dict
    reannotated: dict | None = None


@functools.lru_cache(maxsize=1)
def _load_model(model_spec: str) -> FaceModel:
    """The face model of ``model_spec``, loaded once per process (a full BFM takes seconds)."""
    return load_face_model(model_spec)


def _setup(model_spec: str, mean_only: bool) -> dict:
    """State of a worker process: the BFM."""
    model = _load_model(model_spec)
    _check_model(model_spec, mean_only)
    return {"model": model}


def has_bases(model_spec: str) -> bool:
    """Whether the face model of ``model_spec`` has shape or expression bases; one without converts only with
    ``mean_only``."""
    model = _load_model(model_spec)
    return bool(len(model.identity_basis) or len(model.expression_basis))


def _check_model(model_spec: str, mean_only: bool) -> None:
    if not mean_only and not has_bases(model_spec):
        raise ValueError(f"face model {model_spec!r} has no shape or expression bases (a mean-only layout such as "
                         f"Model_Shape_Sim.mat + u_exp.npy): every mesh would be the mean face. Give the full BFM "
                         f"(Model_Shape.mat + Model_Exp.mat, face3d's BFM.mat or bfm_noneck_v3.pkl) or 3DDFA's "
                         f"train.configs folder (w_shp_sim.npy, ...: the first 40 + 10 components), or pass "
                         f"--mean-only to accept mean faces")


def _inspect(state: dict, job: tuple[int, Source, str, VoxelGrid, bool]) -> tuple[int, str, str]:
    index, source, landmark_field, grid, mean_only = job
    try:
        inspect_source(state["model"], source, landmark_field, grid, mean_only)
    except SampleSkipped as skipped:
        return index, skipped.reason, skipped.detail
    return index, "", ""


_scan_state: dict = {}


def _scan_init(model_spec: str, mean_only: bool) -> None:
    _scan_state.update(_setup(model_spec, mean_only))


def _scan_job(job) -> tuple[int, str, str]:
    return _inspect(_scan_state, job)


def check_sources(conversion: Conversion, workers: int, progress: bool, desc: str) -> list[tuple[str, str]]:
    """``(reason, detail)`` per source (empty strings: it converts), checked in ``workers`` processes. A mirrored
    source shares its original's outcome (mirroring cannot make a sample fail), so each file is read once."""
    originals = list(dict.fromkeys(replace(source, flip=False) for source in conversion.sources))
    jobs = [(i, source, conversion.landmark_field, conversion.grid, conversion.mean_only)
            for i, source in enumerate(originals)]
    outcome: list[tuple[str, str]] = [("", "")] * len(jobs)
    with tqdm(total=len(jobs), desc=f"{desc}: checking", unit="sample", disable=not progress) as bar:
        outcomes = parallel_map(_scan_job, jobs, workers, _scan_init, (conversion.model_spec, conversion.mean_only),
                                chunksize=max(1, min(64, len(jobs) // (8 * workers))))
        for index, reason, detail in outcomes:
            outcome[index] = (reason, detail)
            bar.update(1)
    position = {source: i for i, source in enumerate(originals)}
    return [outcome[position[replace(source, flip=False)]] for source in conversion.sources]


def _make(state: dict, index: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    source = state["sources"][index]
    try:
        sample, flags = make_sample(state["model"], source, state["landmark_field"], state["grid"], state["mean_only"])
        if state["reannotated"] is not None:
            annotated = read_mat(source.mat_path, state["landmark_field"]).landmarks[:, :2]
            crop = landmark_crop(annotated, state["grid"].crop_size)  # the sample's crop, as in inspect_source
            sample["landmarks_2d_reannotated"] = crop.apply(state["reannotated"][source.name]).astype(np.float32)
        return sample, flags
    except SampleSkipped as error:
        raise RuntimeError(f"{source.mat_path} passed the checks but failed while converting ({error}); "
                           f"report this as a bug") from None


def _make_setup(model_spec: str, mean_only: bool, sources: tuple[Source, ...], landmark_field: str,
                grid: VoxelGrid, reannotated: dict | None) -> dict:
    return {**_setup(model_spec, mean_only), "sources": sources, "landmark_field": landmark_field, "grid": grid,
            "mean_only": mean_only, "reannotated": reannotated}


def reannotated_digest(reannotated: dict | None) -> str:
    """SHA-256 of a :attr:`Conversion.reannotated` (names and float64 points), "" for None: a finished file's key."""
    if reannotated is None:
        return ""
    digest = hashlib.sha256()
    for name in sorted(reannotated):
        digest.update(name.encode() + np.ascontiguousarray(reannotated[name], dtype=np.float64).tobytes())
    return digest.hexdigest()


def sidecar(out_path: Path, suffix: str) -> Path:
    """``out.h5`` -> ``out.skipped.csv`` / ``out.sources.txt`` beside it."""
    return out_path.with_name(out_path.stem + suffix)


@dataclass(frozen=True)
class CheckedConversion:
    """A :class:`Conversion` checked against its sources and its output (:func:`check_conversion`), nothing written
    yet: the sources ``kept`` (the file's samples) and ``skipped`` (with reason and detail), the file ``attrs`` and
    whether ``out_path`` is already ``complete`` (a finished file of these sources and arguments; never with
    ``restart``)."""

    conversion: Conversion
    out_path: Path
    kept: tuple[Source, ...]
    skipped: tuple[tuple[Source, str, str], ...]
    attrs: dict
    complete: bool
    restart: bool


def check_conversion(conversion: Conversion, out_path, workers: int = 1, progress: bool = True, restart: bool = False,
                     desc: str | None = None) -> CheckedConversion:
    """Everything :func:`convert` checks before it writes anything: the output path
    (:func:`data_prep.writing.check_output`), every source (:func:`scan`), that some source converts (else
    ValueError naming the commonest reasons: a wrong BFM shows up here) and, unless ``restart``, that a finished
    ``out_path`` was made from these sources with these arguments (else FileExistsError,
    :func:`data_prep.writing.check_finished`, the rule of every producer)."""
    out_path = Path(out_path)
    desc = desc or out_path.stem
    check_output(out_path, restart=restart)
    model = _load_model(conversion.model_spec)
    _check_model(conversion.model_spec, conversion.mean_only)
    outcomes = check_sources(conversion, workers, progress, desc)
    kept = tuple(source for source, (reason, _) in zip(conversion.sources, outcomes) if not reason)
    skipped = tuple((source, reason, detail) for source, (reason, detail) in zip(conversion.sources, outcomes)
                    if reason)
    if not kept:
        counts = Counter((reason, detail) for _, reason, detail in skipped)
        commonest = "; ".join(f"{count} x {reason}: {detail}" for (reason, detail), count in counts.most_common(3))
        raise ValueError(f"no sample of {len(conversion.sources)} can be converted to {out_path} ({commonest}); "
                         f"check --root and --bfm")
    attrs = {**conversion.attrs, "face_model": model.name, "face_model_spec": conversion.model_spec,
             "mean_only": bool(conversion.mean_only), "ground_truth": ground_truth(model, conversion.mean_only),
             "num_skipped": len(skipped),
             "sources_sha256": hashlib.sha256(_source_names(kept).encode()).hexdigest(),
             "reannotated_sha256": reannotated_digest(conversion.reannotated),
             "landmark_box_fraction": LANDMARK_BOX_FRACTION}
    complete = out_path.exists() and not restart
    if complete:
        check_finished(out_path, conversion.grid, len(kept), attrs, FINISHED_KEYS,
                       made_from="from other sources or with other arguments")
    return CheckedConversion(conversion, out_path, kept, skipped, attrs, complete, restart)


def write_conversion(checked: CheckedConversion, workers: int = 1, progress: bool = True,
                     desc: str | None = None) -> tuple[Path, int]:
    """Write a checked conversion: the skip report, the source list and the converted samples of
    ``checked.out_path``; returns (path, skipped). A complete output is left as it is; an unfinished
    ``<out_path>.partial`` of the same sources and parameters is resumed, one of others refused before anything
    is written (:class:`DatasetWriter`)."""
    conversion, out_path, kept, skipped = checked.conversion, checked.out_path, checked.kept, checked.skipped
    desc = desc or out_path.stem
    if checked.complete:
        if progress:
            print(f"{out_path} is already complete; skipping (--restart converts it again)", file=sys.stderr)
        return out_path, len(skipped)
    model = _load_model(conversion.model_spec)
    with DatasetWriter(out_path, conversion.grid, len(kept), model.num_vertices, model.triangles, model.face_region,
                       model.landmark_vertices, checked.attrs, with_frontal=True, restart=checked.restart,
                       flags=("leaves_grid",), with_reannotated=conversion.reannotated is not None) as writer:
        _write_skip_report(sidecar(out_path, ".skipped.csv"), skipped)
        if skipped:
            counts = Counter(reason for _, reason, _ in skipped)
            print(f"{desc}: skipped {len(skipped)} of {len(conversion.sources)} samples "
                  f"({', '.join(f'{reason} {count}' for reason, count in counts.most_common())}); "
                  f"see {sidecar(out_path, '.skipped.csv')}", file=sys.stderr)
        with atomic_path(sidecar(out_path, ".sources.txt")) as temp:
            temp.write_text(_source_names(kept))
        write_pending(writer, _make_setup, (conversion.model_spec, conversion.mean_only, kept,
                                            conversion.landmark_field, conversion.grid, conversion.reannotated),
                      _make, workers, desc=desc, progress=progress)
        writer.finish()
    clipped = int(open_dataset(out_path).attrs["num_leaves_grid"])
    if clipped:
        warnings.warn(f"{out_path}: {clipped} of {len(kept)} meshes reach outside grid {conversion.grid.describe()} "
                      f"(their part outside is not in the volume)", stacklevel=2)
    return out_path, len(skipped)


def convert(conversion: Conversion, out_path, workers: int = 1, progress: bool = True, restart: bool = False,
            desc: str | None = None) -> tuple[Path, int]:
    """Check every source and the output (:func:`check_conversion`), then write the skip report, the source list and
    the rest converted to ``out_path`` (:func:`write_conversion`); returns (path, skipped). Every refusal comes
    before anything is written.

    Resumes an unfinished ``<out_path>.partial`` of the same sources and parameters; ``restart`` starts over (and
    replaces a finished file). A finished file of the same sources and arguments is left as it is; one of other
    sources or arguments raises FileExistsError.
    """
    checked = check_conversion(conversion, out_path, workers, progress, restart, desc)
    return write_conversion(checked, workers, progress, desc)


def _source_names(sources: Sequence[Source]) -> str:
    """The ``.sources.txt`` text: one source name a line (the file's sample order)."""
    return "\n".join(source.name for source in sources) + "\n"


def _write_skip_report(path: Path, skipped: Sequence[tuple[Source, str, str]]) -> None:
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(("source", "mat", "reason", "detail"))
        for source, reason, detail in skipped:
            table.writerow((source.name, str(source.mat_path), reason, detail))
