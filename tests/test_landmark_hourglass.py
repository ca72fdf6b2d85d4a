"""The landmark side: heatmap encoding and decoding, the AFLW2000-3D landmark NME, the landmark hourglass
(shapes, loss, training, its config end to end) and heatmaps that follow the augmented landmarks on both paths."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from datamodules.datamodule import FaceVolumeDataModule
from experiments import train
from experiments.config import CONFIG_DIR, ConfigError, load_config
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.heatmaps import decode_heatmaps, gaussian_heatmaps
from lightning_vrn.metrics.landmark_nme import LandmarkNME, landmark_nme
from lightning_vrn.models import MODELS, LandmarkHourglass, build_model
from tests.helpers.training import losses_on_one_batch

GRID = VoxelGrid.centred(16, 32, 32)
TINY_NET = {"features": 16, "stacks": 2, "hourglass_depth": 2}
TINY_NET_OVERRIDES = [f"model.net.{key}={value}" for key, value in TINY_NET.items()]
TINY_NET_VOLUME = {"features": 16, "hourglass_depth": 2}


# ----- heatmaps -----


def test_sigma_is_in_the_crops_own_pixels_at_every_size():
    for spec in ("200,192,192", "100,96,96", "16,32,32"):
        assert build_model("vrn_guided", grid=VoxelGrid.parse(spec), net=TINY_NET_VOLUME).heatmap_sigma == 1.0
        assert build_model("landmark_hourglass", grid=VoxelGrid.parse(spec), sigma_px=2.0, net=TINY_NET).heatmap_sigma == 2.0


def test_heatmap_peaks_at_landmarks_with_sigma():
    landmarks = torch.tensor([[[20.3, 30.8], [10.0, 12.0], [40.6, 5.2]]])
    for sigma in (1.0, 2.0):
        maps = gaussian_heatmaps(landmarks, 48, 64, sigma)
        assert maps.shape == (1, 3, 48, 64) and maps.dtype == torch.float32
        flat = maps[0].flatten(1).argmax(1)
        peaks = torch.stack([flat % 64, flat // 64], -1).float()
        assert (peaks - landmarks[0]).abs().max() <= 0.5
        assert maps[0, 1, 12, 10] == 1.0  # on a pixel centre: peak exactly 1
        cols = torch.arange(64.0)
        row = maps[0, 1, 12]
        assert (row * (cols - 10) ** 2).sum() / row.sum() == pytest.approx(sigma**2, rel=1e-3)
        rows = torch.arange(48.0)
        column = maps[0, 1, :, 10]
        assert (column * (rows - 12) ** 2).sum() / column.sum() == pytest.approx(sigma**2, rel=1e-3)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmaps(landmarks, 48, 64, 0.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_decoder_recovers_gaussian_centres_to_a_tenth_of_a_pixel(sigma):
    generator = torch.Generator().manual_seed(int(sigma * 10))
    inside = 8 + 48 * torch.rand(4, 68, 2, generator=generator, dtype=torch.float64)
    # Near every border: within a pixel of the first and last pixel centres, and just outside them.
    near_border = torch.rand(4, 68, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.4
    far_side = torch.rand(4, 68, 2, generator=generator) < 0.5
    near_border = torch.where(far_side, 63 - near_border, near_border)
    for centres in (inside, near_border):
        # Independent encoding: the Gaussian written out per pixel in float64.
        rows, cols = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64),
                                    indexing="ij")
        squared = (cols - centres[..., 0, None, None]) ** 2 + (rows - centres[..., 1, None, None]) ** 2
        maps = torch.exp(-squared / (2 * sigma**2))
        decoded = decode_heatmaps(maps)
        assert decoded.shape == (4, 68, 2) and decoded.dtype == torch.float32
        assert (decoded.double() - centres).abs().max() < 0.1
        # The round trip through the encoder the DataModule uses.
        round_trip = decode_heatmaps(gaussian_heatmaps(centres.float(), 64, 64, sigma))
        assert (round_trip.double() - centres).abs().max() < 0.1


def test_decoder_on_maps_that_a_bilinear_x4_head_can_draw():
    """A network whose heads are upsampled x4 at best draws the least-squares projection of the target onto
    bilinearly upsampled quarter-resolution maps: plateaus about 8 px wide. Its peaks still decode to within
    a pixel of the landmarks (mean 0.55 px at sigma 0.5, 0.41 px at sigma 1)."""
    size = 96
    upsample = F.interpolate(torch.eye(size // 4)[:, None], size=size, mode="linear", align_corners=False)[:, 0].T
    project = upsample @ torch.linalg.pinv(upsample)  # (S, S) projection onto upsampled quarter-resolution maps
    centres = 12 + 72 * torch.rand(2, 68, 2, generator=torch.Generator().manual_seed(0))
    for sigma, mean_error in ((0.5, 0.6), (1.0, 0.45)):
        drawable = project @ gaussian_heatmaps(centres, size, size, sigma) @ project.T
        errors = torch.linalg.vector_norm(decode_heatmaps(drawable) - centres, dim=-1)
        assert errors.mean() < mean_error and errors.max() < 1.0, (sigma, errors.mean(), errors.max())


def test_decoder_falls_back_to_the_argmax_without_a_positive_value():
    maps = torch.full((1, 2, 9, 9), -1.0)
    maps[0, 0, 3, 7] = -0.5  # the argmax of an all-negative map
    assert decode_heatmaps(maps).tolist() == [[[7.0, 3.0], [0.0, 0.0]]]


# ----- landmark NME -----


def test_landmark_nme_of_a_hand_computed_case():
    # Ground truth spans a 40 x 10 px box: sqrt(w * h) = 20 px.
    gt = torch.zeros(2, 68, 2, dtype=torch.float64)
    gt[:, :, 0] = torch.linspace(10, 50, 68)
    gt[:, :, 1] = torch.linspace(20, 30, 68)
    pred = gt.clone()
    pred[0, :34] += torch.tensor([3.0, 4.0])  # half the points 5 px off: mean distance 2.5 px
    pred[1] += torch.tensor([-6.0, 8.0])  # every point 10 px off
    torch.testing.assert_close(landmark_nme(pred, gt), torch.tensor([2.5 / 20, 10 / 20], dtype=torch.float64))
    with pytest.raises(ValueError, match="pred and gt"):
        landmark_nme(pred[:, :, :1], gt)


def test_landmark_nme_metric_buckets_by_yaw_and_counts_each_index_once():
    rng = np.random.default_rng(0)
    gt = rng.uniform(20, 70, (7, 68, 2))
    pred = gt + rng.normal(0, 2, gt.shape)
    yaw_deg = np.array([5.0, -25.0, 45.0, -59.0, 10.0, 20.0, -75.0])
    box = np.sqrt(np.prod(gt.max(axis=1) - gt.min(axis=1), axis=1))
    expected_nme = np.linalg.norm(pred - gt, axis=-1).mean(axis=1) / box  # independent numpy computation
    buckets = [np.abs(yaw_deg) < 30, (np.abs(yaw_deg) >= 30) & (np.abs(yaw_deg) < 60), np.abs(yaw_deg) >= 60]
    bucket_means = [expected_nme[inside].mean() for inside in buckets]

    metric = LandmarkNME()
    as_tensor = lambda values: torch.tensor(values)  # noqa: E731
    metric.update(as_tensor(pred[:4]), as_tensor(gt[:4]), as_tensor(np.radians(yaw_deg[:4])), torch.arange(4))
    # The last batch, padded with repeats of samples 0 and 4 as a distributed sampler does: they count once.
    padded = [4, 5, 6, 0, 4]
    metric.update(as_tensor(pred[padded]), as_tensor(gt[padded]), as_tensor(np.radians(yaw_deg[padded])),
                  torch.tensor(padded))
    values = metric.compute()
    assert set(values) == {"landmark_nme", "landmark_nme_yaw_0_30", "landmark_nme_yaw_30_60", "landmark_nme_yaw_60_90",
                           "landmark_nme_balanced"}
    samples = metric.per_sample()  # each index once, in index order
    assert samples["index"].tolist() == list(range(7))
    np.testing.assert_allclose(samples["landmark_nme"], expected_nme, rtol=1e-12)
    np.testing.assert_allclose(samples["yaw_deg"], yaw_deg, rtol=1e-12)
    assert values["landmark_nme"].item() == pytest.approx(expected_nme.mean(), rel=1e-12)
    for (lo, hi), mean in zip(((0, 30), (30, 60), (60, 90)), bucket_means):
        assert values[f"landmark_nme_yaw_{lo}_{hi}"].item() == pytest.approx(mean, rel=1e-12)
    assert values["landmark_nme_balanced"].item() == pytest.approx(np.mean(bucket_means), rel=1e-12)

    metric.reset()  # only frontal samples: the other buckets are empty and the balanced mean is theirs alone
    metric.update(as_tensor(pred[:2]), as_tensor(gt[:2]), as_tensor(np.radians(yaw_deg[:2])), torch.arange(2))
    values = metric.compute()
    assert math.isnan(values["landmark_nme_yaw_30_60"]) and math.isnan(values["landmark_nme_yaw_60_90"])
    assert values["landmark_nme_balanced"].item() == pytest.approx(expected_nme[:2].mean(), rel=1e-12)


# ----- the landmark hourglass -----


def tiny_model(**settings) -> LandmarkHourglass:
    return build_model("landmark_hourglass", grid=GRID.to_dict(), net=TINY_NET, **settings)


def landmark_batch(model: LandmarkHourglass, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random landmarks drawn as bright dots on a dark image, with the model's target heatmaps."""
    generator = torch.Generator().manual_seed(seed)
    landmarks = 4 + 24 * torch.rand(n, 68, 2, generator=generator)
    dots = gaussian_heatmaps(landmarks, GRID.height, GRID.width, 1.0).amax(dim=1, keepdim=True)
    return {"image": dots.expand(-1, 3, -1, -1).contiguous(), "landmarks_2d": landmarks,
            "heatmaps": gaussian_heatmaps(landmarks, GRID.height, GRID.width, model.heatmap_sigma),
            "pose": torch.zeros(n, 3), "index": torch.arange(n)}


