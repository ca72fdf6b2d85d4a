"""LightningModules: overfitting a batch, the lr schedule, prediction, checkpoints, clear errors."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.heatmaps import gaussian_heatmaps
from lightning_vrn.metrics.iou import VoxelIoU
from lightning_vrn.models import MODELS, VRN, OptimSettings, build_model
from lightning_vrn.models.volume import LOW_RES_LOGITS
from tests.helpers.training import losses_on_one_batch

GRID = VoxelGrid.centred(16, 16, 16)
TINY_NET = {"features": 32, "stacks": 1, "hourglass_depth": 2}


def ball_batch(grid: VoxelGrid, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random balls in the volume; the image is the ball's silhouette with its depth and radius as colours."""
    gen = torch.Generator().manual_seed(seed)
    depth, height, width = grid.shape
    centre_x = torch.randint(5, width - 5, (n,), generator=gen).float().view(n, 1, 1, 1)
    centre_y = torch.randint(5, height - 5, (n,), generator=gen).float().view(n, 1, 1, 1)
    centre_d = torch.randint(5, depth - 5, (n,), generator=gen).float().view(n, 1, 1, 1)
    radius = (3.0 + 2.0 * torch.rand(n, generator=gen)).view(n, 1, 1, 1)
    d, y, x = torch.meshgrid(torch.arange(depth), torch.arange(height), torch.arange(width), indexing="ij")
    volume = ((x - centre_x) ** 2 + (y - centre_y) ** 2 + (d - centre_d) ** 2 <= radius**2).float()
    silhouette = volume.amax(dim=1)
    image = torch.stack([silhouette, silhouette * centre_d[:, 0] / depth, silhouette * radius[:, 0] / 5.0], dim=1)
    return {
        "image": image,
        "volume": volume,
        "landmarks_2d": torch.zeros(n, 68, 2),
        "landmarks_3d": torch.zeros(n, 68, 3),
        "pose": torch.zeros(n, 3),
        "index": torch.arange(n),
    }


def tiny_model(**optim) -> VRN:
    return build_model("vrn", grid=GRID.to_dict(), net=TINY_NET, optim=optim or None)


def test_overfits_one_batch():
    torch.manual_seed(0)
    batch = ball_batch(GRID)
    model = tiny_model(lr=3e-3)
    assert isinstance(model.configure_optimizers()["optimizer"], torch.optim.RMSprop)
    losses = losses_on_one_batch(model, batch, steps=150)
    assert losses[-1] <= losses[0] / 10, f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}"
    iou = VoxelIoU()
    with torch.no_grad():
        iou.update(model(batch)["volume_logits"], batch["volume"])
    assert iou.compute() > 0.5


def test_loss_is_mean_per_voxel_bce():
    model = tiny_model()
    batch = ball_batch(GRID, n=2)
    logits = torch.randn(2, *GRID.shape)
    p = torch.sigmoid(logits)
    t = batch["volume"]
    expected = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    torch.testing.assert_close(model.losses({"volume_logits": logits}, batch)["loss"], expected)


def test_voxel_iou_against_hand_count():
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0] = 1  # 4 voxels
    logits = torch.full((2, 2, 2, 2), -3.0)
    logits[0, 0, 0] = 2.0  # 2 of them, nothing else
    logits[0, 1, 1, 1] = 0.5  # 1 false positive -> IoU 2 / 5
    logits[1, 0, 0, 0] = 0.0  # probability exactly 0.5 is not occupied: sample 1 both empty -> IoU 1
    metric = VoxelIoU()
    metric.update(logits, target)
    assert metric.compute().item() == pytest.approx((2 / 5 + 1.0) / 2)


def test_lr_drops_after_drop_epoch():
    model = build_model("vrn", grid=GRID.to_dict(), net=TINY_NET, optim={"drop_epoch": 3})
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([1e-4] * 3)
    assert lrs[3:] == pytest.approx([1e-5] * 3)


