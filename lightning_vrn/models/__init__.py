"""LightningModules for the VRN variants, the registry that builds them by name, and checkpoint loading.

Every module of this package is imported here, so a new variant is one new module (its class registered with
``@register``) and its preset, ``experiments/configs/variants/NAME.yaml`` (docs/variants.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from lightning_vrn.geometry.grid import PAPER_GRID, VoxelGrid
from lightning_vrn.models.base import MODELS, ModelSettings, OptimSettings, VRNModule, register
from lightning_vrn.models.guided import VRNGuided
from lightning_vrn.models.landmark_hourglass import LandmarkHourglass
from lightning_vrn.models.multitask import VRNMultitask
from lightning_vrn.models.volume import NetSettings, VolumeRegressionModule, VolumeSettings, occupancy
from lightning_vrn.models.vrn import VRN
from lightning_vrn.safe_load import load_checkpoint


for _module in pkgutil.iter_modules(__path__):  # registers every variant, the ones not named above too
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_MODEL = "vrn"
"""The model a config trains when it names none."""


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
    model = MODELS[variant](**current_hyper_parameters(payload))  # grid and the resolved settings
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def sigma_at_192(payload: dict) -> bool:
    """Whether a checkpoint was saved when the heatmap sigma was ``model.sigma``, pixels at a 192 px crop (now
    ``model.sigma_px``, pixels of the model's own crop)."""
    return "sigma" in (payload.get("hyper_parameters") or {})


def current_hyper_parameters(payload: dict) -> dict:
    """A checkpoint's hyper-parameters in this version's terms: an older checkpoint's ``sigma`` becomes the
    ``sigma_px`` its record says the model used (:func:`sigma_at_192`)."""
    hparams = dict(payload["hyper_parameters"])
    if sigma_at_192(payload):
        record = payload.get("lightning_vrn") or {}
        crop = VoxelGrid.from_dict(hparams["grid"]).crop_size
        sigma = hparams.pop("sigma")
        hparams["sigma_px"] = record.get("heatmap_sigma") or sigma * crop / PAPER_GRID.crop_size
    return hparams


__all__ = [
    "DEFAULT_MODEL",
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
