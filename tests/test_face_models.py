"""Face models: the procedural built-in model, the Surrey Face Model reader and load_face_model errors."""

import json
import shutil
import struct

import numpy as np
import pytest

from data_prep import builtin_face
from data_prep.builtin_face import builtin_face_model
from data_prep.face_model import NEUTRAL_THRESHOLD, FaceModel, expression_label, load_face_model
from data_prep.sfm import REQUIRED_FILES, SHAPE_FILE, load_sfm
from lightning_vrn.geometry.pose import model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.landmark_scheme import FLIP, GROUPS, outer_interocular

REQUIRED_EXPRESSIONS = ("mouth_open", "smile", "brows_up", "frown", "eyes_closed", "pucker")


@pytest.fixture(scope="module")
def model() -> FaceModel:
    return builtin_face_model()


def expression(model: FaceModel, name: str, weight: float = 1.0) -> np.ndarray:
    coefficients = np.zeros(len(model.expression_names), dtype=np.float32)
    coefficients[model.expression_names.index(name)] = weight
    return coefficients


def triangle_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    corners = vertices[triangles].astype(np.float64)
    return np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])


# ----- built-in model ---------------------------------------------------------------------------

def test_builtin_shapes_and_counts(model):
    v = model.num_vertices
    assert 10_000 <= v <= 30_000
    assert model.mean.shape == (v, 3) and model.mean.dtype == np.float32
    assert model.identity_basis.shape[0] >= 20 and model.identity_basis.shape[1:] == (v, 3)
    assert model.expression_basis.shape == (len(model.expression_names), v, 3)
    assert set(REQUIRED_EXPRESSIONS) <= set(model.expression_names)
    assert model.triangles.dtype == np.int64 and model.triangles.max() < v
    assert model.landmark_vertices.shape == (68,) and len(np.unique(model.landmark_vertices)) == 68
    assert 5_000 < len(model.face_region) < v
    model.validate()
    assert not model.mean.flags.writeable  # the cached model cannot be changed by a caller


def test_builtin_sizes_in_millimetres(model):
    mean, landmarks = model.mean, model.mean[model.landmark_vertices]
    assert 90.0 <= outer_interocular(landmarks) <= 100.0
    tip = landmarks[30]
    at_tip_height = np.abs(mean[:, 1] - tip[1]) < 1.5
    assert 130.0 <= np.ptp(mean[at_tip_height, 0]) <= 155.0            # face width at the cheeks
    side = mean[at_tip_height][np.argmin(mean[at_tip_height, 0])]
    assert 80.0 <= tip[2] - side[2] <= 100.0                            # the side wraps round behind
    assert 20.0 <= tip[2] - landmarks[[39, 42], 2].mean() <= 35.0       # nose stands out from the eyes
    assert 110.0 <= landmarks[27, 1] - landmarks[8, 1] <= 135.0         # nasion to chin
    assert np.allclose(0.5 * (mean.min(0) + mean.max(0)), 0.0, atol=1.0)


def test_builtin_landmark_anatomy(model):
    lm = model.mean[model.landmark_vertices]
    eyes, mouth = lm[36:48], lm[48:68]
    assert lm[17:27, 1].min() > eyes[:, 1].max()                          # brows above the eyes
    assert eyes[:, 1].min() > lm[30, 1] > lm[33, 1] > mouth[:, 1].max()   # eyes > nose tip > nostrils > mouth
    assert mouth[:, 1].min() > lm[8, 1] == lm[:, 1].min()                 # the chin is the lowest point
    assert np.argmax(lm[:, 2]) == 30                                      # nose tip is the most forward landmark
    assert model.mean[model.face_region, 2].max() - lm[30, 2] < 1.0
    # iBUG "right" is the subject's right: image left, x < 0 in the model frame.
    for group in ("right_brow", "right_eye"):
        assert (lm[list(GROUPS[group]), 0] < 0).all()
    assert lm[0, 0] < lm[36, 0] < lm[39, 0] < 0 < lm[42, 0] < lm[45, 0] < lm[16, 0]
    jaw = lm[list(GROUPS["jaw"])]
    assert (np.diff(jaw[:9, 1]) < 0).all() and (np.diff(jaw[8:, 1]) > 0).all()  # down to the chin, up again
    assert (lm[37:39, 1] > lm[[41, 40], 1]).all() and (lm[61:64, 1] > lm[65:68, 1][::-1]).all()
    # The mean face is symmetric: mirrored landmarks land on their partners.
    mirrored = lm[FLIP] * np.array([-1.0, 1.0, 1.0])
    assert np.abs(mirrored - lm).max() < 1.0


