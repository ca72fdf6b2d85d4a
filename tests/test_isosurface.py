"""volume_to_mesh: iso-surface position in crop coordinates (z scale and offset), emptiness, orientation."""

import numpy as np
import pytest
import torch

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.isosurface import volume_to_mesh

GRID = VoxelGrid.centred(60, 48, 48)
CENTRE = np.array([23.0, 24.5, 1.3])  # crop x, y, z (px)
AXES = np.array([15.0, 18.0, 10.0])  # ellipsoid semi-axes (px)


def voxel_centres(grid: VoxelGrid) -> np.ndarray:
    """(D, H, W, 3) crop coordinates of every voxel centre, computed without the grid's helpers."""
    d, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij")
    return np.stack([x, y, d / grid.z_scale + grid.z_offset], axis=-1)


def ellipsoid_distance(points: np.ndarray) -> np.ndarray:
    """First-order signed distance (px, positive outside) from points to the ellipsoid surface."""
    q = (points - CENTRE) / AXES
    value = (q**2).sum(-1) - 1.0
    gradient = 2 * q / AXES
    return value / np.linalg.norm(gradient, axis=-1)


def signed_volume(vertices, triangles) -> float:
    """Enclosed volume (px^3), positive when triangles wind counter-clockwise seen from outside."""
    corners = vertices[triangles].astype(np.float64)
    return float(np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6.0)


def test_binary_ellipsoid_surface_lies_on_the_analytic_surface():
    volume = (ellipsoid_distance(voxel_centres(GRID)) < 0).astype(np.float32)
    vertices, triangles = volume_to_mesh(volume, GRID)
    assert vertices.dtype == np.float32 and triangles.dtype == np.int64
    assert vertices.shape[1] == 3 and triangles.shape[1] == 3 and len(triangles) > 1000
    distance = np.abs(ellipsoid_distance(vertices.astype(np.float64)))
    # Binary voxels: the 0.5 level lies between an inside and an outside centre (1 px in x, y; 0.5 px in z).
    assert distance.max() < 0.8
    assert distance.mean() < 0.3
    # The z extent matches the analytic one: checks z scale (half a pixel per voxel) and offset.
    assert vertices[:, 2].min() == pytest.approx(CENTRE[2] - AXES[2], abs=0.3)
    assert vertices[:, 2].max() == pytest.approx(CENTRE[2] + AXES[2], abs=0.3)


def test_soft_volume_gives_sub_voxel_surface_and_accepts_tensors():
    soft = 1.0 / (1.0 + np.exp(ellipsoid_distance(voxel_centres(GRID)) / 0.7))
    vertices, _ = volume_to_mesh(torch.from_numpy(soft.astype(np.float32)), GRID)
    assert np.abs(ellipsoid_distance(vertices.astype(np.float64))).max() < 0.15


def test_triangles_face_outward():
    volume = (ellipsoid_distance(voxel_centres(GRID)) < 0).astype(np.float32)
    vertices, triangles = volume_to_mesh(volume, GRID)
    assert signed_volume(vertices, triangles) == pytest.approx(4 / 3 * np.pi * AXES.prod(), rel=0.03)
    corners = vertices[triangles].astype(np.float64)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    outward = np.einsum("ij,ij->i", normals, (corners.mean(1) - CENTRE) / AXES**2)
    assert (outward > 0).mean() > 0.99


def test_solid_touching_the_border_gives_a_closed_box():
    vertices, triangles = volume_to_mesh(np.ones(GRID.shape, np.float32), GRID)
    lo, hi = GRID.voxel_to_crop(np.array([[-0.5, -0.5, -0.5], [GRID.depth - 0.5, GRID.height - 0.5, GRID.width - 0.5]]))
    np.testing.assert_allclose(vertices.min(0), lo, atol=1e-5)
    np.testing.assert_allclose(vertices.max(0), hi, atol=1e-5)
    # Marching cubes bevels the box's edges by half a voxel: a sliver of the volume.
    assert signed_volume(vertices, triangles) == pytest.approx(np.prod(hi - lo), rel=1e-3)
    edges = np.sort(triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    assert (uses == 2).all()  # watertight


@pytest.mark.parametrize("value", [0.0, 0.3])
def test_volume_below_the_level_gives_an_empty_mesh(value):
    vertices, triangles = volume_to_mesh(np.full(GRID.shape, value, np.float32), GRID)
    assert vertices.shape == (0, 3) and triangles.shape == (0, 3)
    assert vertices.dtype == np.float32 and triangles.dtype == np.int64


def test_coarser_step_stays_near_the_surface():
    volume = (ellipsoid_distance(voxel_centres(GRID)) < 0).astype(np.float32)
    fine, _ = volume_to_mesh(volume, GRID)
    coarse, _ = volume_to_mesh(volume, GRID, step=2)
    assert len(coarse) < len(fine) / 2
    assert np.abs(ellipsoid_distance(coarse.astype(np.float64))).mean() < 0.6


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="expects"):
        volume_to_mesh(np.zeros((10, 48, 48), np.float32), GRID)
