"""The head drawn around a synthetic face (data_prep.head): outside the face, occluding it only where it should."""

from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from data_prep.face_model import load_face_model
from data_prep.head import (BEHIND_FACE_MM, PARTS, HeadSettings, FrontalDepth, beard_weight, ellipsoid, face_hair,
                            head_mesh, scalp_hair)
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise

SIZE = 160


@pytest.fixture(scope="module")
def model():
    return load_face_model("builtin")


def settings(**changes) -> HeadSettings:
    """A fixed head: short hair, no fringe, no beard, unless changed."""
    head = HeadSettings(width=1.6, length=2.1, height=1.25, ear_size=0.7, neck_width=1.1, hair_style="short",
                        hairline=0.6, hair_thickness=6.0, hair_length=0.5, fringe=0.0, beard=0.0,
                        hair_colour=np.array([0.1, 0.07, 0.05]), clothing_colour=np.array([0.2, 0.3, 0.6]), seed=3)
    return replace(head, **changes)


def posed(model, head: HeadSettings, yaw_deg: float):
    """Face and head at ``yaw_deg`` in a SIZE crop: face vertices, all vertices, all triangles, the head's first
    triangle id, the head mesh."""
    face = model.mean.astype(np.float64)
    mesh = head_mesh(face, FrontalDepth(face, model.triangles), model.landmark_vertices, head)
    pose = np.radians([0.0, yaw_deg, 0.0])
    scale = 0.35 * SIZE / np.ptp(face[:, 0])
    translation = np.array([SIZE / 2, SIZE / 2, 100.0])
    everything = model_to_crop(np.vstack([face, mesh.vertices]), pose, scale, translation)
    triangles = np.vstack([model.triangles, mesh.triangles + len(face)])
    return everything[:len(face)], everything, triangles, len(model.triangles), mesh