def test_predict_step_returns_probabilities_on_the_grid():
    model = tiny_model().eval()
    batch = ball_batch(GRID, n=3)
    del batch["volume"]  # prediction needs no target
    with torch.no_grad():
        volume = model.predict_step(batch, 0)
    assert volume.shape == (3, *GRID.shape)
    assert volume.dtype == torch.float32
    assert volume.min() >= 0 and volume.max() <= 1


def test_checkpoint_round_trip_restores_grid_and_net(tmp_path):
    grid = VoxelGrid(16, 16, 16, z_scale=1.5, z_offset=-3.0)
    model = VRN(grid=grid.to_dict(), net=TINY_NET, optim={"lr": 2e-4, "drop_epoch": 7})
    train_loader = DataLoader([ball_batch(grid, n=2, seed=0)], batch_size=None)
    val_loader = DataLoader([ball_batch(grid, n=2, seed=1)], batch_size=None)
    trainer = pl.Trainer(
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)
    assert {"train/loss", "val/loss", "train/iou", "val/iou"} <= set(trainer.callback_metrics)
    (tested,) = trainer.test(model, dataloaders=val_loader, verbose=False)
    assert {"test/loss", "test/iou"} <= set(tested)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = VRN.load_from_checkpoint(path)
    assert loaded.grid == grid
    assert loaded.hparams.net == TINY_NET
    assert loaded.hparams.optim["lr"] == 2e-4 and loaded.hparams.optim["drop_epoch"] == 7
    assert loaded.hparams.optim["lr_after"] == OptimSettings().lr_after  # resolved defaults are saved
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_grid_mismatch_raises_clear_error():
    model = tiny_model()
    batch = ball_batch(VoxelGrid.centred(12, 16, 16), n=2)
    with pytest.raises(ValueError, match=r"batch volume shape \(2, 12, 16, 16\) does not match the model grid 16x16x16"):
        model.training_step(batch, 0)
    with pytest.raises(ValueError, match="batch image shape"):
        model.predict_step({"image": torch.rand(1, 3, 32, 32)}, 0)


def test_unknown_names_and_keys_are_clear_errors():
    with pytest.raises(KeyError, match=r"unknown model 'vnr'; valid models: (\w+, )*vrn\b"):
        build_model("vnr", grid=GRID.to_dict())
    with pytest.raises(ValueError, match=r"unknown config key 'model\.net\.depth'.*did you mean model\.net\.hourglass_depth"):
        build_model("vrn", grid=GRID.to_dict(), net={"depth": 2})
    with pytest.raises(ValueError, match=r"'model\.optim\.lr' .* must be float, got 'fast'"):
        build_model("vrn", grid=GRID.to_dict(), optim={"lr": "fast"})
    assert "vrn" in MODELS and "vnr" not in MODELS


