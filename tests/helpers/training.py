"""A few optimiser steps of a model outside any Trainer, and checkpoints that ``load_model`` reads."""

import torch
from torch.utils.data import default_collate

TINY = {"features": 16, "hourglass_depth": 2, "stacks": 1}
"""A network small enough for tests (the ``net`` settings of every model)."""


def losses_on_one_batch(model, batch, steps: int) -> list[float]:
    """The model's total loss at each of ``steps`` steps of its own optimiser on ``batch``."""
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        loss = model.losses(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trained(name, data_dir, steps=10):
    """Model ``name`` (tiny net) after ``steps`` RMSprop steps on all of ``data_dir/train.h5``: enough for surfaces."""
    from datamodules.dataset import FaceVolumeDataset
    from lightning_vrn.dataset_file import open_dataset
    from lightning_vrn.models import build_model

    torch.manual_seed(0)
    model = build_model(name, grid=open_dataset(data_dir / "train.h5").grid, net=TINY, optim={"lr": 1e-3})
    dataset = FaceVolumeDataset(data_dir / "train.h5", heatmap_sigma=model.heatmap_sigma)
    losses_on_one_batch(model, default_collate([dataset[i] for i in range(len(dataset))]), steps)
    return model.eval()


def save(model, path):
    """A checkpoint ``load_model`` reads: the record, the hyper-parameters and the weights."""
    torch.save({"lightning_vrn": model.record(), "hyper_parameters": dict(model.hparams),
                "state_dict": model.state_dict()}, path)
    return path
