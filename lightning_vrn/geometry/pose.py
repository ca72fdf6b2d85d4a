"""Head pose and the model -> crop transform (one convention for the whole suite).

Pose is ``(pitch, yaw, roll)`` in radians with the 300W-LP / AFLW2000-3D convention
``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` acting on model coordinates (millimetres; x to the
subject's left as seen in the image, y up, z towards the camera). Crop coordinates have y down
and z away from the camera, so ``crop = F @ (s * R @ model) + t`` with ``F = diag(1, -1, -1)``,
a proper rotation (180 degrees about x): no mirroring. See docs/conventions.md, "Pose".

The ``*_torch`` twins work on batches of tensors (augmentation on the accelerator). They import
torch when called, so that data preparation, which is numpy only, never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

FLIP_YZ = np.diag([1.0, -1.0, -1.0])
MIRROR_X = np.diag([-1.0, 1.0, 1.0])
"""The horizontal mirror ``x -> -x`` (in model and in crop coordinates alike: it commutes with ``FLIP_YZ``)."""


def euler_to_matrix(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """``(3, 3)`` rotation ``Rx(pitch) @ Ry(yaw) @ Rz(roll)`` in the 300W-LP convention (model frame)."""
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cz, sz = np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, sx], [0, -sx, cx]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def matrix_to_euler(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`: ``(3, 3)`` -> ``(pitch, yaw, roll)`` (yaw in [-pi/2, pi/2])."""
    r = np.asarray(rotation, dtype=np.float64)
    yaw = np.arcsin(np.clip(-r[0, 2], -1.0, 1.0))
    roll = np.arctan2(r[0, 1], r[0, 0])
    pitch = np.arctan2(r[1, 2], r[2, 2])
    return np.array([pitch, yaw, roll])


def euler_to_matrix_torch(pose: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` (pitch, yaw, roll) radians -> ``(B, 3, 3)`` rotations: :func:`euler_to_matrix`, batched.

    Same dtype and device as ``pose``.
    """
    import torch

    cx, cy, cz = torch.cos(pose).unbind(-1)
    sx, sy, sz = torch.sin(pose).unbind(-1)
    zero, one = torch.zeros_like(cx), torch.ones_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, sx, zero, -sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, -sy, zero, one, zero, sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, sz, zero, -sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rx @ ry @ rz


def matrix_to_euler_torch(rotation: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` rotations -> ``(B, 3)`` (pitch, yaw, roll) radians: :func:`matrix_to_euler`, batched.

    Inverse of :func:`euler_to_matrix_torch`, yaw in [-pi/2, pi/2].
    """
    import torch

    yaw = torch.asin(torch.clamp(-rotation[:, 0, 2], -1.0, 1.0))
    roll = torch.atan2(rotation[:, 0, 1], rotation[:, 0, 0])
    pitch = torch.atan2(rotation[:, 1, 2], rotation[:, 2, 2])
    return torch.stack([pitch, yaw, roll], dim=-1)


def mirror_pose(pose):
    """The pose of the horizontally mirrored face: ``(pitch, -yaw, -roll)``, for ``(..., 3)`` numpy arrays or
    torch tensors (same type and dtype, a new array).

    Exact: ``euler_to_matrix(*mirror_pose(p)) == MIRROR_X @ euler_to_matrix(*p) @ MIRROR_X`` (the x mirror
    commutes with ``Rx`` and flips the sign of the ``Ry`` and ``Rz`` angles), and the same holds for the crop
    rotation, since ``MIRROR_X`` commutes with ``FLIP_YZ``. The one place the suite mirrors a pose (300W-LP
    ``--flip`` copies, flip augmentation).
    """
    mirrored = pose.clone() if hasattr(pose, "clone") else np.array(pose, copy=True)
    mirrored[..., 1:] = -mirrored[..., 1:]
    return mirrored


def crop_rotation(pose) -> np.ndarray:
    """``(3, 3)`` rotation in crop coordinates taking the frontal face to the posed one: ``F R F``."""
    return FLIP_YZ @ euler_to_matrix(*pose) @ FLIP_YZ


def model_to_crop(vertices_mm: np.ndarray, pose, scale: float, translation) -> np.ndarray:
    """``(N, 3)`` model vertices in mm -> ``(N, 3)`` crop coordinates in pixels.

    ``scale`` is pixels per millimetre; ``translation`` is the crop position ``(x, y, z)`` of the
    model origin.
    """
    rotation = FLIP_YZ @ euler_to_matrix(*pose)
    return scale * np.asarray(vertices_mm, dtype=np.float64) @ rotation.T + np.asarray(translation, dtype=np.float64)
