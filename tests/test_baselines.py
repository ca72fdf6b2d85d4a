"""Baselines on synthetic test samples: the 3DMM fit to landmarks against the mean training volume and
the mean shape at the true pose, scored with the paper's NME."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from datamodules.dataset import FaceVolumeDataset
from experiments.baselines import FittedShapeBaseline, MeanShapeBaseline, MeanVolumeBaseline, mean_training_volume
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.landmarks import outer_interocular
from lightning_vrn.metrics.nme import sample_nme

GRID = VoxelGrid.parse("100,96,96")
COUNT = 3


@pytest.fixture(scope="module")
def test_data(tiny_synthetic):
    """The first test samples as one batch (with vertices), and their file."""
    dataset = FaceVolumeDataset(tiny_synthetic / "test.h5", GRID, load_vertices=True)
    return default_collate([dataset[i] for i in range(COUNT)]), dataset.file


def nmes(volumes, batch, test_file):
    return np.array([sample_nme(volume.numpy(), vertices.numpy()[test_file.face_region],
                                outer_interocular(landmarks.numpy()), GRID).nme
                     for volume, vertices, landmarks in zip(volumes, batch["vertices"], batch["landmarks_3d"])])


def test_fitted_shape_is_far_better_than_the_mean_volume_and_near_the_oracle(test_data, tiny_synthetic):
    batch, test_file = test_data
    fitted = FittedShapeBaseline.for_file(test_file, GRID).test_step(batch, 0)["volume"]
    assert fitted.shape == (COUNT, *GRID.shape) and fitted.dtype == torch.float32
    exact = FittedShapeBaseline.for_file(test_file, GRID, regularisation=0.01).predict(batch)
    mean_volume = MeanVolumeBaseline(GRID, mean_training_volume(tiny_synthetic / "train.h5", GRID)).predict(batch)
    oracle = MeanShapeBaseline.for_file(test_file, GRID).predict(batch)
    fitted_nme, exact_nme, mean_volume_nme, oracle_nme = (nmes(v, batch, test_file).mean()
                                                          for v in (fitted, exact, mean_volume, oracle))
    # Measured (mean of 3): fitted with the default weight 0.036, with 0.01 0.012, mean training volume
    # 0.224, mean shape at the true pose 0.024. The default weight is chosen for a detector's noisy
    # landmarks; these are exact, so a small weight beats the mean shape even handed the true pose.
    assert fitted_nme < 0.25 * mean_volume_nme
    assert fitted_nme < 2.0 * oracle_nme
    assert exact_nme < oracle_nme


class ShiftedDetector(torch.nn.Module):
    """A landmark "detector" that returns the true landmarks moved 4 px to the right."""

    def landmarks(self, batch):
        return batch["landmarks_2d"] + torch.tensor([4.0, 0.0])


def test_landmarks_can_come_from_a_detector(test_data):
    batch, test_file = test_data
    detector = ShiftedDetector()
    baseline = FittedShapeBaseline.for_file(test_file, GRID, 1.0, landmarks=detector.landmarks)
    assert baseline.detector is detector  # moves to the device and into eval mode with the baseline
    shifted = baseline.predict(batch)
    plain = FittedShapeBaseline.for_file(test_file, GRID, regularisation=1.0).predict(batch)
    # Landmarks 4 px to the right give the same face 4 voxels to the right.
    assert plain[..., -4:].sum() == 0 and plain.sum() > 0
    assert (shifted[..., 4:] != plain[..., :-4]).float().mean() < 1e-4