def test_ellipsoid_is_closed_with_outward_triangles():
    vertices, triangles = ellipsoid((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 8, 16)
    corners = vertices[triangles]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    assert (np.einsum("tc,tc->t", normals, corners.mean(1) - (1.0, 2.0, 3.0)) > 0).all()
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    assert (np.unique(edges, axis=0, return_counts=True)[1] == 2).all()  # every edge shared by two triangles
    np.testing.assert_allclose(((vertices - (1.0, 2.0, 3.0)) / (4.0, 5.0, 6.0)) ** 2 @ np.ones(3), 1.0)


@pytest.mark.parametrize("style, thickness", [("short", 6.0), ("long", 2.0), ("long", 14.0), ("bald", 6.0)])
def test_seen_from_the_front_the_head_never_covers_the_face_without_a_fringe(model, style, thickness):
    face, everything, triangles, head_start, _ = posed(model, settings(hair_style=style, hair_thickness=thickness), 0.0)
    alone = rasterise(face, model.triangles, SIZE, SIZE)
    together = rasterise(everything, triangles, SIZE, SIZE)
    covered = alone.mask & (together.triangle >= head_start)
    if style == "long":  # the curtain beside the face may fall over its outline, never further in
        assert covered.sum() < 0.02 * alone.mask.sum()
        assert not (covered & binary_erosion(alone.mask, iterations=3)).any()
    else:
        assert not covered.any()
    assert (together.mask & ~alone.mask).sum() > 0.5 * alone.mask.sum()  # and the head is there around it


@pytest.mark.parametrize("fringe, seed", [(0.85, 3), (0.85, 4), (0.5, 5)])
def test_a_fringe_covers_the_forehead_and_nothing_below_the_brows(model, fringe, seed):
    face, everything, triangles, head_start, mesh = posed(model, settings(fringe=fringe, seed=seed), 0.0)
    alone = rasterise(face, model.triangles, SIZE, SIZE)
    covered = alone.mask & (rasterise(everything, triangles, SIZE, SIZE).triangle >= head_start)
    rows = np.nonzero(covered)[0]
    brows = face[model.landmark_vertices[17:27], 1]
    assert covered.sum() > 100 and rows.max() < brows.min()  # crop y grows downward: the fringe stays above


def test_at_ninety_degrees_the_nose_hides_the_far_cheek_and_the_near_ear_is_not_in_the_volume(model):
    head = settings(hair_style="bald")
    face, everything, triangles, head_start, mesh = posed(model, head, 90.0)
    raster = rasterise(everything, triangles, SIZE, SIZE)
    # The far outer eye corner (landmark 36, on the subject's right: away from the camera at +90 degrees of yaw)
    # projects onto a pixel where something nearer is drawn.
    far, near = face[model.landmark_vertices[36]], face[model.landmark_vertices[45]]
    assert far[2] > near[2]
    col, row = np.round(far[:2]).astype(int)
    assert raster.depth[row, col] < far[2] - 3.0
    # The near ear: head triangles drawn over pixels where the face's volume has nothing.
    ears = np.flatnonzero((mesh.part[mesh.triangles] == PARTS.index("ear")).all(axis=1)) + head_start
    ear_pixels = np.isin(raster.triangle, ears)
    assert ear_pixels.sum() > 30
    grid = VoxelGrid(depth=200, height=SIZE, width=SIZE, z_scale=1.0, z_offset=float(face[:, 2].min()) - 5)
    volume = voxelise(face, model.triangles, crop_rotation(np.radians([0.0, 90.0, 0.0])), grid)
    assert not volume[:, ear_pixels].any()
    assert volume.any(axis=0)[rasterise(face, model.triangles, SIZE, SIZE).mask].mean() > 0.95


def test_hair_and_beard_follow_the_hairline_and_the_lower_face(model):
    face = model.mean.astype(np.float64)
    ids = model.landmark_vertices
    assert not face_hair(face, ids, settings(hair_style="bald")).any()
    hair = face_hair(face, ids, settings(hairline=0.2))
    brows = face[ids[[19, 24]], 1].mean()
    interocular = np.linalg.norm(face[ids[36]] - face[ids[45]])
    front = face[:, 2] > face[ids[27], 2] - 20  # the forehead, not the sides (the hairline falls toward the back)
    assert hair[face[:, 1] < brows].max() == 0
    assert hair[front & (face[:, 1] > brows + 0.2 * interocular + 2)].min() == 1.0
    assert not beard_weight(face, ids, settings()).any()
    beard = beard_weight(face, ids, settings(beard=0.8))
    nose_base = face[ids[33], 1]
    assert beard[face[:, 1] > nose_base].max() == 0 and beard[face[:, 1] < nose_base - 20].mean() > 0.2
    lips = face[ids[48:60]]
    mouth = (np.abs(face[:, 0] - lips[:, 0].mean()) < 5) & (np.abs(face[:, 1] - lips[:, 1].mean()) < 3)
    assert beard[mouth].max() == 0  # not over the lips


def test_the_depth_map_closes_the_face_s_openings():
    """A face with a square hole (an eye or a mouth): what lies behind the hole is pushed back as behind the face."""
    x, y = np.meshgrid(np.arange(-30.0, 31.0, 3.0), np.arange(30.0, -31.0, -3.0))
    grid = np.stack([x, y, np.zeros_like(x)], -1).reshape(-1, 3)
    columns = x.shape[1]
    a = (np.arange(x.shape[0] - 1)[:, None] * columns + np.arange(columns - 1)).ravel()
    triangles = np.concatenate([np.stack([a, a + columns, a + 1], 1), np.stack([a + 1, a + columns, a + columns + 1], 1)])
    centre = grid[triangles].mean(1)
    triangles = triangles[(np.abs(centre[:, 0]) > 7) | (np.abs(centre[:, 1]) > 7)]  # a 14 mm hole in the middle
    depth = FrontalDepth(grid, triangles)
    z, covered = depth.at(np.array([[0.0, 0.0], [20.0, 20.0], [60.0, 0.0]]))
    np.testing.assert_array_equal(covered, [True, True, False])
    np.testing.assert_allclose(z[:2], 0.0)
    pushed = depth.push_behind(np.array([[0.0, 0.0, 5.0], [60.0, 0.0, 5.0]]))
    np.testing.assert_allclose(pushed[:, 2], [-BEHIND_FACE_MM, 5.0])


def test_hair_on_a_model_s_own_scalp_thins_to_nothing_where_the_scalp_meets_the_face(model):
    face = model.mean.astype(np.float64)
    top = face[face[:, 1] > face[:, 1].max() - 5]                     # a scalp strip just above the face's top
    scalp = np.vstack([top + [0.0, 0.5, 0.0], top + [0.0, 40.0, -20.0]])
    moved, cover = scalp_hair(scalp, face, model.landmark_vertices, settings(hairline=0.2, hair_thickness=10.0))
    shift = np.linalg.norm(moved - scalp, axis=1)
    assert (cover > 0.99).all()
    assert shift[: len(top)].max() < 0.5 and np.allclose(shift[len(top):], 10.0)  # at the seam, and 15 mm away
