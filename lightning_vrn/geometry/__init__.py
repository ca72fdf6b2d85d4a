"""Geometry shared by data preparation and evaluation: grid, pose, rasteriser, voxeliser, iso-surface, mesh I/O."""

from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import read_mesh, write_mesh
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.pose import crop_rotation, euler_to_matrix, matrix_to_euler, model_to_crop
from lightning_vrn.geometry.raster import Raster, rasterise
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal

__all__ = [
    "PAPER_GRID",
    "Raster",
    "VoxelGrid",
    "crop_rotation",
    "euler_to_matrix",
    "matrix_to_euler",
    "model_to_crop",
    "rasterise",
    "read_mesh",
    "vertex_normals",
    "volume_to_mesh",
    "voxelise",
    "voxelise_frontal",
    "write_mesh",
]