def test_builtin_mouth_open_separates_inner_lips_only(model):
    ids = model.landmark_vertices
    closed = model.shape(None, None)
    opened = model.shape(None, expression(model, "mouth_open"))
    assert np.linalg.norm(closed[ids[62]] - closed[ids[66]]) < 3.0
    assert 15.0 <= np.linalg.norm(opened[ids[62]] - opened[ids[66]]) <= 25.0
    chin_motion = opened[ids[8]] - closed[ids[8]]
    assert chin_motion[1] < -5.0 and chin_motion[2] < -10.0             # the chin swings down and back
    assert np.abs(opened[ids[17:48]] - closed[ids[17:48]]).max() < 0.01  # brows, nose, eyes stay


def test_builtin_open_mouth_is_a_closed_surface_for_a_z_buffer(model):
    """Frontal render at 1 px/mm: every pixel between the parted inner lips is covered by the mesh."""
    opened = model.shape(None, expression(model, "mouth_open"))
    crop = model_to_crop(opened, (0.0, 0.0, 0.0), 1.0, (100.0, 100.0, 0.0))
    raster = rasterise(crop, model.triangles, 200, 200)
    upper, lower = crop[model.landmark_vertices[[62, 66]], :2]
    rows = np.arange(int(np.ceil(upper[1])), int(np.floor(lower[1])) + 1)
    assert len(rows) >= 10
    assert raster.mask[rows, int(round(upper[0]))].all()


def test_builtin_eyes_close(model):
    ids = model.landmark_vertices
    lid_pairs = [(37, 41), (38, 40), (43, 47), (44, 46)]
    for weight, low, high in ((0.0, 6.0, 12.0), (1.0, 0.0, 1.5)):
        face = model.shape(None, expression(model, "eyes_closed", weight))
        gaps = [face[ids[a], 1] - face[ids[b], 1] for a, b in lid_pairs]
        assert low <= min(gaps) and max(gaps) <= high


def test_builtin_modes_are_independent_and_bounded(model):
    identity = model.identity_basis.reshape(len(model.identity_basis), -1).astype(np.float64)
    assert np.linalg.matrix_rank(identity, tol=1e-3 * np.linalg.norm(identity, 2)) == len(identity)
    identity_max = np.linalg.norm(model.identity_basis, axis=2).max(axis=1)
    assert (identity_max > 0.5).all() and (identity_max < 10.0).all()   # one std moves a few mm at most
    expression_max = np.linalg.norm(model.expression_basis, axis=2).max(axis=1)
    assert (expression_max > 3.0).all() and (expression_max < 30.0).all()
    # Expressions are local: most of the face does not move for any single blendshape.
    moving = np.linalg.norm(model.expression_basis, axis=2) > 0.5
    assert (moving.mean(axis=1) < 0.5).all()
    brows_up = model.expression_basis[model.expression_names.index("brows_up")]
    assert np.linalg.norm(brows_up[model.landmark_vertices[48:68]], axis=1).max() < 0.1


def test_builtin_samples_are_plausible(model):
    rng = np.random.default_rng(7)
    mean_normals = triangle_normals(model.mean, model.triangles)
    active_counts, interocular = [], []
    for _ in range(40):
        identity, expression_weights = model.sample_coefficients(rng)
        assert identity.shape == (len(model.identity_basis),) and np.abs(identity).max() <= 3.0
        assert expression_weights.shape == (len(model.expression_basis),)
        assert ((expression_weights >= 0) & (expression_weights <= 1)).all()
        active_counts.append(int((expression_weights > 0).sum()))
        face = model.shape(identity, expression_weights)
        assert face.dtype == np.float32 and np.isfinite(face).all()
        normals = triangle_normals(face, model.triangles)
        assert (normals[:, 2] > 0).mean() > 0.9                         # still a height field from the front
        interocular.append(outer_interocular(face[model.landmark_vertices]))
    assert set(active_counts) == {0, 1, 2}
    assert 88.0 <= np.mean(interocular) <= 96.0 and 2.0 <= np.std(interocular) <= 7.0
    assert 70.0 <= np.min(interocular) and np.max(interocular) <= 115.0
    assert (mean_normals[:, 2] > 0).mean() > 0.9


