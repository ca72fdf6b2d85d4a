"""Geometry shared by data preparation and evaluation: grid, pose, rasteriser, voxeliser, iso-surface, mesh I/O."""

from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, euler_to_matrix, matrix_to_euler, model_to_crop
from lightning_vrn.geometry.raster import Raster, rasterise

__all__ = [
    "PAPER_GRID",
    "Raster",
    "VoxelGrid",
    "crop_rotation",
    "euler_to_matrix",
    "matrix_to_euler",
    "model_to_crop",
    "rasterise",
]
