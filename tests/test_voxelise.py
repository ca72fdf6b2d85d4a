"""Voxelisation against an independent ray-casting computation (Open3D) and the posed z-buffer."""

import numpy as np
import open3d as o3d
import pytest
from scipy import ndimage
from skimage.draw import polygon2mask

from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal
from tests.helpers.toy_face import posed_face

SMALL_GRID = VoxelGrid.centred(100, 96, 96)
POSES = {  # (pitch, yaw, roll) radians
    "frontal": (0.0, 0.0, 0.0),
    "mild": (0.15, 0.35, -0.1),
    "yaw70_pitch_roll": (0.3, np.deg2rad(70), 0.25),
    "yaw-80_pitch_roll": (-0.25, np.deg2rad(-80), -0.3),
    "yaw85": (0.1, np.deg2rad(85), 0.1),
}


COLUMNS = 90
"""Toy-face lattice columns here: about 7,900 vertices 0.6 px apart, the face 54 px wide in the 96 px crop.
The thresholds below were measured on it."""

MOUTH = (0.0, -45.0, 25.0, 10.0)
"""A ``cut`` of the toy face (ellipse centre x, y, radii x, y in model mm) enclosed by it: an open mouth."""
NOTCH = (0.0, -95.0, 15.0, 25.0)
"""An elliptic cut reaching the face's outline at the chin: a notch, not a hole."""


def frontalised(vertices, rotation):
    """The frontal mesh the voxeliser builds: ``R^T (V - c) + c`` about the mean vertex ``c``."""
    pivot = vertices.mean(axis=0)
    return (vertices - pivot) @ rotation + pivot


def voxel_centres(grid, box):
    """``(N, 3)`` crop coordinates of the voxel centres in ``box`` (a tuple of three slices), C order."""
    d, y, x = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
    return np.column_stack([x.ravel(), y.ravel(), grid.d_to_z(d.ravel())])


def ray_cast_solid(vertices, triangles, rotation, grid, box):
    """Independent occupancy over ``box``: a voxel is inside iff a ray from its centre towards the
    frontal camera (direction ``-R[:, 2]``) hits the mesh and its frontal depth is <= z_back."""
    pivot = vertices.mean(axis=0)
    z_back = frontalised(vertices, rotation)[:, 2].max()
    centres = voxel_centres(grid, box)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(triangles.astype(np.uint32)))
    rays = np.hstack([centres, np.broadcast_to(-rotation[:, 2], centres.shape)]).astype(np.float32)
    hit = np.isfinite(scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy())
    frontal_z = ((centres - pivot) @ rotation + pivot)[:, 2]
    return (hit & (frontal_z <= z_back)).reshape([s.stop - s.start for s in box])


def compare_with_ray_casting(volume, vertices, triangles, rotation, grid, margin=3):
    """Agreement and IoU over the bounding box of our volume grown by ``margin`` voxels; checks the
    ray-cast solid has nothing on that box's faces, so the box holds the union of both solids."""
    occupied = np.argwhere(volume)
    lo = np.maximum(occupied.min(axis=0) - margin, 0)
    hi = np.minimum(occupied.max(axis=0) + 1 + margin, grid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    truth = ray_cast_solid(vertices, triangles, rotation, grid, box)
    ours = volume[box]
    for axis in range(3):
        for end in (0, -1):
            if (lo[axis], hi[axis])[end] not in (0, grid.shape[axis]):  # faces at the grid's edge may clip
                assert not np.take(truth, end, axis=axis).any(), "ray-cast solid reaches the population box"
    agreement = (ours == truth).mean()
    iou = (ours & truth).sum() / (ours | truth).sum()
    return agreement, iou


@pytest.mark.parametrize("name", POSES)
def test_aligned_volume_matches_ray_casting(name):
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES[name], columns=COLUMNS)
    assert 5_000 <= len(vertices) <= 20_000
    volume = voxelise(vertices, triangles, rotation, SMALL_GRID)
    assert volume.shape == SMALL_GRID.shape and volume.dtype == bool
    agreement, iou = compare_with_ray_casting(volume, vertices, triangles, rotation, SMALL_GRID)
    # Measured: 1.0 frontal; 0.9995+ agreement and 0.998+ IoU at yaw 70-85 with pitch and roll.
    assert agreement >= 0.995 and iou >= 0.98, (agreement, iou)


