"""An analytic triaxial ellipsoid in a small crop: its soft occupancy volume (optionally rotated about its centre)
and exact points of its camera-facing part, for NME cases with a known answer."""

import numpy as np

from lightning_vrn.geometry.grid import VoxelGrid

GRID = VoxelGrid.centred(80, 64, 64)
CENTRE = np.array([31.0, 32.5, 0.7])  # crop x, y, z (px)
AXES = np.array([20.0, 24.0, 12.0])  # triaxial: no rotation about the centre maps it onto itself


def ellipsoid_volume(rotation=np.eye(3), grid=GRID) -> np.ndarray:
    """Soft (D, H, W) occupancy of the ellipsoid rotated by ``rotation`` about its centre (0.5 on the surface)."""
    d, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij")
    points = np.stack([x, y, d / grid.z_scale + grid.z_offset], axis=-1)
    q = (points - CENTRE) @ rotation / AXES  # R^T (p - c), scaled
    distance = ((q**2).sum(-1) - 1.0) / np.linalg.norm(2 * q / AXES, axis=-1)
    return (1.0 / (1.0 + np.exp(distance / 0.7))).astype(np.float32)


def ellipsoid_front_points(count: int = 3000) -> np.ndarray:
    """(F, 3) exact points of the ellipsoid's camera-facing part (surface normal pointing to -z)."""
    i = np.arange(count) + 0.5
    z = -np.linspace(0.25, 1.0, count, endpoint=False)  # front cap only
    azimuth = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    directions = np.stack([r * np.cos(azimuth), r * np.sin(azimuth), z], axis=-1)
    return CENTRE + directions * AXES
