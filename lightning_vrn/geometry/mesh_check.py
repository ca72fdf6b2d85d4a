"""Validation of triangle-mesh arrays, shared by the mesh writers, voxeliser, normals and renderer."""

from __future__ import annotations

import numpy as np


def check_mesh(vertices, triangles, name: str = "mesh", *, min_vertices: int = 0, finite: bool = True,
               fix: str = "repair or drop them") -> tuple[np.ndarray, np.ndarray]:
    """``vertices`` (V, 3) and ``triangles`` (T, 3) as float64 and int64 after checking them; ValueError otherwise.

    Checks: vertices of shape (V, 3) with V >= ``min_vertices``, finite (when ``finite``; ``fix`` says what
    to do about a non-finite one), triangles an integer (T, 3) array of 0-based ids below V. Every message
    starts with ``name`` (the file or the function being called).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) < min_vertices:
        at_least = f" with V >= {min_vertices}" if min_vertices else ""
        raise ValueError(f"{name}: vertices must have shape (V, 3){at_least}, got {vertices.shape}")
    if finite and not np.isfinite(vertices).all():
        bad = np.flatnonzero(~np.isfinite(vertices).all(axis=1))
        raise ValueError(f"{name}: mesh has {len(bad)} non-finite vertices (NaN or inf), first at index {bad[0]}; "
                         f"{fix}")
    triangles = np.asarray(triangles)
    if triangles.ndim != 2 or triangles.shape[1] != 3 or not np.issubdtype(triangles.dtype, np.integer):
        raise ValueError(f"{name}: triangles must be an integer array of shape (T, 3), "
                         f"got {triangles.dtype} {triangles.shape}")
    triangles = triangles.astype(np.int64, copy=False)
    check_triangle_ids(triangles, len(vertices), f"{name}: triangles")
    return vertices, triangles


def check_triangle_ids(triangles: np.ndarray, num_vertices: int, where: str) -> None:
    """ValueError naming ``where`` and the first ``(T, 3)`` row with an id outside ``[0, num_vertices)``."""
    if len(triangles) and (triangles.min() < 0 or triangles.max() >= num_vertices):
        bad = np.flatnonzero(((triangles < 0) | (triangles >= num_vertices)).any(axis=1))[0]
        raise ValueError(f"{where} {bad} refers to vertex {triangles[bad].tolist()}, but there are {num_vertices} "
                         f"vertices (triangle indices must lie in [0, {num_vertices - 1}], 0-based)")
