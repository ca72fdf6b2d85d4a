"""Iso-surface of an occupancy volume as a triangle mesh in crop coordinates.

The mesh of a VRN prediction is the 0.5 level set of its soft (sigmoid) volume. Marching cubes
runs in voxel indices ``(d, y, x)``; :meth:`VoxelGrid.voxel_to_crop` turns them into crop
``(x, y, z)`` pixels (z at the grid's depth scale, half a pixel per voxel in the paper). The
volume is padded with one empty voxel on every side so a solid touching the grid border still
gives a closed surface, and triangles are wound counter-clockwise seen from outside (normals
point out of the solid).
"""

from __future__ import annotations

import numpy as np
from skimage.measure import marching_cubes

from lightning_vrn.geometry.grid import VoxelGrid


def volume_to_mesh(volume, grid: VoxelGrid, level: float = 0.5, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of a ``(D, H, W)`` soft occupancy volume (values in [0, 1], high inside).

    Returns ``vertices`` (N, 3) float32 crop coordinates ``(x, y, z)`` in pixels and ``triangles``
    (T, 3) int64 with outward normals. ``step`` > 1 trades resolution for speed (marching cubes'
    ``step_size``). A volume with no value above ``level`` gives empty ``(0, 3)`` arrays.
    """
    volume = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)
    if volume.shape != grid.shape:
        raise ValueError(f"volume has shape {volume.shape}, the grid {grid.describe()} expects {grid.shape}")
    empty = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    inside = volume > level
    if not inside.any():
        return empty

    # Marching cubes only sees cells with a voxel above the level: crop to their bounding box
    # (one voxel of margin, taken from the empty padding at the grid border).
    padded = np.pad(volume, 1, constant_values=0.0)
    lo = [int(np.flatnonzero(inside.any(axis=other))[0]) for other in ((1, 2), (0, 2), (0, 1))]
    hi = [int(np.flatnonzero(inside.any(axis=other))[-1]) + 3 for other in ((1, 2), (0, 2), (0, 1))]
    block = padded[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dyx, triangles, _, _ = marching_cubes(block, level, step_size=step, allow_degenerate=False)
    if len(triangles) == 0:
        return empty
    # Back to unpadded voxel indices, then crop coordinates.
    dyx += np.asarray(lo, dtype=dyx.dtype) - 1.0
    vertices = grid.voxel_to_crop(dyx).astype(np.float32)
    # For a solid with high values inside, skimage winds triangles inward in (d, y, x) index
    # space; (d, y, x) -> (x, y, z) swaps two axes, a reflection, which makes them outward.
    return vertices, triangles.astype(np.int64, copy=False)
