"""The authors' voxelisation: a posed face mesh -> a solid occupancy volume aligned with the image.

The recipe (docs/paper.md, "Voxelisation"): rotate the mesh to frontal with its pose, take the
depth map of the front-most surface, fill from that surface backwards along the frontal view axis
to a fixed distance, and rotate the solid back with the same pose so that it lies over the face in
the image.

Here, in crop coordinates (pixels; x right, y down, z away from the camera), with ``R`` the
rotation taking the frontal face to the posed one and the pivot ``c`` the mean vertex:

- frontal mesh ``V_f = R^T (V - c) + c``; ``z_front(x, y)`` is its z-buffer (front-most surface);
- frontal solid ``S = {q : z_front(q.x, q.y) <= q.z <= z_back}`` with ``z_back = max z of V_f``.
  The "fixed distance" is thus measured to the back of the mesh itself: it scales with the mesh
  (an augmented, scaled mesh gives the scaled solid) and needs no constant in pixels;
- holes: a mesh may be open inside its frontal outline (the Surrey model's mouth, whose edge runs
  along the inner lips; a scan's nostrils or eyes). The z-buffer sees nothing there, so uncovered
  samples enclosed by covered ones (``binary_fill_holes``, 4-connected) get the membrane fill of
  the hole's rim: each is the mean of its four neighbours (one sparse solve), so the closing surface
  spans the rim and lies within the rim's depth range. Uncovered samples connected to the outside
  of the outline (a notch) stay empty, as do holes cut open by the edge of the sampled region (the
  grid's edge when the mesh is clipped). A mesh with no hole pays only the hole test;
- aligned volume: voxel centre ``p`` is occupied iff ``q = R^T (p - c) + c`` lies in ``S``. This is
  exact under self-occlusion: a yawed nose in front of a cheek leaves air between them, so a
  column of the aligned volume can hold several occupied runs;
- frontal volume (the no-alignment ablation): ``p`` is occupied iff ``p`` lies in ``S``.

``z_front`` is sampled once per pixel of the frontal view; each sample keeps the plane of its
front-most triangle (a hole sample: the plane of the fill's central differences) and a query point
uses the plane of its nearest sample. That is exact where both lie on one triangle and first-order
accurate elsewhere (more accurate, and faster, than plain depths sampled twice per pixel); the
outline of ``S`` is the outline of the covered (or filled) samples, within about half a pixel of
the mesh's. For the identity rotation every voxel column falls on a sample.

Speed: triangles that cannot cover a sample are dropped before rasterising; only voxels inside the
bounding box of the rotated solid are evaluated, one depth slice at a time. ``q`` is affine in the
voxel index, so a slice's sample indices are a fixed map (one per sub-sample phase of the slice's
offset) plus a flat offset into the table.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.mesh_check import check_mesh
from lightning_vrn.geometry.raster import rasterise

PHASES = 4
"""Sub-sample phases per axis: a query point's sample is at most ``0.5 + 0.5 / PHASES`` px away per axis."""

MAX_SLOPE = 8.0
"""Largest |dz/dxy| extrapolated from a sample (about 83 degrees): bounds the damage of sliver triangles."""


