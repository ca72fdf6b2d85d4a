"""The ICT Face Model reader (data_prep.ict): its face region voxelised, its whole head rendered."""

from dataclasses import replace

import numpy as np
import pytest

from data_prep.face_model import HEAD_PARTS, load_face_model
from data_prep.ict import load_ict
from data_prep.synthetic import ImageOptions, make_sample, sample_rng
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise

GRID = VoxelGrid.parse("100,96,96")


def fake_ict(path, flip: bool = False):
    """A small file in the ICT layout (cm): a 12 x 12 grid face (the first 144 vertices, landmarks on it), a
    'head_and_neck' strip behind it, an 'eye_occlusion_left' quad; quads counter-clockwise from the front."""
    x, y = np.meshgrid(np.linspace(-6, 6, 12), np.linspace(6, -6, 12))
    face = np.stack([x, y, 8 - 0.05 * (x**2 + y**2)], -1).reshape(-1, 3)
    strip = np.stack([np.full(12, -7.0), np.linspace(6, -6, 12), np.full(12, 2.0)], -1)
    strip = np.vstack([strip, strip + (0, 0, -3)])
    overlay = np.array([[1, 1, 9], [2, 1, 9], [2, 2, 9], [1, 2, 9]], float)
    neutral = np.vstack([face, strip, overlay]).astype(np.float32)
    a = (np.arange(11)[:, None] * 12 + np.arange(11)).ravel()
    quads = [np.stack([a, a + 12, a + 13, a + 1], 1)]  # rows go down (y decreasing): counter-clockwise from +z
    s = 144 + np.arange(11)
    quads.append(np.stack([s, s + 1, s + 13, s + 12], 1))
    quads.append(np.array([[168, 169, 170, 171]]))
    quads.append(np.array([[0, 12, 1, -1]]))  # a triangle
    faces = np.vstack(quads)
    if flip:
        faces = np.where(faces[:, 3:] >= 0, faces[:, ::-1], np.column_stack([faces[:, 2::-1], faces[:, 3]]))
    rng = np.random.default_rng(0)
    n = len(neutral)
    np.savez(path, neutral=neutral, faces=faces.astype(np.int32),
             identity=(0.1 * rng.standard_normal((3, n, 3))).astype(np.float16),
             expressions=(0.1 * rng.standard_normal((2, n, 3))).astype(np.float16),
             expression_names=np.array(["jawOpen", "mouthSmile_L"]), landmarks_68=np.arange(68, dtype=np.int32) + 10,
             region_names=np.array(["face", "head_and_neck", "eye_occlusion_left"]),
             region_ranges=np.array([[0, 143], [144, 167], [168, 171]], dtype=np.int32))
    return path


def test_the_face_region_is_the_model_and_the_rest_its_head_in_mm(tmp_path):
    model = load_face_model(f"ict:{fake_ict(tmp_path / 'ict.npz')}")
    raw = np.load(tmp_path / "ict.npz")
    assert model.name == "ict" and model.num_vertices == 144
    np.testing.assert_allclose(model.mean, raw["neutral"][:144] * 10)
    np.testing.assert_allclose(model.identity_basis, raw["identity"][:, :144].astype(np.float32) * 10)
    np.testing.assert_allclose(model.head.expression_basis, raw["expressions"][:, 144:].astype(np.float32) * 10)
    assert len(model.triangles) == 2 * 121 + 1 and model.triangles.max() < 144
    np.testing.assert_array_equal(model.face_region, np.arange(144))
    # The strip is rendered as skin; the transparent overlay is not rendered at all.
    assert len(model.head.triangles) == 2 * 11 and model.head.triangles.min() >= 144
    assert (model.head.part[:24] == HEAD_PARTS.index("skin")).all()
    assert not np.isin(np.arange(168, 172), model.head.triangles).any()
    np.testing.assert_allclose(model.head_shape(np.ones(3), np.zeros(2)),
                               (raw["neutral"][144:] + raw["identity"][:, 144:].astype(np.float32).sum(0)) * 10,
                               rtol=1e-5)


def test_triangles_are_turned_to_face_the_camera(tmp_path):
    plain = load_ict(fake_ict(tmp_path / "a.npz"))
    flipped = load_ict(fake_ict(tmp_path / "b.npz", flip=True))
    for model in (plain, flipped):
        corners = model.mean[model.triangles]
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        assert (normals[:, 2] > 0).all()


