"""Vectorised z-buffer rasteriser shared by the renderer and the voxeliser.

Pixel ``(row, col)`` has its centre at crop coordinates ``(x=col, y=row)``; smaller z is
nearer the camera, so each pixel keeps the triangle with the smallest interpolated z at its
centre. Exact under self-occlusion: every covered pixel centre of every triangle is tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Raster:
    """Per-pixel result of :func:`rasterise` for an ``H x W`` image.

    ``depth`` (H, W) float64 crop z of the front-most surface, ``inf`` where empty;
    ``triangle`` (H, W) int64 index of that triangle, -1 where empty;
    ``barycentric`` (H, W, 3) float64 weights of its three vertices (0 where empty).
    """

    depth: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, True where a surface covers the pixel centre."""
        return self.triangle >= 0

    def interpolate(self, vertex_values: np.ndarray, triangles: np.ndarray) -> np.ndarray:
        """Interpolate ``(V, C)`` per-vertex values to ``(H, W, C)``; zero where empty."""
        h, w = self.triangle.shape
        out = np.zeros((h, w, vertex_values.shape[1]), dtype=np.float64)
        covered = self.mask
        corner_values = vertex_values[triangles[self.triangle[covered]]]  # (P, 3, C)
        out[covered] = np.einsum("pk,pkc->pc", self.barycentric[covered], corner_values)
        return out


def rasterise(vertices: np.ndarray, triangles: np.ndarray, height: int, width: int) -> Raster:
    """Z-buffer ``(V, 3)`` crop-coordinate vertices with ``(T, 3)`` triangles into ``height x width``."""
    vertices = np.asarray(vertices, dtype=np.float64)
    corners = vertices[np.asarray(triangles, dtype=np.int64)]  # (T, 3, 3)
    x, y = corners[..., 0], corners[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    # Element-wise min/max of the three corners: faster than reducing over the length-3 axis
    # (benchmarks/results_settings.md).
    x_min, x_max = np.minimum(np.minimum(x[:, 0], x[:, 1]), x[:, 2]), np.maximum(np.maximum(x[:, 0], x[:, 1]), x[:, 2])
    y_min, y_max = np.minimum(np.minimum(y[:, 0], y[:, 1]), y[:, 2]), np.maximum(np.maximum(y[:, 0], y[:, 1]), y[:, 2])
    col0 = np.maximum(np.ceil(x_min), 0).astype(np.int64)
    col1 = np.minimum(np.floor(x_max), width - 1).astype(np.int64)
    row0 = np.maximum(np.ceil(y_min), 0).astype(np.int64)
    row1 = np.minimum(np.floor(y_max), height - 1).astype(np.int64)
    ncols, nrows = col1 - col0 + 1, row1 - row0 + 1
    keep = (ncols > 0) & (nrows > 0) & (np.abs(area) > 1e-12)
    tri_ids = np.flatnonzero(keep)
    counts = (ncols * nrows)[tri_ids]

    # One candidate (triangle, pixel) pair for every pixel centre in every triangle's bounding box.
    cand_tri = np.repeat(tri_ids, counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cand_col = col0[cand_tri] + offset % ncols[cand_tri]
    cand_row = row0[cand_tri] + offset // ncols[cand_tri]

    # Barycentric weights from edge functions, normalised by the signed area (either winding).
    tx, ty = x[cand_tri], y[cand_tri]
    px, py = cand_col.astype(np.float64), cand_row.astype(np.float64)
    inv_area = 1.0 / area[cand_tri]
    w0 = ((tx[:, 1] - px) * (ty[:, 2] - py) - (tx[:, 2] - px) * (ty[:, 1] - py)) * inv_area
    w1 = ((tx[:, 2] - px) * (ty[:, 0] - py) - (tx[:, 0] - px) * (ty[:, 2] - py)) * inv_area
    w2 = 1.0 - w0 - w1
    inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
    cand_tri, w = cand_tri[inside], np.stack([w0[inside], w1[inside], w2[inside]], axis=1)
    pixel = cand_row[inside] * width + cand_col[inside]
    z = np.einsum("pk,pk->p", w, corners[cand_tri, :, 2])

    # Front-most candidate per pixel: sort by (pixel, z) and keep each pixel's first entry.
    order = np.lexsort((z, pixel))
    pixel_sorted = pixel[order]
    first = order[np.r_[True, pixel_sorted[1:] != pixel_sorted[:-1]]] if len(order) else order

    depth = np.full(height * width, np.inf)
    triangle = np.full(height * width, -1, dtype=np.int64)
    barycentric = np.zeros((height * width, 3))
    depth[pixel[first]] = z[first]
    triangle[pixel[first]] = cand_tri[first]
    barycentric[pixel[first]] = w[first]
    return Raster(depth.reshape(height, width), triangle.reshape(height, width), barycentric.reshape(height, width, 3))
