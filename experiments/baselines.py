"""The baselines of the results table, as LightningModules scored by the same test path as the models.

- mean training volume: the average occupancy of the training split, the same for every test image;
- mean shape at the ground-truth pose (an oracle: it is handed the true pose): the face model's mean
  shape, rotated by the sample's ground-truth pose, scaled and translated onto its ground-truth 3D
  landmarks (least squares, rotation fixed), then voxelised like the ground truth;
- 3DMM fit to 2D landmarks (the paper's EOS row): the face model's identity and expression
  coefficients and a scaled-orthographic camera fitted to the sample's 68 landmarks (ground truth or
  a detector's) with a Tikhonov regulariser (:func:`~lightning_vrn.geometry.fitting.fit_shape_to_landmarks`),
  placed in depth by the synthetic data's convention, voxelised with the fitted rotation; a sample whose
  landmarks have no face-like fit (a weak detector's collapsed output) gets an empty volume, scored as failed.

Their test steps return ``{"volume": (B, D, H, W)}`` soft occupancy, which
:class:`lightning_vrn.callbacks.NMECallback` scores exactly as it scores a model's predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from tqdm import tqdm

from data_prep.face_model import load_face_model
from lightning_vrn.dataset_file import FaceDatasetFile, open_dataset, unpack_volume
from lightning_vrn.geometry import (
    LandmarksDoNotFit,
    ShapeFit,
    VoxelGrid,
    crop_rotation,
    fit_shape_to_landmarks,
    model_to_crop,
)
from lightning_vrn.geometry.crop import front_z
from lightning_vrn.geometry.voxelise import voxelise

DEFAULT_REGULARISATION = 3.0
"""Weight of ``|c|^2`` against squared landmark residuals in model mm for :class:`FittedShapeBaseline`.
Chosen for noisy landmarks (a detector's): on synthetic faces it was best or near best with noisy
landmarks, while smaller weights fit exact landmarks better and noisy ones worse (the vertex errors per
weight: benchmarks/results_settings.md)."""


def mean_training_volume(path: Path, grid: VoxelGrid, max_samples: int = 1000,
                         grid_source: str = "the checkpoint") -> np.ndarray:
    """``(D, H, W)`` float32 mean occupancy over (up to ``max_samples`` of) a training file of ``grid``."""
    train = open_dataset(path, expected_grid=grid, grid_source=grid_source)
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


class FaceModelBaseline(Baseline):
    """A baseline built from the face model its test data was made from (``self.model``)."""

    def __init__(self, grid: VoxelGrid, face_model_spec: str):
        super().__init__(grid)
        self.model = load_face_model(face_model_spec)

    @classmethod
    def for_file(cls, test_file: FaceDatasetFile, grid: VoxelGrid, *args, **kwargs) -> "FaceModelBaseline":
        """The baseline (``args``, ``kwargs``: the class's own arguments after the face model) for a file
        made by ``data_prep.synthetic``, which records its face model."""
        spec = test_file.attrs.get("face_model_spec")
        if spec is None:
            raise ValueError(f"{test_file.path} does not record the face model it was made from (attribute "
                             f"face_model_spec): {cls.__name__} needs synthetic data from "
                             f"data_prep.synthetic")
        return cls(grid, str(spec), *args, **kwargs)


class MeanShapeBaseline(FaceModelBaseline):
    """Predicts the voxelised mean face placed at each test sample's ground-truth pose (an oracle)."""

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


class FittedShapeBaseline(FaceModelBaseline):
    """Predicts the voxelised face model fitted to each sample's 2D landmarks (the paper's EOS row).

    ``regularisation``: the Tikhonov weight (:data:`DEFAULT_REGULARISATION`); ``landmarks``: where the
    landmarks come from, a callable ``batch -> (B, 68, 2)`` crop pixels (a detector's ``landmarks``
    method; a torch module's method brings the module along, moved to the device and put in eval mode
    with this one); None: the batch's ground-truth ``landmarks_2d``. The fitted mesh's nearest point
    goes where the synthetic generator puts it (:func:`lightning_vrn.geometry.crop.front_z`): depth is not in
    the landmarks.
    """

    def __init__(self, grid: VoxelGrid, face_model_spec: str, regularisation: float = DEFAULT_REGULARISATION,
                 landmarks: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None):
        super().__init__(grid, face_model_spec)
        self.regularisation = float(regularisation)
        self.landmark_source = landmarks
        if isinstance(getattr(landmarks, "__self__", None), torch.nn.Module):
            self.detector = landmarks.__self__
        self.basis = np.concatenate([self.model.identity_basis, self.model.expression_basis]).transpose(1, 2, 0)

    def fit_landmarks(self, landmarks_2d: np.ndarray) -> ShapeFit:
        """The fit of one sample's ``(68, 2)`` crop-pixel landmarks."""
        return fit_shape_to_landmarks(landmarks_2d, self.model.mean, self.basis, self.model.landmark_vertices,
                                      self.regularisation)

    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        landmarks = batch["landmarks_2d"] if self.landmark_source is None else self.landmark_source(batch)
        volumes = []
        for points in landmarks.detach().cpu().numpy():
            try:
                fit = self.fit_landmarks(points)
            except LandmarksDoNotFit:  # a detector's degenerate landmarks: an empty volume, scored as failed
                volumes.append(np.zeros(self.grid.shape, dtype=bool))
                continue
            volumes.append(voxelise(fit.crop_vertices(front_z(self.grid)), self.model.triangles, fit.crop_rotation,
                                    self.grid))
        return torch.from_numpy(np.stack(volumes).astype(np.float32))