def test_landmark_hourglass_outputs_losses_and_learning():
    torch.manual_seed(0)
    model = tiny_model(sigma_px=1.0, optim={"lr": 1e-3})  # 1 px of this 32 px crop
    assert MODELS["landmark_hourglass"] is LandmarkHourglass and model.target_frame is None
    assert model.heatmap_sigma == 1.0 and model.record()["heatmap_sigma"] == 1.0
    batch = landmark_batch(model)
    outputs = model(batch)
    assert outputs["heatmaps"].shape == (2, 68, 32, 32)
    assert outputs["heatmaps_per_stack"].shape == (2, 2, 68, 32, 32)
    assert torch.equal(outputs["heatmaps"], outputs["heatmaps_per_stack"][:, -1])
    losses = model.losses(outputs, batch)
    per_stack = [F.mse_loss(outputs["heatmaps_per_stack"][:, i], batch["heatmaps"]) for i in range(2)]
    torch.testing.assert_close(losses["loss"], per_stack[0] + per_stack[1])
    torch.testing.assert_close(losses["heatmap_mse"], per_stack[1])

    steps = losses_on_one_batch(model, batch, steps=5)
    assert steps[-1] < 0.5 * steps[0], steps

    with pytest.raises(KeyError, match="heatmap_sigma=model.heatmap_sigma"):
        model.losses(outputs, {key: value for key, value in batch.items() if key != "heatmaps"})


