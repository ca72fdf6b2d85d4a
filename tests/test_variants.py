"""The VRN variants and ablations: each registered model has a preset and trains from its config, its outputs
have the paper's shapes, VRN-Guided's input carries the landmark maps it is given, and the no-alignment target
is the frontal solid."""

import numpy as np
import pytest
import torch
import yaml

from datamodules import FaceVolumeDataModule
from experiments import train
from experiments.config import CONFIG_DIR, PRESET_DIR, load_config, preset_path
from lightning_vrn.dataset_file import open_dataset, unpack_volume
from lightning_vrn.geometry import VoxelGrid, crop_rotation
from lightning_vrn.geometry.voxelise import voxelise_frontal
from lightning_vrn.heatmaps import gaussian_heatmaps
from lightning_vrn.models import MODELS, VolumeRegressionModule, build_model
from lightning_vrn.models.guided import DetectedGuidance

GRID = VoxelGrid.parse("100,96,96")
TINY = {"features": 16, "hourglass_depth": 2}
PAPER_VARIANTS = {"vrn", "vrn_multitask", "vrn_guided", "vrn_no_alignment", "vrn_guided_sigma2", "landmark_hourglass"}
SWEEPS = CONFIG_DIR.parent / "sweeps"


def test_the_papers_variants_and_ablations_are_registered():
    assert PAPER_VARIANTS <= set(MODELS)


def test_every_registered_model_has_a_preset_and_every_preset_a_model():
    assert {p.stem for p in PRESET_DIR.glob("*.yaml")} == set(MODELS)
    for name in MODELS:
        preset = yaml.safe_load(preset_path(name).read_text())
        assert preset["model"]["name"] == name


@pytest.mark.parametrize("sweep", ["variants.yaml", "ablations.yaml"])
def test_the_variant_sweeps_list_every_volume_model(sweep):
    """The sweeps comparing variants list every registered model that predicts a volume (the landmark
    detector is trained by compare, not compared)."""
    listed = yaml.safe_load((SWEEPS / sweep).read_text())["parameters"]["model.name"]["values"]
    volume_models = {name for name, cls in MODELS.items() if issubclass(cls, VolumeRegressionModule)}
    assert set(listed) == volume_models


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_variant_trains_from_its_config_with_its_presets_settings(name, tiny_synthetic, tmp_path):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [
        f"model.name={name}", f"data.dir={tiny_synthetic}", f"run_dir={tmp_path / 'run'}", "data.num_workers=0",
        "data.batch_size=2", "model.net.features=16", "model.net.hourglass_depth=2", "trainer.fast_dev_run=true"])
    preset = yaml.safe_load(preset_path(name).read_text())
    for key, value in preset["model"].items():  # the preset's settings (quickstart.yaml sets only model.net)
        if key not in ("name", "net"):
            assert getattr(cfg.model, key) == value, key
    metrics = train.train(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0


def batch_of(grid: VoxelGrid, n: int = 2) -> dict:
    landmarks = torch.rand(n, 68, 2) * (grid.width - 1)
    return {"image": torch.rand(n, 3, grid.height, grid.width), "landmarks_2d": landmarks,
            "heatmaps": gaussian_heatmaps(landmarks, grid.height, grid.width, 1.0)}


def test_output_shapes():
    multitask = build_model("vrn_multitask", grid=GRID, net=TINY).eval()
    with torch.no_grad():
        outputs = multitask(batch_of(GRID))
    assert outputs["volume_logits"].shape == (2, *GRID.shape)
    assert outputs["heatmaps"].shape == (2, 68, GRID.height, GRID.width)
    guided = build_model("vrn_guided", grid=GRID, net=TINY).eval()
    assert guided.net.stem.conv[0].in_channels == 3 + 68
    with torch.no_grad():
        assert guided(batch_of(GRID))["volume_logits"].shape == (2, *GRID.shape)
    assert guided.heatmap_sigma == 1.0  # px of the crop, the paper's 1 px at every size
    assert build_model("vrn_guided_sigma2", grid=GRID, net=TINY).heatmap_sigma == 2.0
    assert build_model("vrn_no_alignment", grid=GRID, net=TINY).target_frame == "frontal"


def test_guided_input_is_the_image_and_the_maps_of_the_landmarks_it_is_given():
    guided = build_model("vrn_guided", grid=GRID, net=TINY).eval()
    seen = []
    guided.net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    batch = batch_of(GRID)
    detected = torch.full((2, 68, 2), 40.0) + torch.arange(68.0)[None, :, None] * 0.1

    class FixedDetector(torch.nn.Module):
        def landmarks(self, batch):
            return detected

    with torch.no_grad():
        guided(batch)  # ground-truth guidance: the batch's maps
        DetectedGuidance(guided, FixedDetector())(batch)  # detected guidance: maps of the detector's landmarks
    assert seen[0].shape[1] == 71
    torch.testing.assert_close(seen[0][:, 3:], batch["heatmaps"])
    torch.testing.assert_close(seen[1][:, 3:], gaussian_heatmaps(detected, GRID.height, GRID.width, 1.0))
    torch.testing.assert_close(seen[0][:, :3], seen[1][:, :3])  # the same normalised image


def test_the_no_alignment_target_is_the_voxelised_frontalised_mesh(tiny_synthetic):
    model = build_model("vrn_no_alignment", grid=GRID, net=TINY)
    datamodule = FaceVolumeDataModule(test_path=tiny_synthetic / "test.h5", grid=GRID, batch_size=4, num_workers=0,
                                      target_volume=model.target_frame, persistent_workers=False)
    datamodule.setup("test")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    file = open_dataset(tiny_synthetic / "test.h5")
    for i in range(4):
        sample = file.read(i, ["vertices", "pose", "volumes"])
        expected = voxelise_frontal(sample["vertices"], file.triangles, crop_rotation(sample["pose"]), GRID)
        target = batch["volume"][i].numpy().astype(bool)
        # The file's vertices are float32 copies of the ones voxelised: a rare boundary voxel may differ.
        assert (target == expected).mean() > 0.9999 and (target & expected).sum() > 0.99 * expected.sum()
        aligned = unpack_volume(sample["volumes"], GRID.width)
        assert not np.array_equal(expected, aligned)  # posed faces: the two targets differ
