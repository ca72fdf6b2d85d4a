"""Stub LightningModules for tests of the scoring around a model: they predict what the batch already holds."""

import pytorch_lightning as pl


class TargetVolumeModel(pl.LightningModule):
    """Predicts the batch's own target volume, declared to be in ``target_frame``."""

    def __init__(self, grid, target_frame):
        super().__init__()
        self.grid, self.target_frame = grid, target_frame

    def test_step(self, batch, batch_idx):
        return {"volume": batch["volume"]}
