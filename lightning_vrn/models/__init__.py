"""LightningModules for the VRN variants, the registry that builds them by name, and checkpoint loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_vrn.models.base import MODELS, ModelSettings, OptimSettings, VRNModule, register
from lightning_vrn.models.guided import VRNGuided
from lightning_vrn.models.landmark_hourglass import LandmarkHourglass
from lightning_vrn.models.multitask import VRNMultitask
from lightning_vrn.models.volume import NetSettings, VolumeRegressionModule, VolumeSettings, occupancy
from lightning_vrn.models.vrn import VRN
from lightning_vrn.safe_load import load_checkpoint


def model_class(name: str) -> type[VRNModule]:
    """The registered model class called ``name``; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, **kwargs: Any) -> VRNModule:
    """``MODELS[name](**kwargs)`` (kwargs: ``grid`` and the variant's settings, e.g. ``net``, ``optim``)."""
    return model_class(name)(**kwargs)


def load_model(checkpoint: str | Path, map_location: str = "cpu", trust: bool = False) -> VRNModule:
    """The model saved in ``checkpoint``, rebuilt from that file alone (its record names the variant), in eval mode.

    The file is loaded with PyTorch's safe loader (:func:`lightning_vrn.safe_load.load_checkpoint`):
    one that holds other Python objects is refused unless ``trust``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: train a model first (python -m experiments.train)")
    payload = load_checkpoint(path, trust=trust, map_location=map_location)
    record = payload.get("lightning_vrn") or {"variant": payload.get("variant")}  # before the record: top level
    if not isinstance(record, dict) or record.get("variant") is None or "hyper_parameters" not in payload:
        raise ValueError(f"{path} is not a lightning-vrn checkpoint (it has no 'lightning_vrn' record; keys: "
                         f"{sorted(payload)[:8]})")
    variant = record["variant"]
    if variant not in MODELS:
        raise ValueError(f"{path} holds variant {variant!r}, unknown to this version; known: {sorted(MODELS)}")
    model = MODELS[variant](**payload["hyper_parameters"])  # grid and the resolved settings
    model.load_state_dict(payload["state_dict"])
    return model.eval()


__all__ = [
    "LandmarkHourglass",
    "MODELS",
    "ModelSettings",
    "NetSettings",
    "OptimSettings",
    "VRN",
    "VRNGuided",
    "VRNModule",
    "VRNMultitask",
    "VolumeRegressionModule",
    "VolumeSettings",
    "build_model",
    "load_model",
    "model_class",
    "occupancy",
    "register",
]
