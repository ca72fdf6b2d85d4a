"""Accessories in front of a synthetic face (data_prep.accessories) and the camera's motion blur."""

import numpy as np
import pytest

from data_prep.accessories import ACCESSORY_KINDS, Accessories, accessory_mesh, tube
from data_prep.face_model import load_face_model
from data_prep.head import FrontalDepth
from data_prep.render import motion_blurred
from data_prep.synthetic import ImageOptions, make_sample, sample_rng
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.landmark_scheme import GROUPS

SIZE = 200          # px of the frontal test image, 1 px per mm, the face's centre in the middle
GRID = VoxelGrid.parse("100,96,96")


@pytest.fixture(scope="module")
def model():
    return load_face_model("builtin")


def frontal(points: np.ndarray) -> np.ndarray:
    """Model-frame points (N, 3) mm seen from the front at 1 px/mm: x right, y down, z away from the camera."""
    return np.column_stack([points[:, 0] + SIZE / 2, SIZE / 2 - points[:, 1], 500.0 - points[:, 2]])


def worn(model, kind: str, seed: int):
    """The mean face wearing ``kind``: accessory vertices, triangles, albedo."""
    face = model.mean.astype(np.float64)
    return accessory_mesh(face, FrontalDepth(face, model.triangles), model.landmark_vertices,
                          Accessories((kind,), seed), np.array([0.1, 0.07, 0.05]))


def test_tube_is_a_ring_of_outward_triangles_at_its_radius():
    path = np.column_stack([np.linspace(0, 30, 10), 5 * np.sin(np.linspace(0, 3, 10)), np.zeros(10)])
    radius = np.linspace(3.0, 1.0, 10)
    vertices, triangles = tube(path, radius, sides=8)
    rings = vertices.reshape(10, 8, 3)
    np.testing.assert_allclose(np.linalg.norm(rings - path[:, None], axis=-1), radius[:, None].repeat(8, 1))
    corners = vertices[triangles]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    axis = 0.5 * (path[triangles[:, 0] // 8] + path[triangles[:, 2] // 8])
    assert (np.einsum("tc,tc->t", normals, corners.mean(1) - axis) > 0).all()
    assert len(tube(path, 1.0, closed=True)[1]) == 2 * 8 * 10   # a ring joins its last section to its first


@pytest.mark.parametrize("kind", [kind for kind in ACCESSORY_KINDS if kind != "hat"])
def test_seen_from_the_front_an_accessory_is_in_front_of_the_face_wherever_both_are(model, kind):
    face = frontal(model.mean.astype(np.float64))
    alone = rasterise(face, model.triangles, SIZE, SIZE)
    covered = 0
    for seed in range(3):
        vertices, triangles, albedo = worn(model, kind, seed)
        assert len(triangles) and np.isfinite(vertices).all() and ((albedo >= 0) & (albedo <= 1)).all()
        accessory = rasterise(frontal(vertices), triangles, SIZE, SIZE)
        both = alone.mask & accessory.mask
        covered += both.sum()
        # Exact at pixel centres; a lock's tube sits 1 mm off the skin at its samples, so allow its rim 2%.
        assert (accessory.depth[both] < alone.depth[both]).mean() >= (0.98 if kind == "locks" else 1.0)
    assert covered > 50   # each kind does cover part of the face


def test_a_hat_hides_the_forehead_and_nothing_below_the_eyes(model):
    """The crown comes down to a band above the brows; a cap's peak may droop over the brows, not the eyes."""
    face = frontal(model.mean.astype(np.float64))
    eyes = face[model.landmark_vertices[[36, 39, 42, 45]], 1].min()   # image row of the highest eye corner
    alone = rasterise(face, model.triangles, SIZE, SIZE)
    rows = np.arange(SIZE)[:, None].repeat(SIZE, 1)
    for seed in range(4):
        vertices, triangles, _ = worn(model, "hat", seed)
        together = rasterise(np.vstack([face, frontal(vertices)]), np.vstack([model.triangles, triangles + len(face)]),
                             SIZE, SIZE)
        hidden = alone.mask & (together.triangle >= len(model.triangles))
        assert hidden.sum() > 100 and rows[hidden].max() < eyes


def test_clear_glasses_leave_the_eyes_in_view_and_sun_glasses_hide_them(model):
    face = frontal(model.mean.astype(np.float64))
    eyes = [face[model.landmark_vertices[list(GROUPS[side])]].mean(0) for side in ("right_eye", "left_eye")]
    seen = []
    for seed in range(12):
        vertices, triangles, albedo = worn(model, "glasses", seed)
        together = rasterise(np.vstack([face, frontal(vertices)]), np.vstack([model.triangles, triangles + len(face)]),
                             SIZE, SIZE)
        front = [together.triangle[int(round(eye[1])), int(round(eye[0]))] for eye in eyes]
        if all(triangle < len(model.triangles) for triangle in front):
            seen.append("clear")
            # the rim passes around the eye: glasses cover the row through its centre on both sides of it
            for eye in eyes:
                row = together.triangle[int(round(eye[1]))]
                glasses = np.flatnonzero(row >= len(model.triangles))
                assert (glasses < eye[0]).any() and (glasses > eye[0]).any()
        else:
            lens = [triangles[triangle - len(model.triangles)] for triangle in front]
            assert all(triangle >= len(model.triangles) for triangle in front)
            assert all(albedo[ids].max() < 0.25 for ids in lens)   # dark lenses
            seen.append("sun")
    assert set(seen) == {"clear", "sun"}


def test_accessories_change_only_the_image_and_are_recorded(model):
    plain = make_sample(model, GRID, sample_rng(5, "val", 8))
    wearing = make_sample(model, GRID, sample_rng(5, "val", 8), options=ImageOptions(accessories=1.0))
    for key in ("volume", "vertices", "pose", "landmarks_3d", "expression"):
        np.testing.assert_array_equal(plain[key], wearing[key])
    assert (np.abs(plain["image"].astype(int) - wearing["image"]).max(-1) > 20).mean() > 0.005
    assert ImageOptions(accessories=0.5).attrs()["accessories"] == 0.5
    assert "accessories" not in ImageOptions().attrs()


@pytest.mark.parametrize("smear", [(6.0, 0.0), (0.0, 4.0), (3.0, 3.0), (5.5, -2.2)])
def test_motion_blur_spreads_a_point_along_its_smear_and_keeps_the_light(smear):
    image = np.zeros((41, 41, 2))
    image[20, 20] = (1.0, 0.5)
    out = motion_blurred(image, np.array(smear))
    np.testing.assert_allclose(out.sum((0, 1)), (1.0, 0.5))
    np.testing.assert_allclose(out[..., 1], 0.5 * out[..., 0])
    weight = out[..., 0] / out[..., 0].sum()
    rows, cols = np.mgrid[:41, :41] - 20.0
    direction = np.array(smear) / np.linalg.norm(smear)
    along, across = cols * direction[0] + rows * direction[1], rows * direction[0] - cols * direction[1]
    assert abs((weight * cols).sum()) < 1e-9 and abs((weight * rows).sum()) < 1e-9   # centred on the point
    # A uniform segment of length L has variance L^2 / 12 along it; the bilinear splat adds under half a pixel^2.
    assert np.linalg.norm(smear) ** 2 / 12 <= (weight * along**2).sum() <= np.linalg.norm(smear) ** 2 / 12 + 0.5
    assert (weight * across**2).sum() < 0.25
