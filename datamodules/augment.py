"""The authors' joint augmentation of image, volume, landmarks and mesh, in batched torch.

The authors' parameters are in docs/paper.md, "Augmentation"; the crop, grid and pose conventions
in docs/conventions.md.

One transform per sample, written once and used on both paths: in DataLoader workers (a batch of
one) and on the accelerator (a whole batch, in the DataModule's ``on_after_batch_transfer``).
Per-sample parameters (see :func:`sample_params`): ``angle`` (radians), ``scale``, ``tx``, ``ty``
(pixels), ``flip`` (bool), ``colour`` (3 RGB factors).

Geometry, in crop coordinates (pixels; ``c = ((W-1)/2, (H-1)/2)`` the crop centre, ``z_f`` the
crop z of the grid's front slice):

1. flip (when drawn): ``x -> W - 1 - x``;
2. ``(x, y) -> s * Rot(angle) ((x, y) - c) + c + (tx, ty)`` with ``Rot(a) = [[cos a, -sin a], [sin a, cos a]]``
   (y points down, so a positive angle turns the picture clockwise on screen);
3. ``z -> s * (z - z_f) + z_f``, so the augmented volume stays the voxelisation of the augmented mesh;
   scaling about the front keeps the visible face inside the grid (only a hidden back can leave it).

Volumes are resampled nearest-neighbour by inverse mapping (each output voxel reads the source
voxel nearest to its inverse-transformed centre; outside the source -> empty), images bilinearly
(outside -> black), then each RGB channel is scaled by its colour factor and clipped to [0, 1].
A flip re-indexes the landmarks with :data:`lightning_vrn.landmark_scheme.FLIP` (the mirrored face's
right eye is the original's left eye). Mesh vertices keep their order: the mirrored mesh has the
same triangles with the opposite winding, and ``vertices[landmark_vertices[i]]`` of a flipped
mesh is landmark ``FLIP[i]``. The pose is updated to the composed rotation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import FLIP_YZ, MIRROR_X, euler_to_matrix_torch, matrix_to_euler_torch, mirror_pose
from lightning_vrn.landmark_scheme import FLIP

PARAM_KEYS = ("angle", "scale", "tx", "ty", "flip", "colour")
"""Keys of an augmentation parameter dict; per sample ``()`` each, ``colour`` ``(3,)``."""

REFERENCE_CROP = 192
"""Crop size (px) at which :attr:`AugmentSettings.translation_px` is given."""


@dataclass(frozen=True)
class AugmentSettings:
    """Training augmentation settings (the authors' values by default).

    ``on_device``: unpack and augment on the accelerator instead of in DataLoader workers.
    ``rotation_deg``: in-plane rotation drawn from +-this; ``translation_px``: shift drawn from
    +-this at a 192 px crop (scaled by crop_size / 192); ``scale``: (low, high); ``flip_prob``:
    probability of a horizontal flip; ``colour``: (low, high) per-channel factor.
    """

    enabled: bool = True
    on_device: bool = False
    rotation_deg: float = 45.0
    translation_px: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    flip_prob: float = 0.2
    colour: tuple[float, float] = (0.6, 1.4)

    def __post_init__(self):
        for name in ("scale", "colour"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"data.augment.{name} must be a [low, high] pair, got {value!r}")
            low, high = value
            if not 0 < low <= high:
                raise ValueError(f"augment.{name} must be (low, high) with 0 < low <= high, got {getattr(self, name)}")
            object.__setattr__(self, name, (float(low), float(high)))
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"augment.flip_prob must lie in [0, 1], got {self.flip_prob}")
        if self.rotation_deg < 0 or self.translation_px < 0:
            raise ValueError(f"augment.rotation_deg ({self.rotation_deg}) and translation_px "
                             f"({self.translation_px}) must be >= 0")

    @classmethod
    def from_any(cls, value: "AugmentSettings | Mapping[str, Any] | None") -> "AugmentSettings":
        """An :class:`AugmentSettings`, a dict of its fields (unknown keys are an error) or None (disabled)."""
        if value is None:
            return cls(enabled=False)
        if isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"unknown augment keys {sorted(unknown)}; valid keys: {sorted(cls.__dataclass_fields__)}")
        pairs = ("scale", "colour")
        return cls(**{key: tuple(v) if key in pairs and isinstance(v, (list, tuple)) else v for key, v in value.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for hyperparameters)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}


def sample_params(generator: torch.Generator, batch_size: int, crop_size: int,
                  config: AugmentSettings | None = None) -> dict[str, torch.Tensor]:
    """Draw ``batch_size`` samples' parameters (float64 on the CPU; ``flip`` bool; ``colour`` (B, 3)).

    The draws come from ``generator`` in a fixed order, so one seeded generator gives the same
    parameters wherever they are later applied.
    """
    config = config or AugmentSettings()

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    max_angle = math.radians(config.rotation_deg)
    max_shift = config.translation_px * crop_size / REFERENCE_CROP
    return {
        "angle": uniform(-max_angle, max_angle, batch_size),
        "scale": uniform(*config.scale, batch_size),
        "tx": uniform(-max_shift, max_shift, batch_size),
        "ty": uniform(-max_shift, max_shift, batch_size),
        "flip": torch.rand(batch_size, generator=generator, dtype=torch.float64) < config.flip_prob,
        "colour": uniform(*config.colour, batch_size, 3),
    }


def identity_params(batch_size: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Parameters that leave a batch unchanged."""
    zeros = torch.zeros(batch_size, dtype=torch.float64, device=device)
    return {"angle": zeros, "scale": zeros + 1, "tx": zeros, "ty": zeros,
            "flip": torch.zeros(batch_size, dtype=torch.bool, device=device),
            "colour": torch.ones(batch_size, 3, dtype=torch.float64, device=device)}


def transform_points(points: torch.Tensor, params: Mapping[str, torch.Tensor], grid: VoxelGrid) -> torch.Tensor:
    """Forward map of ``(B, N, 2)`` crop ``(x, y)`` or ``(B, N, 3)`` ``(x, y, z)`` points; no re-indexing."""
    p = points.to(torch.float64)
    cx, cy = (grid.width - 1) / 2, (grid.height - 1) / 2
    angle, scale, flip = (params[k].to(p.device)[:, None] for k in ("angle", "scale", "flip"))
    tx, ty = (params[k].to(p.device)[:, None] for k in ("tx", "ty"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = torch.where(flip, (grid.width - 1) - p[..., 0], p[..., 0]) - cx
    v = p[..., 1] - cy
    coords = [scale * (cos * u - sin * v) + cx + tx, scale * (sin * u + cos * v) + cy + ty]
    if p.shape[-1] == 3:
        z_front = grid.z_range[0]
        coords.append(scale * (p[..., 2] - z_front) + z_front)
    return torch.stack(coords, dim=-1).to(points.dtype)


def _reindex_flipped(landmarks: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``(B, 68, C)``: flipped samples' landmark ``i`` becomes their landmark ``FLIP[i]``."""
    identity = torch.arange(landmarks.shape[1], device=landmarks.device)
    order = torch.where(flip[:, None].to(landmarks.device), torch.as_tensor(FLIP, device=landmarks.device), identity)
    return torch.gather(landmarks, 1, order[..., None].expand_as(landmarks))


def _source_xy(params: Mapping[str, torch.Tensor], grid: VoxelGrid, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse map of every output pixel centre: source ``(x, y)``, each ``(B, H, W)`` float64."""
    cx, cy = (grid.width - 1) / 2, (grid.height - 1) / 2
    angle, scale, tx, ty = (params[k].to(device, torch.float64)[:, None, None] for k in ("angle", "scale", "tx", "ty"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = torch.arange(grid.width, dtype=torch.float64, device=device)[None, None, :] - cx - tx   # (B, 1, W)
    v = torch.arange(grid.height, dtype=torch.float64, device=device)[None, :, None] - cy - ty  # (B, H, 1)
    x = (cos * u + sin * v) / scale + cx
    y = (cos * v - sin * u) / scale + cy
    x = torch.where(params["flip"].to(device)[:, None, None], (grid.width - 1) - x, x)
    return x, y


def resample_volume(volume: torch.Tensor, params: Mapping[str, torch.Tensor], grid: VoxelGrid) -> torch.Tensor:
    """Nearest-neighbour inverse mapping of ``(B, D, H, W)`` volumes (any dtype; outside -> 0)."""
    b, d, h, w = volume.shape
    device = volume.device
    x, y = _source_xy(params, grid, device)
    col, row = torch.floor(x + 0.5).long(), torch.floor(y + 0.5).long()
    inside_xy = (col >= 0) & (col < w) & (row >= 0) & (row < h)                     # (B, H, W)
    z = grid.d_to_z(torch.arange(d, dtype=torch.float64, device=device))[None, :]  # (1, D)
    scale = params["scale"].to(device, torch.float64)[:, None]
    z_front = grid.z_range[0]
    depth = torch.floor(grid.z_to_d((z - z_front) / scale + z_front) + 0.5).long()  # (B, D)
    inside_d = (depth >= 0) & (depth < d)
    # Separable lookup: the source (y, x) depends only on the output (y, x), the depth only on d.
    # Out-of-range reads point at an appended empty row / column of a padded copy of the source.
    padded = volume.new_zeros(b, d + 1, h * w + 1)
    padded[:, :d, : h * w] = volume.reshape(b, d, h * w)
    source_depth = torch.where(inside_d, depth, d)
    source_pixel = torch.where(inside_xy, row * w + col, h * w).reshape(b, h * w)
    out = volume.new_empty(b, d, h * w)
    for i in range(b):  # index_select per sample: several times faster than a batched gather on CPU
        torch.index_select(padded[i].index_select(1, source_pixel[i]), 0, source_depth[i], out=out[i])
    return out.reshape(b, d, h, w)


def resample_image(image: torch.Tensor, params: Mapping[str, torch.Tensor], grid: VoxelGrid) -> torch.Tensor:
    """Bilinear inverse mapping of ``(B, C, H, W)`` float images (outside -> 0)."""
    x, y = _source_xy(params, grid, image.device)
    normalised = torch.stack([2 * x / (grid.width - 1) - 1, 2 * y / (grid.height - 1) - 1], dim=-1)
    return F.grid_sample(image, normalised.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def frontal_params(params: Mapping[str, torch.Tensor], pivot_xy: torch.Tensor,
                   grid: VoxelGrid) -> dict[str, torch.Tensor]:
    """Parameters that move a FRONTAL volume (no-alignment ablation) with its augmented mesh.

    The frontal solid of a mesh is posed about the mesh's mean vertex ``c`` (``(B, 2)`` crop x, y
    in ``pivot_xy``), see :func:`lightning_vrn.geometry.voxelise.voxelise_frontal`. The augmented
    mesh's frontal solid is the original one mirrored (if flipped) and scaled about ``c``, moved to
    the augmented ``c``, and NOT rotated: the same scale and flip, angle 0, another translation.
    """
    centre = torch.tensor([(grid.width - 1) / 2, (grid.height - 1) / 2], dtype=torch.float64, device=pivot_xy.device)
    pivot_xy = pivot_xy.to(torch.float64)
    moved = transform_points(pivot_xy[:, None, :], params, grid)[:, 0]
    offset = pivot_xy - centre
    flip, scale = params["flip"].to(pivot_xy.device), params["scale"].to(pivot_xy.device, torch.float64)
    offset = torch.stack([torch.where(flip, -offset[:, 0], offset[:, 0]), offset[:, 1]], dim=-1)
    shift = moved - centre - scale[:, None] * offset
    return {**params, "angle": torch.zeros_like(scale), "tx": shift[:, 0], "ty": shift[:, 1]}


def _in_plane_rotation(params: Mapping[str, torch.Tensor], device) -> torch.Tensor:
    """``(B, 3, 3)`` float64 crop rotations by each sample's ``angle`` about the viewing axis."""
    angle = params["angle"].to(device, torch.float64)
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).reshape(-1, 3, 3)


def _compose_rotation(rotation_crop: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 3, 3)`` frontal->posed crop rotations -> those of the augmented meshes: ``Rz (M R M if flip else R)``."""
    device = rotation_crop.device
    mirror = torch.as_tensor(MIRROR_X, dtype=torch.float64, device=device)
    flip = params["flip"].to(device)[:, None, None]
    rotation = torch.where(flip, mirror @ rotation_crop @ mirror, rotation_crop)
    return _in_plane_rotation(params, device) @ rotation


def augment_pose(pose: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 3)`` (pitch, yaw, roll) radians -> the pose of the augmented faces (same dtype): flipped samples'
    pose mirrored (:func:`~lightning_vrn.geometry.pose.mirror_pose`), then the in-plane rotation composed."""
    pose64 = pose.to(torch.float64)
    pose64 = torch.where(params["flip"].to(pose.device)[:, None], mirror_pose(pose64), pose64)
    flip_yz = torch.as_tensor(FLIP_YZ, dtype=torch.float64, device=pose.device)
    crop = flip_yz @ euler_to_matrix_torch(pose64) @ flip_yz
    return matrix_to_euler_torch(flip_yz @ _in_plane_rotation(params, pose.device) @ crop @ flip_yz).to(pose.dtype)


def augment_batch(batch: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], grid: VoxelGrid,
                  frontal_pivot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Apply each sample's parameters jointly to a batch; returns a new dict.

    Transforms the keys present among ``image`` (B, 3, H, W) float in [0, 1], ``volume``
    (B, D, H, W) any dtype, ``landmarks_2d`` (B, 68, 2), ``landmarks_3d`` (B, 68, 3), ``vertices``
    (B, V, 3), ``pose`` (B, 3); other keys pass through. ``params`` as from :func:`sample_params`
    (moved to the batch's device here). ``frontal_pivot`` (B, 3): when given, ``volume`` holds
    FRONTAL targets whose mesh had this mean vertex, moved by :func:`frontal_params`.
    """
    out = dict(batch)
    if "image" in batch:
        image = batch["image"]
        if tuple(image.shape[-2:]) != (grid.height, grid.width):
            raise ValueError(f"image batch {tuple(image.shape)} does not match grid {grid.describe()}")
        colour = params["colour"].to(image.device, image.dtype)[:, :, None, None]
        out["image"] = (resample_image(image, params, grid) * colour).clamp(0.0, 1.0)
    if "volume" in batch:
        if tuple(batch["volume"].shape[1:]) != grid.shape:
            raise ValueError(f"volume batch {tuple(batch['volume'].shape)} does not match grid {grid.describe()}")
        volume_params = params if frontal_pivot is None else frontal_params(params, frontal_pivot[:, :2], grid)
        out["volume"] = resample_volume(batch["volume"], volume_params, grid)
    for key in ("landmarks_2d", "landmarks_3d"):
        if key in batch:
            out[key] = _reindex_flipped(transform_points(batch[key], params, grid), params["flip"])
    if "vertices" in batch:
        out["vertices"] = transform_points(batch["vertices"], params, grid)
    if "pose" in batch:
        out["pose"] = augment_pose(batch["pose"], params)
    return out


def _as_batch_of_one(params_one: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One sample's parameters (scalars, ``colour`` (3,)) -> a batch of one."""
    params = {key: torch.as_tensor(params_one[key]) for key in PARAM_KEYS}
    if any(params[key].ndim != 0 for key in PARAM_KEYS if key != "colour") or params["colour"].shape != (3,):
        raise ValueError("params_one must be ONE sample's parameters (scalars, colour (3,)), e.g. "
                         "{k: v[i] for k, v in params.items()}; got shapes "
                         f"{ {key: tuple(value.shape) for key, value in params.items()} }")
    return {key: value[None] for key, value in params.items()}


def _points_of_one(points, params_one, grid, reindex: bool):
    as_numpy = isinstance(points, np.ndarray)
    tensor = torch.as_tensor(np.asarray(points, dtype=np.float64) if as_numpy else points)
    params = _as_batch_of_one(params_one)
    moved = transform_points(tensor[None], params, grid)
    if reindex:
        moved = _reindex_flipped(moved, params["flip"])
    return moved[0].numpy() if as_numpy else moved[0]


def augment_mesh(vertices, params_one: Mapping[str, Any], grid: VoxelGrid):
    """One sample's ``(V, 3)`` crop-coordinate vertices (numpy or torch) -> augmented, same type, same order."""
    return _points_of_one(vertices, params_one, grid, reindex=False)


def augment_landmarks(landmarks, params_one: Mapping[str, Any], grid: VoxelGrid):
    """One sample's ``(68, 2)`` or ``(68, 3)`` landmarks (numpy or torch) -> augmented and, if flipped, re-indexed."""
    return _points_of_one(landmarks, params_one, grid, reindex=True)


def augment_rotation(rotation_crop, params_one: Mapping[str, Any]):
    """``(3, 3)`` frontal->posed crop rotation -> that of the augmented mesh (numpy or torch, same type).

    ``Rz(angle) @ (M R M if flipped else R)`` with ``M = diag(-1, 1, 1)``: a proper rotation, so
    the augmented mesh can be voxelised with it.
    """
    as_numpy = isinstance(rotation_crop, np.ndarray)
    tensor = torch.as_tensor(np.asarray(rotation_crop, dtype=np.float64) if as_numpy else rotation_crop)
    composed = _compose_rotation(tensor.to(torch.float64)[None], _as_batch_of_one(params_one))[0]
    return composed.numpy() if as_numpy else composed.to(tensor.dtype)
