"""The two baselines of the results table, scored with the same NME as the models.

- mean training volume: the average occupancy of the training split, the same for every test image;
- mean shape at the ground-truth pose: the face model's mean shape, rotated by the sample's
  ground-truth pose, scaled and translated onto its ground-truth 3D landmarks (least squares,
  rotation fixed), then voxelised like the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.face_model import load_face_model
from lightning_vrn.dataset_file import open_dataset, unpack_volume
from lightning_vrn.geometry import VoxelGrid, crop_rotation, model_to_crop
from lightning_vrn.geometry.voxelise import voxelise


def mean_training_volume(path: Path, grid: VoxelGrid, max_samples: int = 1000) -> np.ndarray:
    """``(D, H, W)`` float32 mean occupancy over (up to ``max_samples`` of) a training file."""
    train = open_dataset(path, expected_grid=grid)
    count = min(len(train), max_samples)
    total = np.zeros(grid.shape, dtype=np.float64)
    for i in tqdm(range(count), desc="mean training volume", unit="sample"):
        total += unpack_volume(train.read(i, ["volumes"])["volumes"], grid.width)
    return (total / count).astype(np.float32)


def fit_scale_translation(points: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares ``s, t`` minimising ``|s * points + t - targets|`` for ``(N, 3)`` arrays."""
    p = points - points.mean(0)
    q = targets - targets.mean(0)
    scale = float((p * q).sum() / (p * p).sum())
    return scale, targets.mean(0) - scale * points.mean(0)


class MeanShapeBaseline:
    """Predicts the voxelised mean face placed at each test sample's ground-truth pose."""

    def __init__(self, test_file, grid: VoxelGrid):
        spec = test_file.attrs.get("face_model_spec")
        if spec is None:
            raise ValueError(f"{test_file.path} does not record the face model it was made from (attribute "
                             f"face_model_spec): the mean-shape baseline needs synthetic data from data_prep.synthetic")
        self.model = load_face_model(str(spec))
        self.grid = grid

    def place(self, sample: dict) -> np.ndarray:
        """``(V, 3)`` mean-shape vertices in the sample's crop coordinates."""
        pose = sample["pose"]
        rotated = model_to_crop(self.model.mean, pose, 1.0, np.zeros(3))
        scale, translation = fit_scale_translation(
            rotated[self.model.landmark_vertices], sample["landmarks_3d"].astype(np.float64)
        )
        return scale * rotated + translation

    def predict(self, sample: dict) -> np.ndarray:
        """``(D, H, W)`` float32 occupancy of the placed mean shape."""
        vertices = self.place(sample)
        return voxelise(vertices, self.model.triangles, crop_rotation(sample["pose"]), self.grid).astype(np.float32)


