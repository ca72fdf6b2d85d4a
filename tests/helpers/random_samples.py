"""A small dataset file's worth of random samples with every field (frontal volume and expression included),
the shared topology they fit, and a writer of such a file."""

import numpy as np

from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.grid import VoxelGrid

GRID = VoxelGrid.centred(12, 16, 16)
N, V = 6, 40
ATTRS = {"face_model": "test", "source": "unit-test", "seed": 7, "created_by": "tests"}
EXPRESSION_NAMES = ("neutral", "smile", "frown")
E = 4


def make_samples(n=N, grid=GRID, num_vertices=V, seed=0):
    """Random samples with every field, frontal volume and expression included."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (grid.height, grid.width, 3), dtype=np.uint8),
            "volume": rng.random(grid.shape) < 0.3,
            "volume_frontal": rng.random(grid.shape) < 0.3,
            "landmarks_2d": rng.normal(size=(68, 2)).astype(np.float32),
            "landmarks_3d": rng.normal(size=(68, 3)).astype(np.float32),
            "pose": rng.normal(size=3).astype(np.float32),
            "vertices": rng.normal(size=(num_vertices, 3)).astype(np.float32) * 50,
            "expression": rng.normal(size=E).astype(np.float32),
            "expression_label": rng.integers(0, len(EXPRESSION_NAMES)),
        }
        for _ in range(n)
    ]


TOPOLOGY = {
    "triangles": np.random.default_rng(1).integers(0, V, (30, 3)),
    "face_region": np.arange(5, 35),
    "landmark_vertices": np.random.default_rng(2).integers(0, V, 68),
}


def new_writer(path, attrs=ATTRS, num_samples=N, grid=GRID, **kwargs):
    """A writer of a file of ``num_samples`` such samples: frontal volumes, expressions, :data:`TOPOLOGY`."""
    kwargs = {"expression_names": EXPRESSION_NAMES, "num_expression_coefficients": E, **kwargs}
    return DatasetWriter(path, grid, num_samples, V, attrs=attrs, with_frontal=True, **TOPOLOGY, **kwargs)