def voxelise(vertices: np.ndarray, triangles: np.ndarray, rotation: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """Solid occupancy of a posed face mesh, aligned with the image.

    ``vertices`` (V, 3) crop coordinates in pixels of the posed mesh; ``triangles`` (T, 3) vertex
    indices; ``rotation`` (3, 3) rotation in crop coordinates taking the frontal face to the posed
    one (``crop_rotation(pose)``, possibly composed with augmentation). Returns a ``grid.shape``
    (D, H, W) bool volume.
    """
    vertices, triangles, rotation = _validated(vertices, triangles, rotation, grid)
    frontal, pivot = frontalise(vertices, rotation)
    return _sample_solid(frontal, triangles, rotation, pivot, grid)


def voxelise_frontal(vertices: np.ndarray, triangles: np.ndarray, rotation: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """The frontal (un-rotated) solid of a posed face mesh, for the no-alignment ablation.

    Same inputs as :func:`voxelise`; returns the (D, H, W) bool solid ``S`` of the mesh frontalised
    about its mean vertex, sampled on ``grid`` without rotating it back.
    """
    vertices, triangles, rotation = _validated(vertices, triangles, rotation, grid)
    frontal, pivot = frontalise(vertices, rotation)
    return _sample_solid(frontal, triangles, np.eye(3), pivot, grid)


def _validated(vertices, triangles, rotation, grid):
    """Check types, shapes, finiteness, index range and orthonormality; return float64/int64 arrays."""
    if not isinstance(grid, VoxelGrid):
        raise TypeError(f"grid must be a VoxelGrid, got {type(grid).__name__}")
    vertices, triangles = check_mesh(vertices, triangles, "voxelise", min_vertices=1,
                                     fix="repair or drop them before voxelising")
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape != (3, 3) or not np.isfinite(rotation).all():
        raise ValueError(f"rotation must be a finite (3, 3) matrix, got shape {rotation.shape}")
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-5) or np.linalg.det(rotation) < 0:
        raise ValueError(
            f"rotation must be a proper rotation (R^T R = I, det +1), got det {np.linalg.det(rotation):.6g}; "
            "build it with lightning_vrn.geometry.crop_rotation(pose)"
        )
    return vertices, triangles, rotation


def frontalise(vertices: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V, 3)`` posed vertices -> frontal vertices ``R^T (V - c) + c`` and the pivot ``c`` (mean vertex)."""
    pivot = np.ascontiguousarray(vertices.T).mean(axis=1)  # reducing the transposed copy is much faster
    return (vertices - pivot) @ rotation + pivot, pivot


def _bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate min and max of ``(N, 3)`` points."""
    columns = np.ascontiguousarray(points.T)
    return columns.min(axis=1), columns.max(axis=1)


def _sample_solid(frontal, triangles, rotation, pivot, grid):
    """(D, H, W) bool: voxel centre ``p`` occupied iff ``R^T (p - c) + c`` lies in the frontal solid of ``frontal``."""
    z_back = frontal[:, 2].max()
    occupancy = np.zeros(grid.shape, dtype=bool)

    # Bounding box of the rotated solid: its extreme points are mesh vertices or their projections
    # onto the back plane z = z_back, rotated with R about the pivot.
    posed = (frontal - pivot) @ rotation.T + pivot
    back = posed + (z_back - frontal[:, 2])[:, None] * rotation[:, 2]
    lo, hi = _bounds(np.concatenate([posed, back]))
    x0, x1 = max(int(np.ceil(lo[0])), 0), min(int(np.floor(hi[0])), grid.width - 1)
    y0, y1 = max(int(np.ceil(lo[1])), 0), min(int(np.floor(hi[1])), grid.height - 1)
    d0 = max(int(np.ceil(grid.z_to_d(lo[2]))), 0)
    d1 = min(int(np.floor(grid.z_to_d(hi[2]))), grid.depth - 1)
    if x0 > x1 or y0 > y1 or d0 > d1:
        return occupancy

    # q = R^T (p - c) + c = q of the slice's first voxel (d, y0, x0) + an in-slice term (y, x only).
    first = np.column_stack([np.full(d1 - d0 + 1, x0), np.full(d1 - d0 + 1, y0), grid.d_to_z(np.arange(d0, d1 + 1))])
    slice_q = (first - pivot) @ rotation + pivot  # (nd, 3)
    cols = np.arange(x1 - x0 + 1, dtype=np.float64)
    rows = np.arange(y1 - y0 + 1, dtype=np.float64)[:, None]
    in_slice = cols[..., None] * rotation[0] + rows[..., None] * rotation[1]  # (ny, nx, 3)

    # Frontal x, y of every voxel in table samples = slice_xy + in_xy, with in_xy shifted to be >= 0.
    in_xy = in_slice[..., :2].reshape(-1, 2)
    in_min = np.floor(in_xy.min(axis=0))
    in_xy = (in_xy - in_min).reshape(in_slice.shape[:2] + (2,))
    q_lo = slice_q[:, :2].min(axis=0) + in_min
    q_hi = slice_q[:, :2].max(axis=0) + in_min + in_xy.reshape(-1, 2).max(axis=0)
    depth, slope, origin = _front_planes(frontal, triangles, q_lo, q_hi)
    slice_xy = slice_q[:, :2] - origin + in_min

    # The nearest sample of voxel (y, x) in slice k is table[whole_k + round(in_xy + phase_k)]: split
    # slice_xy into whole samples (a flat offset into the table) and a phase rounded to 1/PHASES; the
    # rest (under 0.5/PHASES) goes into the exact sub-sample offset ``delta`` at which the plane is read.
    whole = np.floor(np.round(slice_xy * PHASES) / PHASES)
    phase = np.round((slice_xy - whole) * PHASES).astype(np.int64)
    residual = (slice_xy - whole - phase / PHASES).astype(np.float32)
    table_width = depth.shape[1]
    offsets = (whole[:, 1] * table_width + whole[:, 0]).astype(np.int64)
    depth, slope_x, slope_y = depth.ravel(), slope[..., 0].ravel(), slope[..., 1].ravel()

    phase_maps = {}  # phase -> (flat sample index, x offset, y offset) per in-slice voxel
    in_z = in_slice[..., 2].astype(np.float32)
    in_z_max = float(in_z.max())
    plane_z, gx, gy, delta = (np.empty(in_z.shape, dtype=np.float32) for _ in range(4))
    in_front = np.empty(in_z.shape, dtype=bool)
    box = occupancy[d0 : d1 + 1, y0 : y1 + 1, x0 : x1 + 1]
    for k, (offset, key) in enumerate(zip(offsets, map(tuple, phase))):
        if key not in phase_maps:
            shifted = in_xy + np.array(key) / PHASES
            nearest = np.floor(shifted + 0.5)
            index = (nearest[..., 1] * table_width + nearest[..., 0]).astype(np.intp)
            offset_xy = (shifted - nearest).astype(np.float32)
            if offsets.min() < 0 or offsets.max() + index.max() >= depth.size:  # guards the unchecked takes below
                raise RuntimeError("voxelise: depth table smaller than the sampled region (a bug; please report)")
            phase_maps[key] = (index, offset_xy[..., 0].copy(), offset_xy[..., 1].copy())
        index, offset_x, offset_y = phase_maps[key]
        # Indices are in range by construction; mode="clip" skips numpy's buffered bounds check.
        np.take(depth[offset:], index, out=plane_z, mode="clip")
        np.take(slope_x[offset:], index, out=gx, mode="clip")
        np.take(slope_y[offset:], index, out=gy, mode="clip")
        np.add(offset_x, residual[k, 0], out=delta)
        gx *= delta
        plane_z += gx
        np.add(offset_y, residual[k, 1], out=delta)
        gy *= delta
        plane_z += gy
        plane_z -= in_z  # occupied iff plane z <= q.z = in_z + slice z
        np.less_equal(plane_z, np.float32(slice_q[k, 2]), out=box[k])
        if slice_q[k, 2] + in_z_max > z_back:  # part of this slice lies behind the back plane
            np.less_equal(in_z, np.float32(z_back - slice_q[k, 2]), out=in_front)
            box[k] &= in_front
    return occupancy


def _front_planes(frontal, triangles, q_lo, q_hi):
    """Front-most surface of the frontal mesh, one sample per pixel, covering frontal x, y in [q_lo, q_hi].

    Returns ``(depth, slope, origin)``: ``depth`` (rows, cols) float32 crop z, ``inf`` where no
    surface; ``slope`` (rows, cols, 2) float32 ``(dz/dx, dz/dy)`` of the sample's front-most
    triangle (0 where empty); sample ``[i, j]`` lies at frontal ``(x, y) = origin + (j, i)``, with
    ``origin`` whole pixels so that voxel columns of the identity rotation fall on samples.
    """
    origin = np.floor(q_lo) - 1.0
    n_cols, n_rows = (np.ceil(q_hi - origin) + 2).astype(int)
    depth = np.full((n_rows, n_cols), np.inf, dtype=np.float32)
    slope = np.zeros((n_rows, n_cols, 2), dtype=np.float32)
    # Rasterise only over the mesh's own extent (the table may be larger or, when clipped, smaller).
    mesh_lo, mesh_hi = _bounds(frontal)
    lo = np.clip(np.floor(mesh_lo[:2] - origin), 0, [n_cols, n_rows]).astype(int)
    hi = np.clip(np.ceil(mesh_hi[:2] - origin) + 1, 0, [n_cols, n_rows]).astype(int)
    if (hi <= lo).any():
        return depth, slope, origin
    local = frontal - np.array([origin[0] + lo[0], origin[1] + lo[1], 0.0])
    candidates = triangles[_cover_a_sample(local, triangles)]
    raster = rasterise(local, candidates, hi[1] - lo[1], hi[0] - lo[0])
    window = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    surface, covered = raster.depth, raster.mask
    window_slope = slope[window]  # a view: writing it writes ``slope``

    # Plane of each covered sample's triangle: solve [e1; e2] (gx, gy) = (dz1, dz2) by Cramer's rule.
    corners = local[candidates[raster.triangle[covered]]]  # (P, 3, 3)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    gradient = np.stack([e1[:, 2] * e2[:, 1] - e2[:, 2] * e1[:, 1], e1[:, 0] * e2[:, 2] - e2[:, 0] * e1[:, 2]], -1)
    window_slope[covered] = _limited(gradient / det[:, None])

    holes = ndimage.binary_fill_holes(covered) & ~covered
    if holes.any():
        rows, cols = np.nonzero(holes)  # never on the window's border, so all 4 neighbours exist
        surface[rows, cols] = _membrane(surface, rows, cols)
        gradient = np.column_stack([surface[rows, cols + 1] - surface[rows, cols - 1],
                                    surface[rows + 1, cols] - surface[rows - 1, cols]]) / 2.0
        window_slope[rows, cols] = _limited(gradient)
    depth[window] = surface
    return depth, slope, origin


def _limited(gradient: np.ndarray) -> np.ndarray:
    """``(P, 2)`` plane slopes ``(dz/dx, dz/dy)`` scaled down where steeper than ``MAX_SLOPE``."""
    steepness = np.hypot(gradient[:, 0], gradient[:, 1])
    return gradient * np.minimum(1.0, MAX_SLOPE / np.maximum(steepness, 1e-12))[:, None]


def _membrane(surface: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Membrane (discrete harmonic) fill of the hole samples ``(rows, cols)`` of a (H, W) depth map.

    Each hole sample's depth is the mean of its four neighbours'; neighbours outside the hole are
    its rim and must be finite. Solves that sparse (N, N) system; returns (N,) depths, which lie
    within the rim's depth range.
    """
    count = len(rows)
    index = np.full(surface.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(count)
    rim_sum = np.zeros(count)
    pairs = []  # (hole sample, hole neighbour) index pairs
    for d_row, d_col in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        neighbour = index[rows + d_row, cols + d_col]
        in_hole = neighbour >= 0
        rim_sum[~in_hole] += surface[rows[~in_hole] + d_row, cols[~in_hole] + d_col]
        pairs.append(np.column_stack([np.flatnonzero(in_hole), neighbour[in_hole]]))
    i, j = np.concatenate(pairs).T
    adjacency = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(count, count))
    return spsolve(4.0 * sparse.identity(count, format="csr") - adjacency, rim_sum)


def _cover_a_sample(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Indices of the triangles whose x, y bounding box holds an integer point (a sample centre).

    Only these can be front-most at a sample. With triangles smaller than a pixel (a 100k-triangle
    face) that is a minority of them, and rasterising only those saves much of the rasteriser's time
    (benchmarks/results_settings.md).
    float32 is exact here: rounding to nearest never moves a coordinate across an integer.
    """
    spans = []
    for axis in (0, 1):
        a, b, c = points[:, axis].astype(np.float32)[triangles].T
        spans.append(np.ceil(np.minimum(np.minimum(a, b), c)) <= np.maximum(np.maximum(a, b), c))
    return np.flatnonzero(spans[0] & spans[1])

