"""Geometry shared by data preparation and evaluation: grid, crop, pose, topology, rasteriser, voxeliser,
iso-surface, mesh I/O, face-model fitting to landmarks."""

from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, CropTransform, landmark_crop
from lightning_vrn.geometry.fitting import LandmarksDoNotFit, ShapeFit, fit_shape_to_landmarks
from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import read_mesh, write_mesh
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.pose import (
    crop_rotation,
    euler_to_matrix,
    euler_to_matrix_torch,
    matrix_to_euler,
    matrix_to_euler_torch,
    model_to_crop,
)
from lightning_vrn.geometry.raster import Raster, rasterise
from lightning_vrn.geometry.topology import as_vertex_ids
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal

__all__ = [
    "LANDMARK_BOX_FRACTION",
    "LandmarksDoNotFit",
    "PAPER_GRID",
    "CropTransform",
    "Raster",
    "ShapeFit",
    "VoxelGrid",
    "as_vertex_ids",
    "crop_rotation",
    "euler_to_matrix",
    "euler_to_matrix_torch",
    "fit_shape_to_landmarks",
    "landmark_crop",
    "matrix_to_euler",
    "matrix_to_euler_torch",
    "model_to_crop",
    "rasterise",
    "read_mesh",
    "vertex_normals",
    "volume_to_mesh",
    "voxelise",
    "voxelise_frontal",
    "write_mesh",
]
