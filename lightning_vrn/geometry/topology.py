"""Vertex-id arrays of a fixed mesh topology (triangles, the NME face region, landmark vertices)."""

from __future__ import annotations

import numpy as np


def as_vertex_ids(values, num_vertices: int, name: str, unique: bool = True) -> np.ndarray:
    """``values`` (any shape) as int64 ids of a mesh with ``num_vertices`` vertices.

    Raises ValueError, naming ``name``, for a boolean mask (a mask over the vertices is not a list
    of ids), non-integer values, ids outside ``[0, num_vertices)`` and, when ``unique``, repeated ids.
    """
    values = np.asarray(values)
    if values.dtype == bool:
        raise ValueError(f"{name} must be vertex ids, got a boolean mask of {values.size} values; "
                         f"pass the ids of its True entries, np.flatnonzero(mask)")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integer vertex ids, got dtype {values.dtype}")
    ids = values.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_vertices):
        raise ValueError(f"{name} has vertex ids outside [0, {num_vertices}): min {ids.min()}, max {ids.max()}")
    if unique:
        distinct, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            repeated = distinct[counts > 1]
            raise ValueError(f"{name} repeats {len(repeated)} vertex ids (first: {repeated[:5].tolist()}); "
                             f"each vertex may appear once")
    return ids