def test_expression_label_is_neutral_or_the_largest_weight(model):
    assert model.expression_label_names == ("neutral", *REQUIRED_EXPRESSIONS)
    assert NEUTRAL_THRESHOLD == 0.1
    cases = [
        ([0, 0, 0, 0, 0, 0], 0),
        ([0.09, 0, 0.099, 0, 0, 0.05], 0),          # every weight below 0.1: neutral
        ([0, 0.1, 0, 0, 0, 0], 2),                  # smile at the threshold
        ([0.3, 0, 0, 0, 0.7, 0], 5),                # eyes_closed outweighs mouth_open
        ([0.5, 0.5, 0, 0, 0, 0], 1),                # a tie goes to the first blendshape
        ([0.2, -0.6, 0, 0, 0, 0], 2),               # the sign is ignored: a negative smile is labelled smile
    ]
    for coefficients, label in cases:
        assert expression_label(np.array(coefficients)) == label, coefficients
    # Neutral share: 35% drawn neutral, plus one weight U(0, 1) below 0.1 or two both below (one or two
    # blendshapes equally often): 0.35 + 0.65 * (0.1 + 0.1 ** 2) / 2 = 0.386. 500 draws: 0.366 (sd 0.022).
    labels = [expression_label(model.sample_coefficients(np.random.default_rng([0, i]))[1]) for i in range(500)]
    assert np.mean(np.array(labels) == 0) == pytest.approx(0.35 + 0.65 * (0.1 + 0.1 ** 2) / 2, abs=0.05)
    assert set(labels) == set(range(7))


def test_builtin_shape_checks_coefficients(model):
    with pytest.raises(ValueError, match="identity coefficients must have shape"):
        model.shape(np.zeros(3), None)
    assert np.array_equal(model.shape(np.zeros(len(model.identity_basis)), None), model.mean)


def test_builtin_is_deterministic(model):
    builtin_face_model.cache_clear()
    rebuilt = builtin_face_model()
    assert rebuilt is not model
    for name in ("mean", "identity_basis", "expression_basis", "triangles", "landmark_vertices", "face_region"):
        assert np.array_equal(getattr(rebuilt, name), getattr(model, name)), name
    assert load_face_model("builtin") is rebuilt


def test_builtin_triangles_face_the_camera(model):
    normals = triangle_normals(model.mean, model.triangles)
    centre = model.mean[model.landmark_vertices[30]]
    around_nose = np.linalg.norm(model.mean[model.triangles[:, 0]] - centre, axis=1) < 60
    assert (normals[around_nose, 2] > 0).mean() > 0.95
    grid_vertices = builtin_face.NUM_ROWS * builtin_face.NUM_COLUMNS
    assert model.num_vertices == grid_vertices


# ----- SFM reader on a tiny model written here in the cereal layout ------------------------------

def _eigen(matrix: np.ndarray) -> bytes:
    matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float32))
    return struct.pack("<ii", *matrix.shape) + matrix.astype("<f4").tobytes(order="F")


def _triangle_list(triangles: np.ndarray) -> bytes:
    return struct.pack("<Q", len(triangles)) + np.asarray(triangles, "<i4").tobytes()


