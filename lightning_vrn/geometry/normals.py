"""Per-vertex normals of a triangle mesh (shading, rendering and point-to-plane ICP all use these)."""

from __future__ import annotations

import numpy as np


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(V, 3)`` float64 unit vertex normals: area-weighted sums of the adjacent triangles' normals.

    ``vertices`` ``(V, 3)`` in any length unit, ``triangles`` ``(T, 3)`` integer vertex ids. A triangle's
    normal is ``(v1 - v0) x (v2 - v0)`` (length twice its area), so counter-clockwise triangles, seen
    from where the normal points, give normals toward the viewer. A vertex that no triangle uses, or
    whose triangles' normals cancel, gets the zero vector.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    triangles = np.asarray(triangles)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
    if triangles.ndim != 2 or triangles.shape[1] != 3 or not np.issubdtype(triangles.dtype, np.integer):
        raise ValueError(f"triangles must be an integer array of shape (T, 3), got {triangles.dtype} {triangles.shape}")
    corners = vertices[triangles]                                                          # (T, 3, 3)
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # length = 2 * area
    corner_ids = triangles.ravel()                                                         # (3T,)
    sums = np.stack(
        [np.bincount(corner_ids, np.repeat(face_normals[:, k], 3), minlength=len(vertices)) for k in range(3)], axis=1
    )
    length = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, length, out=np.zeros(sums.shape), where=length > 0)  # float64 even with no triangles
