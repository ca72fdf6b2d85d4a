"""LightningModules for the VRN variants and a registry to build them by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_vrn.models.base import VolumeRegressionModule, VoxelIoU
from lightning_vrn.models.vrn import VRN

MODELS: dict[str, type[VolumeRegressionModule]] = {"vrn": VRN}


def build_model(name: str, **kwargs: Any) -> VolumeRegressionModule:
    """``MODELS[name](**kwargs)`` (kwargs: ``grid``, ``net``, ``optim``); unknown names list the valid ones."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def load_model(checkpoint: str | Path, map_location: str = "cpu") -> VolumeRegressionModule:
    """The LightningModule saved in ``checkpoint`` (its variant is recorded in the file), in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: train a model first (python -m experiments.train)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
        variant = payload["variant"]
    except Exception as error:
        raise ValueError(f"{path} is not a lightning-vrn checkpoint ({type(error).__name__}: {error})") from None
    if variant not in MODELS:
        raise ValueError(f"{path} holds variant {variant!r}, unknown to this version; known: {sorted(MODELS)}")
    model = MODELS[variant](**payload["hyper_parameters"])  # grid, net, optim: the resolved settings
    model.load_state_dict(payload["state_dict"])
    return model.eval()


__all__ = ["MODELS", "VRN", "VolumeRegressionModule", "VoxelIoU", "build_model", "load_model"]
