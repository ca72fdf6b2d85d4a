"""Stub LightningModules for tests of the scoring around a model: they predict what the batch already holds."""

import pytorch_lightning as pl
import torch


class TargetVolumeModel(pl.LightningModule):
    """Predicts the batch's own target volume, declared to be in ``target_frame``."""

    def __init__(self, grid, target_frame):
        super().__init__()
        self.grid, self.target_frame = grid, target_frame

    def test_step(self, batch, batch_idx):
        return {"volume": batch["volume"]}


class OracleVolumeModel(torch.nn.Module):
    """A volume model that predicts one known ``(D, H, W)`` occupancy ``volume`` for every crop (as logits of
    +-10), and keeps the crops it was given in ``seen_images``."""

    target_frame = "aligned"

    def __init__(self, grid, volume):
        super().__init__()
        self.grid, self.volume, self.seen_images = grid, torch.as_tensor(volume, dtype=torch.float32), []

    def forward(self, batch):
        self.seen_images.append(batch["image"])
        return {"volume_logits": self.logits()[None].expand(len(batch["image"]), *self.volume.shape)}

    def logits(self):
        return self.volume * 20.0 - 10.0

    def occupancy(self):
        """The ``(D, H, W)`` soft occupancy the pipeline takes from these logits."""
        return torch.sigmoid(self.logits())