def test_landmarks_are_the_decoded_eval_mode_heatmaps_and_keep_the_mode():
    model = tiny_model()
    batch = {"image": torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    model.train()
    landmarks = model.landmarks(batch)
    assert model.training and landmarks.shape == (3, 68, 2) and not landmarks.requires_grad
    with torch.no_grad():
        expected = decode_heatmaps(model.eval()(batch)["heatmaps"])
    assert torch.equal(landmarks, expected)
    assert torch.equal(model.predict_step(batch), expected)
    with pytest.raises(ValueError, match="batch image shape"):
        model.landmarks({"image": torch.rand(1, 3, 48, 48)})


def test_a_detector_loads_from_its_checkpoint_alone(tmp_path):
    from lightning_vrn.models import load_model

    model = tiny_model(sigma_px=3.0)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([landmark_batch(model)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "detector.ckpt")
    loaded = load_model(tmp_path / "detector.ckpt")
    assert isinstance(loaded, LandmarkHourglass) and loaded.heatmap_sigma == 3.0 and loaded.grid == GRID
    image = {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
    assert torch.equal(loaded.landmarks(image), model.landmarks(image))


def test_a_checkpoint_that_gave_sigma_at_192_loads_with_the_sigma_it_trained_with(tmp_path):
    """Checkpoints saved before sigma was ``sigma_px`` (crop pixels) held ``sigma`` at a 192 px crop: 3.0 at this
    32 px crop was 0.5 px, which their record says; such a checkpoint loads with 0.5 and is refused for resuming."""
    from experiments.train import check_resumable
    from lightning_vrn.models import load_model

    model = tiny_model(sigma_px=0.5)
    path = tmp_path / "old.ckpt"
    old_settings = {key: value for key, value in model.hparams.items() if key not in ("sigma_px", "name")}
    payload = {"state_dict": model.state_dict(), "hyper_parameters": {**old_settings, "sigma": 3.0},
               "lightning_vrn": {**model.record(), "heatmap_sigma": 0.5}}
    torch.save(payload, path)
    loaded = load_model(path)
    assert loaded.heatmap_sigma == 0.5 and loaded.settings.sigma_px == 0.5
    del payload["lightning_vrn"]["heatmap_sigma"]  # no record of it: converted from 192 px
    torch.save(payload, path)
    assert load_model(path).heatmap_sigma == pytest.approx(3.0 * 32 / 192)
    with pytest.raises(ConfigError, match="model.sigma at a 192 px crop"):
        check_resumable(path, model, None, False, tmp_path)


def _landmarks_config(data_dir, run_dir, *overrides):
    return load_config(CONFIG_DIR / "landmarks_quickstart.yaml",
                       [f"data.dir={data_dir}", f"run_dir={run_dir}", "data.num_workers=0", "data.batch_size=2",
                        *TINY_NET_OVERRIDES, *overrides])


def test_landmarks_quickstart_fast_dev_run(tiny_synthetic, tmp_path):
    cfg = _landmarks_config(tiny_synthetic, tmp_path / "run", "trainer.fast_dev_run=true")
    assert cfg.model.name == "landmark_hourglass" and cfg.checkpoint.monitor == "val/landmark_nme"
    assert cfg.nme.every_n_epochs == 0  # the quickstart's 4, but a detector has no volume to score
    assert cfg.model.foreground_weight == 100 and cfg.model.sigma_px == 1.0  # its preset's, under the quickstart
    metrics = train.train(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    for name in ("val/heatmap_mse", "val/landmark_nme", "val/landmark_nme_balanced"):
        assert np.isfinite(metrics[name]) and metrics[name] > 0, name
    assert {"val/landmark_nme_yaw_0_30", "val/landmark_nme_yaw_30_60", "val/landmark_nme_yaw_60_90"} <= set(metrics)


def test_test_stage_logs_the_landmark_nme_of_its_predictions(tiny_synthetic, tmp_path):
    cfg = _landmarks_config(tiny_synthetic, tmp_path / "run")
    model = train.build_model_from_config(cfg)
    datamodule = train.build_datamodule(cfg, model)
    assert model.heatmap_sigma == 1.0  # the detector's preset: 1 px of the crop
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (logged,) = trainer.test(model, datamodule=datamodule, verbose=False)

    predicted, truth, yaw_deg = [], [], []
    model.eval()
    for raw in datamodule.test_dataloader():
        batch = datamodule.on_after_batch_transfer(raw, 0)
        predicted.append(model.landmarks(batch).double().numpy())
        truth.append(batch["landmarks_2d"].double().numpy())
        yaw_deg.append(np.degrees(batch["pose"][:, 1].double().numpy()))
    predicted, truth, yaw_deg = (np.concatenate(values) for values in (predicted, truth, yaw_deg))
    box = np.sqrt(np.prod(truth.max(axis=1) - truth.min(axis=1), axis=1))
    nme = np.linalg.norm(predicted - truth, axis=-1).mean(axis=1) / box
    assert len(nme) == 4
    assert logged["test/landmark_nme"] == pytest.approx(nme.mean(), rel=1e-6)
    magnitude = np.abs(yaw_deg)
    buckets = [magnitude < 30, (magnitude >= 30) & (magnitude < 60), magnitude >= 60]
    bucket_means = [nme[inside].mean() for inside in buckets if inside.any()]  # the balanced mean skips empty ones
    assert logged["test/landmark_nme_balanced"] == pytest.approx(np.mean(bucket_means), rel=1e-6)


# ----- heatmaps follow the augmentation -----


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu_path", "device_path"])
def test_flip_and_rotation_keep_the_heatmaps_on_the_augmented_landmarks(tiny_synthetic, on_device):
    grid = VoxelGrid.parse("100,96,96")
    sigma = 0.5
    augment = {"enabled": True, "on_device": on_device, "flip_prob": 1.0, "rotation_deg": 30.0}
    datamodule = FaceVolumeDataModule(train_path=tiny_synthetic / "train.h5", grid=grid.to_dict(), batch_size=8,
                                      num_workers=0, augment=augment, heatmap_sigma=sigma, pin_memory=False)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    dataset = datamodule.datasets["train"]
    for index in batch["index"].tolist():
        params = dataset.augment_params(index, epoch=0)
        assert bool(params["flip"]) and abs(math.degrees(params["angle"])) > 0
    original = torch.stack([torch.from_numpy(dataset.file.read(i, ["landmarks_2d"])["landmarks_2d"])
                            for i in batch["index"].tolist()])
    landmarks = batch["landmarks_2d"]
    assert (landmarks - original).norm(dim=-1).mean() > 5  # the augmentation moved them
    decoded = decode_heatmaps(batch["heatmaps"])
    inside = ((landmarks >= 0) & (landmarks <= grid.crop_size - 1)).all(dim=-1)
    assert inside.float().mean() > 0.9
    assert (decoded - landmarks)[inside].abs().max() < 0.1


def test_the_foreground_weighted_heatmap_loss_against_a_hand_count():
    from lightning_vrn.heatmaps import heatmap_loss

    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    predicted = torch.zeros(1, 2, 1, 2, 2)  # (B, stacks, L, H, W)
    predicted[0, 1, 0, 1, 1] = 0.5
    # stack 0: error 1 at the peak, weight 1 + 10 -> 11 / 4 pixels; stack 1: that plus 0.25 at weight 1
    torch.testing.assert_close(heatmap_loss(predicted, target, 10.0), torch.tensor([11 / 4, 11.25 / 4]))
    torch.testing.assert_close(heatmap_loss(predicted[:, 0], target), torch.tensor(1 / 4))  # plain MSE