def test_checkpoint_records_what_rebuilds_and_scores_the_model(tmp_path):
    from lightning_vrn.models import load_model

    grid = VoxelGrid(16, 16, 16, z_scale=1.5, z_offset=-3.0)
    model = VRN(grid=grid, net=TINY_NET, target_frame="frontal")
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=DataLoader([ball_batch(grid, n=2)], batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    record = torch.load(path, weights_only=False)["lightning_vrn"]
    assert record["variant"] == "vrn" and record["grid"] == grid.to_dict()
    assert record["target_frame"] == "frontal" and record["heatmap_sigma"] is None
    loaded = load_model(path)  # from this file alone
    assert loaded.target_frame == "frontal" and loaded.grid == grid
    image = ball_batch(grid, n=1)["image"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_step({"image": image}), model.eval().predict_step({"image": image}))


def test_the_registry_is_the_decorator_alone():
    from lightning_vrn.models import register

    assert VRN.variant == "vrn" and MODELS["vrn"] is VRN
    with pytest.raises(ValueError, match="'vrn' is already registered"):

        @register("vrn")
        class Impostor(VRN):
            pass


def test_speed_switches_change_no_prediction():
    """channels_last and the optimiser's foreach are layouts and kernels, not science: same outputs."""
    torch.manual_seed(0)
    plain = tiny_model().eval()
    nhwc = build_model("vrn", grid=GRID.to_dict(), net=TINY_NET, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.net.stem.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(nhwc.state_dict()) == list(plain.state_dict())  # checkpoints are interchangeable
    image = ball_batch(GRID, n=2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(nhwc.predict_step({"image": image}), plain.predict_step({"image": image}),
                                   atol=1e-5, rtol=1e-4)
    for foreach in (True, False):
        optimizer = tiny_model(foreach=foreach).configure_optimizers()["optimizer"]
        assert optimizer.defaults["foreach"] is foreach


@pytest.mark.slow
def test_the_compiled_network_predicts_what_the_eager_one_does():
    torch.manual_seed(0)
    eager = tiny_model().eval()
    compiled = build_model("vrn", grid=GRID.to_dict(), net=TINY_NET, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no '_orig_mod' keys in checkpoints
    image = ball_batch(GRID, n=2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.predict_step({"image": image}), eager.predict_step({"image": image}),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step outside a Trainer
@pytest.mark.parametrize("name", ["vrn", "vrn_multitask", "vrn_guided"])
def test_the_fused_loss_trains_with_the_same_loss_gradients_and_iou(name):
    """model.fused_loss: the training step from the logits before the upsampling gives the plain step's loss,
    gradients and train IoU (in float64, where rounding is far below the tolerance; in float32 batch norm's
    backward amplifies the loss's 1e-7 rounding to ~3e-5 of the largest gradient); validation and prediction
    still get (and score) the full-size logits."""
    torch.manual_seed(0)
    net = {"features": 16, "hourglass_depth": 2}  # every variant's net settings (the multitask net has no stacks)
    plain = build_model(name, grid=GRID.to_dict(), net=net).double()
    fused = build_model(name, grid=GRID.to_dict(), net=net, fused_loss=True).double()
    fused.load_state_dict(plain.state_dict())
    batch = ball_batch(GRID, n=2)
    batch["heatmaps"] = gaussian_heatmaps(torch.rand(2, 68, 2) * (GRID.width - 1), GRID.height, GRID.width, 1.0)
    batch = {key: value.double() if value.is_floating_point() else value for key, value in batch.items()}
    losses = []
    for model in (plain, fused):
        loss = model.train().training_step(batch, 0)["loss"]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    largest = max(p.grad.abs().max().item() for p in plain.parameters())  # (biases before a batch norm get ~0)
    for (key, grad), fused_grad in zip(((k, p.grad) for k, p in plain.named_parameters()),
                                      (p.grad for p in fused.parameters()), strict=True):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-9, atol=1e-11 * largest, msg=key)
    assert fused.train_iou.compute() == plain.train_iou.compute()
    plain.eval(), fused.eval()
    with torch.no_grad():
        validated = fused.validation_step(batch, 0)
        assert validated["volume_logits"].shape == (2, *GRID.shape)
        torch.testing.assert_close(validated["loss"], plain.validation_step(batch, 0)["loss"])
        torch.testing.assert_close(fused.predict_step(batch), plain.predict_step(batch))
        assert fused.stage_outputs(batch, "train")[LOW_RES_LOGITS].shape == (2, GRID.depth, 4, 4)


def test_the_fused_loss_refuses_a_model_without_the_logits_before_the_upsampling():
    class WholeVolumeOnly(VRN):
        def forward(self, batch):
            return {"volume_logits": self.run_network(self.network_inputs(batch))}

    class OwnNetwork(VRN):
        def build_network(self):
            return torch.nn.Conv2d(3, GRID.depth, 1)

    for model, lacking in ((WholeVolumeOnly, "WholeVolumeOnly"), (OwnNetwork, "Conv2d")):
        model(grid=GRID.to_dict(), net=TINY_NET)  # without the switch: fine
        with pytest.raises(ValueError, match=rf"model.fused_loss needs .* {lacking}\.forward take no upsample_volume"):
            model(grid=GRID.to_dict(), net=TINY_NET, fused_loss=True)