@pytest.mark.parametrize("name", ["mild", "yaw-80_pitch_roll"])
def test_frontal_volume_matches_ray_casting(name):
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES[name], columns=COLUMNS)
    volume = voxelise_frontal(vertices, triangles, rotation, SMALL_GRID)
    frontal = frontalised(vertices, rotation)
    agreement, iou = compare_with_ray_casting(volume, frontal, triangles, np.eye(3), SMALL_GRID)
    assert agreement >= 0.999 and iou >= 0.995, (agreement, iou)


def test_paper_grid_matches_ray_casting():
    vertices, triangles, _, rotation = posed_face(PAPER_GRID, (-0.2, np.deg2rad(-60), 0.3), columns=110)
    volume = voxelise(vertices, triangles, rotation, PAPER_GRID)
    assert volume.shape == (200, 192, 192)
    agreement, iou = compare_with_ray_casting(volume, vertices, triangles, rotation, PAPER_GRID)
    assert agreement >= 0.995 and iou >= 0.98, (agreement, iou)


def test_self_occlusion_leaves_air_between_nose_and_cheek():
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, (0.2, np.deg2rad(65), 0.1), columns=COLUMNS)
    volume = voxelise(vertices, triangles, rotation, SMALL_GRID)
    # Columns whose first occupied run (the nose) ends at least 4 voxels (2 px) before the next one
    # (the cheek behind it) starts.
    depth = np.arange(SMALL_GRID.depth)[:, None, None]
    first_start = volume.argmax(axis=0)
    first_end = np.where(~volume & (depth > first_start), depth, SMALL_GRID.depth).min(axis=0)
    second_start = np.where(volume & (depth > first_end), depth, SMALL_GRID.depth).min(axis=0)
    gapped = np.argwhere(volume.any(axis=0) & (second_start < SMALL_GRID.depth) & (second_start - first_end >= 4))
    assert len(gapped) >= 3
    for y, x in gapped:
        column = (slice(0, SMALL_GRID.depth), slice(y, y + 1), slice(x, x + 1))
        truth = ray_cast_solid(vertices, triangles, rotation, SMALL_GRID, column)[:, 0, 0]
        assert (np.diff(truth.astype(np.int8), prepend=0) == 1).sum() >= 2  # air in the true solid too
        assert (truth != volume[:, y, x]).sum() <= 2


@pytest.mark.parametrize("name", POSES)
def test_front_surface_is_the_posed_depth_map(name):
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES[name], columns=COLUMNS)
    grid = SMALL_GRID
    volume = voxelise(vertices, triangles, rotation, grid)
    raster = rasterise(vertices, triangles, grid.height, grid.width)
    # Visible face pixels off the one-pixel silhouette border, with the surface inside the grid's depth
    # and more than two voxels in front of the solid's back plane (the deepest frontal vertex): on the
    # toy face's flat rim the solid has no thickness, and whether such a column holds a voxel
    # centre depends on the lattice.
    z_lo, z_hi = grid.z_range
    frontal_depth = frontalised(vertices, rotation)[:, 2:]  # (V, 1) px
    pixel_frontal_depth = raster.interpolate(frontal_depth, triangles)[..., 0]
    thick = pixel_frontal_depth < frontal_depth.max() - 2.0 / grid.z_scale
    visible = ndimage.binary_erosion(raster.mask) & (raster.depth >= z_lo) & (raster.depth <= z_hi) & thick
    assert volume.any(axis=0)[visible].all()
    # Exact geometry puts the first occupied voxel centre at or behind the surface by less than one
    # voxel: error in [0, 1). Off by up to 0.6 px in frontal x, y, the nearest sample's plane is exact
    # on planar parts; creases (nose tip, dome rim) give a little more.
    first_z = grid.d_to_z(volume.argmax(axis=0)[visible])
    error_voxels = (first_z - raster.depth[visible]) * grid.z_scale
    outside_one_voxel = np.abs(error_voxels - 0.5) > 0.5 + 0.05  # 0.05: float32 slack
    assert outside_one_voxel.mean() <= 0.02, outside_one_voxel.mean()  # measured <= 1.1 %
    assert np.abs(error_voxels).max() <= 2.0, np.abs(error_voxels).max()  # measured <= 1.8