def write_tiny_sfm(directory, rng):
    """Write a small random model in the SFM file layout; returns what was written."""
    num_vertices, num_modes = 80, 4
    mean = rng.normal(0, 40, size=(num_vertices, 3)).astype(np.float32)
    basis, _ = np.linalg.qr(rng.normal(size=(3 * num_vertices, num_modes)))
    eigenvalues = np.array([9.0, 4.0, 1.0, 0.25])
    triangles = rng.integers(0, num_vertices, size=(30, 3))
    blendshapes = {"anger": rng.normal(size=(num_vertices, 3)), "surprise": rng.normal(size=(num_vertices, 3))}
    shape = struct.pack("<I", 1) + _eigen(mean.reshape(-1, 1)) + _eigen(basis) + _eigen(eigenvalues[:, None])
    shape += _triangle_list(triangles)
    shape += _eigen(np.zeros((0, 1))) + _eigen(np.zeros((0, 0))) + _eigen(np.zeros((0, 1))) + _triangle_list([])
    shape += struct.pack("<Q", num_vertices) + rng.random((num_vertices, 2)).astype("<f8").tobytes()
    (directory / "sfm_shape_3448.bin").write_bytes(shape)
    blend = struct.pack("<Q", len(blendshapes))
    for name, offsets in blendshapes.items():
        blend += struct.pack("<Q", len(name)) + name.encode() + _eigen(offsets.reshape(-1, 1))
    (directory / "expression_blendshapes_3448.bin").write_bytes(blend)
    # 50 mapped landmarks (1-based iBUG numbers): all but the contour (1-8, 10-17) and 61, 65.
    mapped = [n for n in range(1, 69) if n not in set(range(1, 9)) | set(range(10, 18)) | {61, 65}]
    mapping = {n: int(v) for n, v in zip(mapped, rng.permutation(num_vertices)[:len(mapped)])}
    lines = ["# test mapping", "[landmark_mappings]"] + [f"{n} = {v}  # point" for n, v in mapping.items()]
    lines += ["", "[contour_landmarks]", "right = [ 1, 2 ]"]
    (directory / "ibug_to_sfm.txt").write_text("\n".join(lines) + "\n")
    contour = {"right_contour": list(range(60, 70)), "left_contour": list(range(70, 80))}
    (directory / "sfm_model_contours.json").write_text(json.dumps({"model_contour": contour}))
    return mean, basis, eigenvalues, triangles, blendshapes, mapping


def test_sfm_reader_round_trip(tmp_path):
    mean, basis, eigenvalues, triangles, blendshapes, mapping = write_tiny_sfm(tmp_path, np.random.default_rng(3))
    sfm = load_face_model(f"sfm:{tmp_path}")
    assert np.allclose(sfm.mean, mean)
    expected = (basis * np.sqrt(eigenvalues)).T.reshape(len(eigenvalues), -1, 3)
    assert np.allclose(sfm.identity_basis, expected, atol=1e-6)
    assert np.array_equal(sfm.triangles, triangles)
    assert sfm.expression_names == list(blendshapes)
    assert np.allclose(sfm.expression_basis, np.stack(list(blendshapes.values())), atol=1e-6)
    for number, vertex in mapping.items():
        assert sfm.landmark_vertices[number - 1] == vertex
    assert sfm.landmark_vertices[60] == sfm.landmark_vertices[48]
    assert sfm.landmark_vertices[64] == sfm.landmark_vertices[54]
    assert set(sfm.landmark_vertices[:8]) <= set(range(60, 70)) | {mapping[9]}
    assert set(sfm.landmark_vertices[9:17]) <= set(range(70, 80)) | {mapping[9]}
    assert np.array_equal(sfm.face_region, np.arange(80))


@pytest.mark.parametrize("name", [SHAPE_FILE, "expression_blendshapes_3448.bin"])
def test_sfm_truncated_file_is_named(tmp_path, name):
    write_tiny_sfm(tmp_path, np.random.default_rng(4))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name}.*truncated"):
        load_face_model(f"sfm:{tmp_path}")


def test_sfm_missing_file_is_named(tmp_path):
    write_tiny_sfm(tmp_path, np.random.default_rng(5))
    (tmp_path / "ibug_to_sfm.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ibug_to_sfm.txt"):
        load_face_model(f"sfm:{tmp_path}")


@pytest.mark.parametrize("bad_line, message", [("69 = 3", "iBUG landmark 69"), ("37 = 5000", "vertex 5000")])
def test_sfm_mapping_out_of_range_is_named(tmp_path, bad_line, message):
    write_tiny_sfm(tmp_path, np.random.default_rng(6))
    mapping = tmp_path / "ibug_to_sfm.txt"
    kept = [line for line in mapping.read_text().splitlines() if not line.startswith(bad_line.split("=")[0])]
    mapping.write_text("\n".join(kept).replace("[landmark_mappings]", f"[landmark_mappings]\n{bad_line}"))
    with pytest.raises(ValueError, match=f"ibug_to_sfm.txt.*{message}"):
        load_face_model(f"sfm:{tmp_path}")


def test_sfm_mapping_without_the_eye_corners_is_named(tmp_path):
    write_tiny_sfm(tmp_path, np.random.default_rng(7))
    mapping = tmp_path / "ibug_to_sfm.txt"
    mapping.write_text("\n".join(line for line in mapping.read_text().splitlines() if not line.startswith("37 =")))
    with pytest.raises(ValueError, match=r"ibug_to_sfm.txt does not map iBUG landmarks \[37\]"):
        load_face_model(f"sfm:{tmp_path}")