def test_bad_files_get_errors_that_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="ict:/path/to/ict_face_model.npz"):
        load_face_model(f"ict:{tmp_path / 'missing.npz'}")
    with pytest.raises(ValueError, match="needs the ICT Face Model file"):
        load_face_model("ict:")
    whole = fake_ict(tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.npz is not a readable ICT Face Model"):
        load_ict(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", neutral=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"lacks the arrays \['faces'"):
        load_ict(tmp_path / "other.npz")


# ----- the real model (../shared/data/ict_facekit) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ict(request):
    shared = request.getfixturevalue("shared_data")
    return load_face_model(f"ict:{shared / 'ict_facekit' / 'ict_face_model.npz'}")


def test_the_real_model_reads_as_its_readme_says(ict):
    assert ict.num_vertices == 9409 and len(ict.head.mean) == 26719 - 9409
    assert len(ict.identity_basis) == 50 and len(ict.expression_basis) == 56 and "mouthClose" not in ict.expression_names
    assert (ict.landmark_vertices < 9409).all()  # every landmark is on the voxelised face
    outer = ict.mean[ict.landmark_vertices[[36, 45]]]
    np.testing.assert_allclose(outer[:, 0], [-44.6, 44.6], atol=0.1)  # the README's outer eye corners, in mm
    assert ict.mean[ict.landmark_vertices[30], 2] == pytest.approx(130.7, abs=0.1)  # the nose tip
    for part in HEAD_PARTS:
        assert (ict.head.part == HEAD_PARTS.index(part)).any()


def test_landmarks_stay_where_they_belong_under_every_expression(ict):
    names = ict.expression_names
    for k, name in enumerate(names):
        weights = np.zeros(len(names), np.float32)
        weights[k] = 1.0
        points = ict.shape(None, weights)[ict.landmark_vertices]
        assert points[51, 1] > points[57, 1], name                      # upper lip above the lower lip
        for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):   # lids do not cross
            assert points[upper, 1] >= points[lower, 1] - 0.5, name
        assert points[0, 0] < points[8, 0] < points[16, 0], name        # the jaw runs right to left of the subject
        assert np.argmax(points[27:36, 2]) == 3, name                   # the nose tip is the nose's nearest point

    def opening(name, upper, lower):
        weights = np.zeros(len(names), np.float32)
        weights[names.index(name)] = 1.0
        moved = ict.shape(None, weights)[ict.landmark_vertices]
        still = ict.mean[ict.landmark_vertices]
        return moved[upper, 1] - moved[lower, 1], still[upper, 1] - still[lower, 1]

    opened, closed = opening("jawOpen", 62, 66)
    assert opened > closed + 10  # mm
    blinked, open_eye = opening("eyeBlink_L", 44, 46)  # _L: the subject's left, landmarks 42-47 (x > 0)
    assert blinked < 0.3 * open_eye
    other, same = opening("eyeBlink_L", 37, 41)
    assert other > 0.8 * same


def test_a_sample_voxelises_the_face_region_and_renders_the_whole_head(ict, monkeypatch):
    from data_prep import synthetic

    monkeypatch.setattr(synthetic, "sample_pose", lambda rng: np.radians([0.0, 90.0, 0.0]))
    monkeypatch.setattr(ict, "sample_coefficients", lambda rng: (np.zeros(50, np.float32), np.zeros(56, np.float32)))
    whole = ImageOptions(photo_edges=0.0)  # nothing blacked out beyond a photo's edge
    sample = make_sample(ict, GRID, sample_rng(3, "test", 0), options=whole)
    assert sample["vertices"].shape == (9409, 3)
    np.testing.assert_array_equal(sample["landmarks_3d"], sample["vertices"][ict.landmark_vertices])
    rotation = crop_rotation(sample["pose"])
    np.testing.assert_array_equal(sample["volume"], voxelise(sample["vertices"], ict.triangles, rotation, GRID))
    # At 90 degrees of yaw the head (its ear, neck and back) is drawn where the face's volume has nothing.
    face = sample["vertices"].astype(np.float64)
    corners = ict.landmark_vertices[[36, 45]]  # the mean face, posed: recover its scale and offset in the crop
    scale = np.linalg.norm(np.subtract(*face[corners])) / np.linalg.norm(np.subtract(*ict.mean[corners]))
    offset = face[0] - model_to_crop(ict.mean[:1], sample["pose"], scale, np.zeros(3))[0]
    np.testing.assert_allclose(model_to_crop(ict.mean, sample["pose"], scale, offset), face, atol=1e-3)
    head = model_to_crop(ict.head.mean, sample["pose"], scale, offset)
    raster = rasterise(np.vstack([face, head]), np.vstack([ict.triangles, ict.head.triangles]), GRID.width, GRID.width)
    head_pixels = raster.triangle >= len(ict.triangles)
    empty = ~sample["volume"].any(axis=0)
    assert (head_pixels & empty).sum() > 300  # of the 96 x 96 crop; the face fills about 4,600
    # and the sample's image shows it there: without its head the same face leaves those pixels to the background
    headless_model = replace(ict, head=None)
    headless_model.sample_coefficients = ict.sample_coefficients  # the mean face, as above
    headless = make_sample(headless_model, GRID, sample_rng(3, "test", 0), options=whole)
    np.testing.assert_array_equal(headless["volume"], sample["volume"])
    changed = np.abs(sample["image"].astype(int) - headless["image"]).max(axis=-1) > 10
    assert changed[head_pixels & empty].mean() > 0.8
    # and the nose hides the far cheek: the far outer eye corner (landmark 36) is behind what is drawn there
    far = face[ict.landmark_vertices[36]]
    col, row = np.round(far[:2]).astype(int)
    assert raster.depth[row, col] < far[2] - 2.0