@pytest.mark.parametrize("name", POSES)
def test_occupied_columns_are_the_silhouette(name):
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES[name], columns=COLUMNS)
    volume = voxelise(vertices, triangles, rotation, SMALL_GRID)
    silhouette = rasterise(vertices, triangles, SMALL_GRID.height, SMALL_GRID.width).mask
    differs = volume.any(axis=0) != silhouette
    border = ndimage.binary_dilation(silhouette) & ~ndimage.binary_erosion(silhouette)
    assert not (differs & ~border).any()
    assert differs.sum() <= 0.05 * silhouette.sum()


@pytest.mark.parametrize("name", ["mild", "yaw70_pitch_roll"])
def test_frontal_volume_is_aligned_volume_of_frontalised_mesh(name):
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES[name], columns=COLUMNS)
    frontal = frontalised(vertices, rotation)
    expected = voxelise(frontal, triangles, np.eye(3), SMALL_GRID)
    np.testing.assert_array_equal(voxelise_frontal(vertices, triangles, rotation, SMALL_GRID), expected)
    assert expected.sum() > 10_000


def test_mesh_outside_the_grid_gives_an_empty_volume():
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES["mild"], columns=COLUMNS)
    assert not voxelise(vertices + [500.0, 0.0, 0.0], triangles, rotation, SMALL_GRID).any()


def test_bad_input_is_rejected():
    vertices, triangles, _, rotation = posed_face(SMALL_GRID, POSES["mild"], columns=30)
    bad = vertices.copy()
    bad[[3, 8]] = np.nan
    with pytest.raises(ValueError, match=r"mesh has 2 non-finite vertices .* index 3"):
        voxelise(bad, triangles, rotation, SMALL_GRID)
    with pytest.raises(ValueError, match=r"vertices must have shape \(V, 3\)"):
        voxelise(vertices[:, :2], triangles, rotation, SMALL_GRID)
    with pytest.raises(ValueError, match=r"triangles must be an integer array of shape \(T, 3\)"):
        voxelise(vertices, triangles.astype(float), rotation, SMALL_GRID)
    with pytest.raises(ValueError, match=rf"triangle indices must lie in \[0, {len(vertices) - 1}\]"):
        voxelise_frontal(vertices, triangles + 1, rotation, SMALL_GRID)
    with pytest.raises(ValueError, match="proper rotation"):
        voxelise(vertices, triangles, 1.1 * rotation, SMALL_GRID)
    with pytest.raises(ValueError, match="proper rotation"):
        voxelise(vertices, triangles, -rotation, SMALL_GRID)  # a reflection
    with pytest.raises(TypeError, match="VoxelGrid"):
        voxelise(vertices, triangles, rotation, (100, 96, 96))


def seen_through_cut(view, intact, cut, grid):
    """(H, W) bool pixels the ``intact`` triangles cover and the ``cut`` ones leave open, on ``view`` vertices."""
    return rasterise(view, intact, grid.height, grid.width).mask & ~rasterise(view, cut, grid.height, grid.width).mask


