"""The one voxel grid: every conversion between crop coordinates and voxel indices goes through here.

Crop coordinates (docs/conventions.md, "Crop" and "Voxel grid"): x to the right, y down, z away from the camera, all in
pixels of the square crop; pixel centres at integers. A volume is indexed ``[d, y, x]`` with
shape ``(depth, height, width)``; voxel ``[d, y, x]`` has its centre at crop coordinates
``(x, y, d / z_scale + z_offset)``. The crop is ``height x width`` pixels, so a reduced CPU grid
is simply a smaller crop with the same proportions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

PAPER_SHAPE = (200, 192, 192)


@dataclass(frozen=True)
class VoxelGrid:
    """Occupancy grid geometry: shape ``(depth, height, width)``, depth scale and offset.

    ``z_scale`` is voxels per pixel along depth (2.0 in the paper: 200 voxels span 100 px).
    ``z_offset`` is the crop z (pixels) of the centre of voxel ``d = 0``. Every field is required
    (no silent defaults); :data:`PAPER_GRID` and :meth:`centred` give the usual grids.
    """

    depth: int
    height: int
    width: int
    z_scale: float
    z_offset: float

    def __post_init__(self):
        if min(self.depth, self.height, self.width) <= 0:
            raise ValueError(f"grid shape must be positive, got {self.shape}")
        if self.width % 8:
            raise ValueError(f"grid width {self.width} must be a multiple of 8 (volumes are bit-packed along x)")
        if self.z_scale <= 0:
            raise ValueError(f"grid z_scale must be positive, got {self.z_scale}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return (self.depth, self.height, self.width)

    @property
    def crop_size(self) -> int:
        """Side of the square image crop in pixels (equals height and width)."""
        if self.height != self.width:
            raise ValueError(f"crop must be square, grid has H={self.height}, W={self.width}")
        return self.height

    @property
    def z_range(self) -> tuple[float, float]:
        """Crop z (px) of the centres of the first and last depth slices."""
        return self.d_to_z(0), self.d_to_z(self.depth - 1)

    @property
    def z_centre(self) -> float:
        """Crop z (px) of the middle of the depth range."""
        lo, hi = self.z_range
        return 0.5 * (lo + hi)

    def d_to_z(self, d):
        """Depth index (float allowed) -> crop z in pixels."""
        return d / self.z_scale + self.z_offset

    def z_to_d(self, z):
        """Crop z in pixels -> continuous depth index."""
        return (z - self.z_offset) * self.z_scale

    def voxel_to_crop(self, dyx: np.ndarray) -> np.ndarray:
        """``(..., 3)`` voxel indices ``(d, y, x)`` (float allowed) -> ``(..., 3)`` crop ``(x, y, z)``."""
        dyx = np.asarray(dyx, dtype=np.float64)
        return np.stack([dyx[..., 2], dyx[..., 1], self.d_to_z(dyx[..., 0])], axis=-1)

    def crop_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """``(..., 3)`` crop ``(x, y, z)`` -> ``(..., 3)`` continuous voxel indices ``(d, y, x)``."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return np.stack([self.z_to_d(xyz[..., 2]), xyz[..., 1], xyz[..., 0]], axis=-1)

    def to_attrs(self) -> dict[str, Any]:
        """HDF5 file attributes (names fixed by docs/conventions.md, "Dataset file")."""
        return {
            "grid_shape": np.asarray(self.shape, dtype=np.int64),
            "grid_z_scale": float(self.z_scale),
            "grid_z_offset": float(self.z_offset),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "VoxelGrid":
        """Inverse of :meth:`to_attrs`."""
        d, h, w = (int(v) for v in attrs["grid_shape"])
        return cls(d, h, w, float(attrs["grid_z_scale"]), float(attrs["grid_z_offset"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for configs and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VoxelGrid":
        """Inverse of :meth:`to_dict`; unknown or missing keys are an error (no silent defaults)."""
        fields = set(cls.__dataclass_fields__)
        if set(values) != fields:
            raise KeyError(f"grid needs exactly the keys {sorted(fields)}; got {sorted(values)}")
        return cls(**{k: values[k] for k in fields})

    @classmethod
    def parse(cls, text: str, z_scale: float = 2.0) -> "VoxelGrid":
        """``"200,192,192"`` -> grid with that ``(D, H, W)``, depth centred on the crop's middle."""
        try:
            d, h, w = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"grid must be 'D,H,W' like '200,192,192', got {text!r}") from None
        return cls.centred(d, h, w, z_scale)

    @classmethod
    def centred(cls, depth: int, height: int, width: int, z_scale: float = 2.0) -> "VoxelGrid":
        """Grid whose depth range is centred on z = 0, the depth of the face's centre in crops."""
        return cls(depth, height, width, z_scale, -(depth - 1) / (2.0 * z_scale))

    @property
    def spec(self) -> str:
        """``"D,H,W"``, what :meth:`parse` reads (a config's ``grid``)."""
        return f"{self.depth},{self.height},{self.width}"

    def describe(self) -> str:
        return f"{self.depth}x{self.height}x{self.width} (z_scale {self.z_scale:g}, z_offset {self.z_offset:g} px)"


PAPER_GRID = VoxelGrid.centred(*PAPER_SHAPE)
