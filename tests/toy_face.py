"""A small synthetic face for the datamodule tests: a left-right symmetric height-field mesh with a nose,
68 landmark vertices placed like iBUG's, posed into a crop, voxelised, and written as a dataset file."""

from __future__ import annotations

import numpy as np

from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal
from lightning_vrn.landmarks import FLIP

HALF_WIDTH_MM, HALF_HEIGHT_MM = 75.0, 95.0

# Model (x, y) in mm (x to the image right when frontal, y up) of the landmarks on the subject's
# right (negative x) and on the mid line; the rest are their mirror images through FLIP.
_RIGHT_AND_MIDDLE = {
    **{k: (-65 * np.cos(np.pi * k / 16), 10 - 75 * np.sin(np.pi * k / 16)) for k in range(9)},  # jaw 0..8
    **{17 + k: (-55 + 10 * k, 40) for k in range(5)},                                           # right brow
    27: (0, 30), 28: (0, 20), 29: (0, 10), 30: (0, 0),                                          # nose bridge
    31: (-12, -8), 32: (-6, -8), 33: (0, -8),                                                   # nostrils
    36: (-45, 25), 37: (-37, 30), 38: (-27, 30), 39: (-20, 25), 40: (-27, 20), 41: (-37, 20),   # right eye
    48: (-25, -30), 49: (-15, -25), 50: (-6, -23), 51: (0, -24), 57: (0, -41), 58: (-6, -40), 59: (-15, -38),
    60: (-20, -30), 61: (-8, -28), 62: (0, -28), 66: (0, -33), 67: (-8, -33),                   # lips
}


def face_mesh(columns: int = 41, rows: int = 51):
    """Symmetric face in model mm: ``(vertices (V, 3), triangles (T, 3), landmark_vertices (68,))``.

    A lattice over an ellipse (x symmetric: ``columns`` odd), depth ``40 sqrt(1 - r^2)`` mm plus a
    25 mm Gaussian nose; landmark ``FLIP[i]`` is the mirror vertex of landmark ``i``.
    """
    u, v = np.meshgrid(np.linspace(-1, 1, columns), np.linspace(-1, 1, rows))
    x, y = HALF_WIDTH_MM * u, HALF_HEIGHT_MM * v
    z = 40 * np.sqrt(np.clip(1 - u**2 - v**2, 0, None)) + 25 * np.exp(-(x**2 + (y + 5) ** 2) / (2 * 12.0**2))
    inside = (u**2 + v**2 <= 1.0).ravel()
    ids = np.arange(rows * columns).reshape(rows, columns)
    quads = np.stack([ids[:-1, :-1], ids[:-1, 1:], ids[1:, 1:], ids[1:, :-1]], -1).reshape(-1, 4)
    quads = quads[inside[quads].all(axis=1)]
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    new_id = np.cumsum(inside) - 1
    vertices = np.stack([x, y, z], -1).reshape(-1, 3)[inside]

    landmark_cells = np.zeros((68, 2), dtype=np.int64)  # (row, column) on the lattice
    for k, (lx, ly) in _RIGHT_AND_MIDDLE.items():
        cell = (int(np.argmin(np.abs(y[:, 0] - ly))), int(np.argmin(np.abs(x[0] - lx))))
        landmark_cells[k] = cell
        landmark_cells[FLIP[k]] = (cell[0], columns - 1 - cell[1])
    landmark_vertices = new_id[ids[landmark_cells[:, 0], landmark_cells[:, 1]]]
    return vertices, new_id[triangles], landmark_vertices


def posed_face(grid: VoxelGrid, pose, offset_px=(0.0, 0.0)):
    """The toy face posed in ``grid``'s crop: ``(vertices_crop (V, 3), triangles, landmark_vertices, rotation)``.

    About 45 px wide per 96 px of crop, centred (plus ``offset_px``) and roughly centred in depth.
    """
    vertices_mm, triangles, landmark_vertices = face_mesh()
    scale = 0.3 * grid.crop_size / 96
    centre = ((grid.width - 1) / 2 + offset_px[0], (grid.height - 1) / 2 + offset_px[1], grid.z_centre + 30 * scale)
    vertices = model_to_crop(vertices_mm, pose, scale, centre)
    return vertices, triangles, landmark_vertices, crop_rotation(pose)


def shaded_image(vertices, triangles, grid: VoxelGrid, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: the face shaded by depth over a noisy background."""
    raster = rasterise(vertices, triangles, grid.height, grid.width)
    near = np.where(raster.mask, (raster.depth.max(where=raster.mask, initial=-np.inf) - raster.depth) / 25.0, 0.0)
    image = 0.2 + 0.1 * rng.random((grid.height, grid.width, 3)) + near[..., None] * np.array([0.7, 0.5, 0.4])
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def toy_sample(grid: VoxelGrid, pose, offset_px=(0.0, 0.0), rng=None, frontal: bool = False) -> dict:
    """A DatasetWriter sample of the posed toy face (plus ``triangles``, ``landmark_vertices``, ``rotation``)."""
    rng = rng or np.random.default_rng(0)
    vertices, triangles, landmark_vertices, rotation = posed_face(grid, pose, offset_px)
    sample = {
        "image": shaded_image(vertices, triangles, grid, rng),
        "volume": voxelise(vertices, triangles, rotation, grid),
        "landmarks_2d": vertices[landmark_vertices, :2].astype(np.float32),
        "landmarks_3d": vertices[landmark_vertices].astype(np.float32),
        "pose": np.asarray(pose, dtype=np.float32),
        "vertices": vertices.astype(np.float32),
    }
    if frontal:
        sample["volume_frontal"] = voxelise_frontal(vertices, triangles, rotation, grid)
    return {**sample, "triangles": triangles, "landmark_vertices": landmark_vertices, "rotation": rotation}


def write_toy_dataset(path, grid: VoxelGrid, num_samples: int, seed: int = 0, frontal: bool = False):
    """Write ``num_samples`` randomly posed toy faces to ``path``; returns the list of samples written."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        pose = rng.uniform([-0.3, -0.7, -0.3], [0.3, 0.7, 0.3])
        samples.append(toy_sample(grid, pose, rng.uniform(-4, 4, 2), rng, frontal))
    first = samples[0]
    writer = DatasetWriter(path, grid, num_samples, len(first["vertices"]), first["triangles"],
                           face_region=np.arange(len(first["vertices"])), landmark_vertices=first["landmark_vertices"],
                           attrs={"face_model": "toy", "source": "tests/toy_face.py", "created_by": "tests",
                                  "seed": seed},
                           with_frontal=frontal)
    keys = ["image", "volume", "landmarks_2d", "landmarks_3d", "pose", "vertices"]
    keys += ["volume_frontal"] if frontal else []
    for index, sample in enumerate(samples):
        writer.write(index, {key: sample[key] for key in keys})
    writer.finish()
    return samples