def test_load_face_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown face model spec 'bfm'"):
        load_face_model("bfm")
    with pytest.raises(ValueError, match="needs a directory"):
        load_face_model("sfm:")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_face_model(f"sfm:{tmp_path / 'does-not-exist'}")


def test_validate_names_model_and_problem(model):
    broken = FaceModel("broken", model.mean, model.identity_basis, model.expression_basis,
                       model.expression_names, model.triangles + model.num_vertices,
                       model.landmark_vertices, model.face_region)
    with pytest.raises(ValueError, match="'broken'.*triangles has vertex ids outside"):
        broken.validate()
    nan_mean = model.mean.copy()
    nan_mean[5, 1] = np.nan
    with pytest.raises(ValueError, match="mean contains NaN"):
        FaceModel("nan", nan_mean, model.identity_basis, model.expression_basis, model.expression_names,
                  model.triangles, model.landmark_vertices, model.face_region).validate()



def test_validate_wants_face_region_as_distinct_vertex_ids(model):
    def with_face_region(face_region):
        return FaceModel("masked", model.mean, model.identity_basis, model.expression_basis, model.expression_names,
                         model.triangles, model.landmark_vertices, face_region)

    mask = np.zeros(model.num_vertices, dtype=bool)
    mask[model.face_region] = True
    with pytest.raises(ValueError, match=r"'masked': face_region must be vertex ids.*np\.flatnonzero\(mask\)"):
        with_face_region(mask).validate()
    with pytest.raises(ValueError, match="'masked': face_region repeats"):
        with_face_region(np.repeat(model.face_region, 2)).validate()
    with_face_region(np.flatnonzero(mask)).validate()

# ----- the real Surrey Face Model (reference data beside the repo) ------------------------------

@pytest.fixture(scope="module")
def sfm_dir(shared_data):
    return shared_data / "sfm"


def test_sfm_facts(sfm_dir):
    sfm = load_face_model(f"sfm:{sfm_dir}")
    assert sfm.mean.shape == (3448, 3)
    assert sfm.identity_basis.shape == (63, 3448, 3)
    assert sfm.triangles.shape == (6736, 3)
    assert sfm.expression_names == ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    lm = sfm.mean[sfm.landmark_vertices]
    assert abs(outer_interocular(lm) - 92.0) < 1.5
    assert (sfm.landmark_vertices >= 0).all()


def test_sfm_frame_matches_ours(sfm_dir):
    sfm = load_sfm(sfm_dir)
    lm = sfm.mean[sfm.landmark_vertices]
    assert np.argmax(lm[:, 2]) == 30                                   # z toward the camera
    assert lm[36:48, 1].min() > lm[30, 1] > lm[48:68, 1].max() > lm[8, 1]   # y up
    assert lm[36, 0] < 0 < lm[45, 0]                                  # subject's right at image left
    normals = triangle_normals(sfm.mean, sfm.triangles)
    assert (normals[:, 2] > 0).mean() > 0.9                            # counter-clockwise from the front
    jaw = lm[list(GROUPS["jaw"])]
    assert (np.diff(jaw[:9, 1]) < 0).all() and (np.diff(jaw[8:, 1]) > 0).all()
    assert np.abs(lm[FLIP][:17] * np.array([-1.0, 1.0, 1.0]) - lm[:17]).max() < 3.0


def test_sfm_identity_basis_is_scaled_orthonormal(sfm_dir):
    sfm = load_sfm(sfm_dir)
    flat = sfm.identity_basis.reshape(63, -1).astype(np.float64)
    gram = flat @ flat.T
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-3 * gram.max())
    assert np.all(np.diff(np.diag(gram)) <= 1e-6)                       # eigenvalues sorted, largest first


def test_sfm_truncated_real_file(sfm_dir, tmp_path):
    for name in REQUIRED_FILES:
        shutil.copy(sfm_dir / name, tmp_path / name)
    data = (sfm_dir / SHAPE_FILE).read_bytes()
    (tmp_path / SHAPE_FILE).write_bytes(data[:100_000])
    with pytest.raises(ValueError, match=rf"{SHAPE_FILE}.*truncated"):
        load_face_model(f"sfm:{tmp_path}")
