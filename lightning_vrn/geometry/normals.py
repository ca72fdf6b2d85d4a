"""Per-vertex normals of a triangle mesh (shading, rendering and point-to-plane ICP all use these)."""

from __future__ import annotations

import numpy as np

from lightning_vrn.geometry.mesh_check import check_mesh


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``(V, 3)`` float64 unit vertex normals: area-weighted sums of the adjacent triangles' normals.

    ``vertices`` ``(V, 3)`` in any length unit, ``triangles`` ``(T, 3)`` integer vertex ids. A triangle's
    normal is ``(v1 - v0) x (v2 - v0)`` (length twice its area), so counter-clockwise triangles, seen
    from where the normal points, give normals toward the viewer. A vertex that no triangle uses, or
    whose triangles' normals cancel, gets the zero vector.
    """
    vertices, triangles = check_mesh(vertices, triangles, "vertex_normals", finite=False)
    corners = vertices[triangles]                                                          # (T, 3, 3)
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # length = 2 * area
    corner_ids = triangles.ravel()                                                         # (3T,)
    sums = np.stack(
        [np.bincount(corner_ids, np.repeat(face_normals[:, k], 3), minlength=len(vertices)) for k in range(3)], axis=1
    )
    length = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, length, out=np.zeros(sums.shape), where=length > 0)  # float64 even with no triangles