@pytest.mark.parametrize("yaw_degrees", [0, 30])
def test_mouth_hole_is_closed_between_its_rim_depths(yaw_degrees):
    pose = (0.1, np.deg2rad(yaw_degrees), 0.05)
    vertices, intact, _, rotation = posed_face(SMALL_GRID, pose, columns=COLUMNS)
    open_mouth = posed_face(SMALL_GRID, pose, columns=COLUMNS, cut=MOUTH)[1]
    frontal = frontalised(vertices, rotation)
    grid = SMALL_GRID
    for volume, view in ((voxelise(vertices, open_mouth, rotation, grid), vertices),
                         (voxelise_frontal(vertices, open_mouth, rotation, grid), frontal)):
        raster = rasterise(view, open_mouth, grid.height, grid.width)
        hole = rasterise(view, intact, grid.height, grid.width).mask & ~raster.mask  # seen through the mouth
        assert hole.sum() >= 80
        assert volume.any(axis=0)[hole].all()
        # Front of the closed columns against the depths of the covered pixels within 2 px (the rim).
        front_z = grid.d_to_z(volume.argmax(axis=0)[hole])
        rim_z = raster.depth[ndimage.binary_dilation(hole, iterations=2) & raster.mask]
        # Measured: at least 0.33 px inside the rim's range; allow one voxel (0.5 px) beyond it.
        assert rim_z.min() - 0.5 <= front_z.min() and front_z.max() <= rim_z.max() + 0.5, (front_z, rim_z)


def test_notch_in_the_outline_stays_empty():
    pose = (0.1, np.deg2rad(30), 0.05)
    vertices, notched, _, rotation = posed_face(SMALL_GRID, pose, columns=COLUMNS, cut=NOTCH)
    intact = posed_face(SMALL_GRID, pose, columns=COLUMNS)[1]
    grid = SMALL_GRID
    frontal = frontalised(vertices, rotation)
    volume = voxelise_frontal(vertices, notched, rotation, grid)
    inner = ndimage.binary_erosion(seen_through_cut(frontal, intact, notched, grid))  # off its one-pixel border
    assert inner.sum() >= 40
    assert not volume.any(axis=0)[inner].any()

    # Posed, the solid behind the notch's walls shows through it, so compare with ray casting, which
    # sees the notch as open, in the columns around the notch.
    volume = voxelise(vertices, notched, rotation, grid)
    rows, cols = np.nonzero(ndimage.binary_dilation(seen_through_cut(vertices, intact, notched, grid), iterations=2))
    box = (slice(0, grid.depth), slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    truth = ray_cast_solid(vertices, notched, rotation, grid, box)
    notch_voxels = (ray_cast_solid(vertices, intact, rotation, grid, box) & ~truth).sum()
    assert notch_voxels >= 300
    assert (volume[box] != truth).sum() <= 0.25 * notch_voxels  # measured 89 of 684


def test_open_mouth_of_the_surrey_face_model_is_closed(shared_data):
    from data_prep.face_model import load_face_model

    model = load_face_model(f"sfm:{shared_data / 'sfm'}")
    # The mean face's lips meet (no hole pixels): open the mouth with the "surprise" blendshape.
    surprise = model.shape(expression=np.array(model.expression_names) == "surprise")
    grid = SMALL_GRID
    pose = (0.1, np.deg2rad(30), 0.05)
    vertices = model_to_crop(surprise, pose, 0.6, (47.5, 40.0, 0.0))  # the face is ~90 px wide
    rotation = crop_rotation(pose)
    inner_lips = model.landmark_vertices[60:68]
    frontal = frontalised(vertices, rotation)
    for volume, view in ((voxelise(vertices, model.triangles, rotation, grid), vertices),
                         (voxelise_frontal(vertices, model.triangles, rotation, grid), frontal)):
        raster = rasterise(view, model.triangles, grid.height, grid.width)
        mouth = polygon2mask(raster.mask.shape, view[inner_lips][:, 1::-1])  # (row, col) = (y, x)
        hole = mouth & ~raster.mask
        assert hole.sum() >= 40
        assert volume.any(axis=0)[hole].all()
        # The hole's rim runs along the inner lips: the closing surface lies within their depths
        # (measured: at most 0.2 px in front of the nearest lip landmark, never behind the farthest).
        front_z = grid.d_to_z(volume.argmax(axis=0)[hole])
        lips_z = view[inner_lips, 2]
        assert lips_z.min() - 0.5 <= front_z.min() and front_z.max() <= lips_z.max() + 0.5, (front_z, lips_z)
