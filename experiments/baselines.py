"""The baselines of the results table, as LightningModules scored by the same test path as the models.

- mean training volume: the average occupancy of the training split, the same for every test image;
- mean shape at the ground-truth pose (an oracle: it is handed the true pose): the face model's mean
  shape, rotated by the sample's ground-truth pose, scaled and translated onto its ground-truth 3D
  landmarks (least squares, rotation fixed), then voxelised like the ground truth.

Their test steps return ``{"volume": (B, D, H, W)}`` soft occupancy, which
:class:`lightning_vrn.callbacks.NMECallback` scores exactly as it scores a model's predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
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


class Baseline(pl.LightningModule):
    """A predictor without weights to train: :meth:`predict` maps a batch to soft volumes ``(B, D, H, W)``."""

    target_frame = "aligned"

    def __init__(self, grid: VoxelGrid):
        super().__init__()
        self.grid = grid

    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"volume": self.predict(batch)}


class MeanVolumeBaseline(Baseline):
    """Predicts the mean training occupancy for every image."""

    def __init__(self, grid: VoxelGrid, mean_volume: np.ndarray):
        super().__init__(grid)
        self.register_buffer("mean_volume", torch.as_tensor(mean_volume, dtype=torch.float32))

    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.mean_volume.expand(len(batch["index"]), *self.grid.shape)


class MeanShapeBaseline(Baseline):
    """Predicts the voxelised mean face placed at each test sample's ground-truth pose (an oracle)."""

    def __init__(self, grid: VoxelGrid, face_model_spec: str):
        super().__init__(grid)
        self.model = load_face_model(face_model_spec)

    @classmethod
    def for_file(cls, test_file, grid: VoxelGrid) -> "MeanShapeBaseline":
        """The baseline for a dataset file made by ``data_prep.synthetic`` (it records its face model)."""
        spec = test_file.attrs.get("face_model_spec")
        if spec is None:
            raise ValueError(f"{test_file.path} does not record the face model it was made from (attribute "
                             f"face_model_spec): the mean-shape baseline needs synthetic data from data_prep.synthetic")
        return cls(grid, str(spec))

    def place(self, pose: np.ndarray, landmarks_3d: np.ndarray) -> np.ndarray:
        """``(V, 3)`` mean-shape vertices in a sample's crop coordinates, from its pose and 3D landmarks."""
        rotated = model_to_crop(self.model.mean, pose, 1.0, np.zeros(3))
        scale, translation = fit_scale_translation(
            rotated[self.model.landmark_vertices], np.asarray(landmarks_3d, dtype=np.float64)
        )
        return scale * rotated + translation

    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        volumes = []
        for pose, landmarks in zip(batch["pose"].cpu().numpy(), batch["landmarks_3d"].cpu().numpy()):
            vertices = self.place(pose, landmarks)
            volumes.append(voxelise(vertices, self.model.triangles, crop_rotation(pose), self.grid))
        return torch.from_numpy(np.stack(volumes).astype(np.float32))
