"""The authors' crop rule: a similarity that places a face in the square crop by its 68 landmarks.

The 68-landmark bounding box is scaled so that ``sqrt(w * h)`` is :data:`LANDMARK_BOX_FRACTION`
of the crop size (90 px in a 192 px crop) and its centre is moved to the crop centre
``((S - 1) / 2, (S - 1) / 2)``. The same transform goes to the mesh: x, y and z are all scaled by
the one factor, and the caller chooses where z lands; every dataset producer puts a mesh's nearest point at
:func:`front_z` (:func:`front_z_shift`). See docs/conventions.md, "Crop".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.landmark_scheme import NUM_LANDMARKS

LANDMARK_BOX_FRACTION = 90.0 / 192.0
"""sqrt(w * h) of the 68-landmark bounding box as a fraction of the crop size (the authors' 90 px at 192)."""
FRONT_MARGIN_FRACTION = 0.03
"""Depth of the mesh's nearest point behind the front of the grid, as a fraction of the grid's depth range."""


@dataclass(frozen=True)
class CropTransform:
    """Similarity from source pixels to crop pixels: ``crop_xy = scale * source_xy + translation``.

    ``scale``: crop pixels per source unit; ``translation``: crop ``(x, y)`` in pixels of the source origin.
    """

    scale: float
    translation: tuple[float, float]

    def apply(self, points: np.ndarray, z_shift: float = 0.0) -> np.ndarray:
        """``(N, 2)`` source ``(x, y)`` or ``(N, 3)`` ``(x, y, z)`` -> crop coordinates (float64, same shape).

        z is scaled by the same factor as x and y, then shifted by ``z_shift`` (crop pixels).
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] not in (2, 3):
            raise ValueError(f"points must have shape (N, 2) or (N, 3), got {points.shape}")
        offset = np.array([*self.translation, z_shift][: points.shape[1]])
        return self.scale * points + offset

    def invert(self, points: np.ndarray, z_shift: float = 0.0) -> np.ndarray:
        """Crop coordinates -> source: the inverse of :meth:`apply` with the same ``z_shift``."""
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] not in (2, 3):
            raise ValueError(f"points must have shape (N, 2) or (N, 3), got {points.shape}")
        offset = np.array([*self.translation, z_shift][: points.shape[1]])
        return (points - offset) / self.scale


def landmark_crop(landmarks_2d: np.ndarray, crop_size: int, scale_jitter: float = 1.0,
                  centre_shift: tuple[float, float] | np.ndarray = (0.0, 0.0)) -> CropTransform:
    """The crop transform of a face from its ``(68, 2)`` landmarks in some image's pixel coordinates.

    The landmark box gets ``sqrt(w * h) = LANDMARK_BOX_FRACTION * crop_size * scale_jitter`` pixels
    and its centre lands on the crop centre plus ``centre_shift`` ``(dx, dy)`` pixels.
    """
    landmarks_2d = np.asarray(landmarks_2d, dtype=np.float64)
    if landmarks_2d.shape != (NUM_LANDMARKS, 2) or not np.isfinite(landmarks_2d).all():
        raise ValueError(f"landmarks must be finite with shape ({NUM_LANDMARKS}, 2), got {landmarks_2d.shape}")
    return box_crop(landmarks_2d.min(axis=0), landmarks_2d.max(axis=0), crop_size, scale_jitter, centre_shift)


def box_crop(box_lo: np.ndarray, box_hi: np.ndarray, crop_size: int, scale_jitter: float = 1.0,
             centre_shift: tuple[float, float] | np.ndarray = (0.0, 0.0)) -> CropTransform:
    """The crop transform that :func:`landmark_crop` makes of a 68-landmark box with corners ``box_lo`` and
    ``box_hi`` ``(x, y)``."""
    box_lo, box_hi = np.asarray(box_lo, dtype=np.float64), np.asarray(box_hi, dtype=np.float64)
    box_size = np.sqrt(np.prod(box_hi - box_lo))
    if not box_size > 0:
        raise ValueError(f"the landmarks' bounding box is flat ({box_hi - box_lo} px): no crop scale can be found")
    scale = LANDMARK_BOX_FRACTION * crop_size * scale_jitter / box_size
    centre = (crop_size - 1) / 2.0 + np.asarray(centre_shift, dtype=np.float64)
    translation = centre - scale * 0.5 * (box_lo + box_hi)
    return CropTransform(float(scale), (float(translation[0]), float(translation[1])))


def front_z(grid: VoxelGrid) -> float:
    """Crop z (px) of a sample mesh's nearest point: :data:`FRONT_MARGIN_FRACTION` of the grid's depth range
    behind its front."""
    z_front, z_back = grid.z_range
    return z_front + FRONT_MARGIN_FRACTION * (z_back - z_front)


def front_z_shift(grid: VoxelGrid, z_values: np.ndarray, scale: float = 1.0) -> float:
    """Crop z shift (px) that puts the nearest of ``z_values`` (source units, scaled by ``scale`` px per unit) at
    :func:`front_z`: ``crop_z = scale * z + shift``. Every producer places its meshes' depth with it."""
    return front_z(grid) - scale * np.asarray(z_values).min()


def leaves_grid(vertices: np.ndarray, grid: VoxelGrid) -> bool:
    """True if any of the ``(V, 3)`` crop-coordinate vertices lies outside the grid's volume."""
    (z_lo, z_hi), last = grid.z_range, grid.crop_size - 1
    return bool((vertices[:, :2].min() < 0) or (vertices[:, :2].max() > last)
                or vertices[:, 2].min() < z_lo or vertices[:, 2].max() > z_hi)


def resample_crop(image: np.ndarray, crop: CropTransform, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8: ``image`` resampled through ``crop`` (antialiased bilinear; black outside).

    Crop pixel ``i`` (centre at ``i``) shows image point ``(i - t) / s`` (centres at integers), i.e.
    PIL's ``box`` (pixel edges at integers) starting at ``(-t - 0.5) / s + 0.5``.
    """
    step = 1.0 / crop.scale
    start = (-np.asarray(crop.translation) - 0.5) * step + 0.5
    end = start + size * step
    margin = int(np.ceil(step)) + 2  # the filter's support beyond the box
    height, width = image.shape[:2]
    pad_before = np.maximum(0, np.ceil(-start).astype(int) + margin)
    pad_after = np.maximum(0, np.ceil(end - (width, height)).astype(int) + margin)
    padded = np.pad(image, ((pad_before[1], pad_after[1]), (pad_before[0], pad_after[0]), (0, 0)))
    box = (*(start + pad_before), *(end + pad_before))
    resized = Image.fromarray(padded).resize((size, size), Image.Resampling.BILINEAR, box=tuple(float(v) for v in box))
    return np.asarray(resized)
