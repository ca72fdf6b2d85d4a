"""The paper's NME: ground-truth face vertices against the iso-surface of a predicted volume.

Per sample (docs/evaluation.md):

1. the predicted mesh is the 0.5 iso-surface of the soft volume in crop coordinates (z in pixels);
2. Open3D ICP moves the ground-truth face-region vertices ``v_i`` onto the predicted iso-surface
   (source = ground truth, target = prediction: the slab's side and back walls, which the ground
   truth does not have, attract no correspondences; pairs farther than ``icp_max_distance`` are
   ignored; a Tukey loss keeps vertices without a true counterpart from dragging it). It gives a
   rigid transform ``T``. ICP is point-to-plane against the iso-surface
   vertices and their normals: point-to-point stalls on the ~1 px spacing of those vertices and,
   on smooth shapes, stops several tenths of a pixel from the true alignment;
3. the predicted point corresponding to ``v_i`` is ``p_i``, the closest point of the predicted
   surface (its triangles, not only its vertices) to ``T v_i``;
4. NME = mean ``|v_i - p_i|`` / outer interocular distance: ICP only finds the correspondence,
   the rigid transform is not applied to the error. The rigidly aligned figure (the paper's
   supplement) is mean ``|T v_i - p_i|`` / interocular. A protocol-free figure beside them, the
   closest-point error, is mean ``|v_i - q_i|`` / interocular with ``q_i`` the closest point of the
   predicted surface to ``v_i`` itself (no ICP: a lower bound of the NME that does not depend on the
   ICP's details).

Ground truth with its own topology (real scans, whose face region shares no vertex order with the
prediction or with other samples) is scored the same way: step 2 needs only the ground-truth vertices,
so each sample may have its own number of them (:meth:`NME.update` takes a list).

A prediction with no surface (nothing above 0.5) raises :class:`EmptyPredictionError`;
:class:`NME` counts such samples as ``failed`` and leaves them out of the means. :class:`NME` scores its
samples in an :class:`~lightning_vrn.metrics.pool.NMEPool` of worker processes when given one, with the
numbers of a serial loop.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.pose import crop_rotation
from lightning_vrn.geometry.voxelise import frontalise
from lightning_vrn.metrics.pool import NMEPool

ICP_DISTANCE_RATIO = 0.1
"""Default ICP correspondence cut-off as a fraction of the outer interocular distance (~5 px in a paper crop)."""
ICP_ROBUST_FRACTION = 0.7
"""Scale of ICP's Tukey loss as a fraction of the correspondence cut-off (~4 px in a paper crop):
ground-truth vertices with no true counterpart (the hidden back of a face deeper than the grid, which
lands on the grid's back wall) stop pulling the alignment. It lowers the floor of ground truth against
itself near profile and leaves it unchanged below 60 degrees of yaw (benchmarks/results_settings.md)."""

ICP_TRANSFORM_DECIMALS = 8
"""Decimals the ICP transform is rounded to (1e-8 px of shift): far below any error that matters, far
above Open3D's run-to-run noise, so evaluation is repeatable to the last digit."""


def import_open3d():
    """The ``open3d`` module, imported on first use so that training imports without it (GPU clusters
    often lack it); an ImportError that says how to install it or train without the NME."""
    try:
        import open3d as o3d
    except ImportError as error:
        raise ImportError(f"the NME needs Open3D ({error}): pip install open3d (on Debian also apt-get install "
                          "libusb-1.0-0), or train without it (nme.every_n_epochs=0: no NME callback) and score the "
                          "checkpoint with experiments.evaluate where Open3D is installed") from None
    return o3d


class EmptyPredictionError(ValueError):
    """The predicted volume has no iso-surface, so there is nothing to measure against."""


@dataclass(frozen=True)
class NMEResult:
    """NME of one sample.

    ``nme``, ``nme_aligned``: mean error / interocular without and with the ICP transform;
    ``nme_closest``: mean distance from each ground-truth vertex to the predicted surface / interocular (no ICP);
    ``errors``, ``errors_aligned``: (F,) per-vertex distances in pixels;
    ``transform``: (4, 4) ICP transform taking the ground truth onto the prediction (crop pixels);
    ``fitness``: fraction of the ICP's ground-truth vertices with a correspondence within the cut-off.
    """

    nme: float
    nme_aligned: float
    nme_closest: float
    errors: np.ndarray
    errors_aligned: np.ndarray
    transform: np.ndarray
    fitness: float


def sample_nme(
    pred_volume,
    gt_vertices,
    interocular: float,
    grid: VoxelGrid,
    icp_max_distance: float | None = None,
    icp_iterations: int = 30,
    level: float = 0.5,
    icp_subsample: int = 1,
) -> NMEResult:
    """NME of one predicted ``(D, H, W)`` soft volume against ``(F, 3)`` ground-truth face-region vertices.

    ``gt_vertices`` and ``interocular`` are in crop pixels; ``icp_max_distance`` (px) defaults to
    ``ICP_DISTANCE_RATIO * interocular``. ``icp_subsample`` k > 1 fits ICP to every k-th ground-truth
    vertex only (the AFLW2000-3D evaluation scripts use every 50th): faster, but it moves the NME
    (docs/evaluation.md, "Speed"); the error is still over every vertex. Raises
    :class:`EmptyPredictionError` when the volume has no iso-surface at ``level``.
    """
    gt = np.asarray(gt_vertices.detach().cpu() if hasattr(gt_vertices, "detach") else gt_vertices, dtype=np.float64)
    if gt.ndim != 2 or gt.shape[1] != 3 or len(gt) < 3:
        raise ValueError(f"gt_vertices must have shape (F, 3) with F >= 3 crop-coordinate vertices, got {gt.shape}")
    if not np.isfinite(gt).all():
        raise ValueError("gt_vertices contain NaN or inf; pass the face-region vertices of the ground-truth mesh")
    interocular = float(interocular)
    if not np.isfinite(interocular) or interocular <= 0:
        raise ValueError(f"interocular distance must be a positive number of pixels, got {interocular}")
    max_distance = ICP_DISTANCE_RATIO * interocular if icp_max_distance is None else float(icp_max_distance)
    if max_distance <= 0:
        raise ValueError(f"icp_max_distance must be positive (pixels), got {max_distance}")
    if icp_subsample < 1:
        raise ValueError(f"icp_subsample must be >= 1 (1: every ground-truth vertex), got {icp_subsample}")

    vertices, triangles = volume_to_mesh(pred_volume, grid, level=level)
    if len(triangles) == 0:
        raise EmptyPredictionError(
            f"predicted volume has no surface: no voxel above {level}, so NME is undefined for this sample"
        )
    transform, fitness = _icp(gt[::icp_subsample], vertices, triangles, max_distance, ICP_ROBUST_FRACTION * max_distance,
                              icp_iterations)
    moved = gt @ transform[:3, :3].T + transform[:3, 3]
    closest, closest_plain = _closest_surface_points(vertices, triangles, moved, gt)
    errors = np.linalg.norm(gt - closest, axis=1)
    errors_aligned = np.linalg.norm(moved - closest, axis=1)
    return NMEResult(
        nme=float(errors.mean() / interocular),
        nme_aligned=float(errors_aligned.mean() / interocular),
        nme_closest=float(np.linalg.norm(gt - closest_plain, axis=1).mean() / interocular),
        errors=errors,
        errors_aligned=errors_aligned,
        transform=transform,
        fitness=fitness,
    )


def _icp(
    source: np.ndarray,
    vertices: np.ndarray,
    triangles: np.ndarray,
    max_distance: float,
    robust_scale: float,
    iterations: int,
) -> tuple[np.ndarray, float]:
    """Point-to-plane ICP with a Tukey loss of scale ``robust_scale`` (px) of ``(F, 3)`` source points onto a mesh.

    The target is the mesh's vertices with their normals. Returns the ``(4, 4)`` transform and the
    fraction of source points with a correspondence within ``max_distance`` (the fitness). With
    few correspondences the point-to-plane system is degenerate and ICP can run off; a result
    with a lower fitness than the identity is discarded for the identity.
    """
    o3d = import_open3d()
    registration = o3d.pipelines.registration
    source_cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(source, dtype=np.float64)))
    target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(vertices, dtype=np.float64)))
    target.normals = o3d.utility.Vector3dVector(vertex_normals(vertices, triangles))
    result = registration.registration_icp(
        source_cloud,
        target,
        max_distance,
        np.eye(4),
        registration.TransformationEstimationPointToPlane(registration.TukeyLoss(k=robust_scale)),
        registration.ICPConvergenceCriteria(max_iteration=iterations),
    )
    start = registration.evaluate_registration(source_cloud, target, max_distance, np.eye(4))
    if result.fitness < start.fitness or result.fitness == 0:
        return np.eye(4), float(start.fitness)
    # Open3D's parallel reductions leave ~1e-13 of thread-order noise in the transform; rounding it
    # to ICP_TRANSFORM_DECIMALS makes the same inputs give the same NME digits on every run.
    return np.round(np.asarray(result.transformation, dtype=np.float64), ICP_TRANSFORM_DECIMALS), float(result.fitness)


def _closest_surface_points(vertices: np.ndarray, triangles: np.ndarray, *queries: np.ndarray) -> list[np.ndarray]:
    """For each ``(Q, 3)`` array of query points, the closest points ``(Q, 3)`` on the triangle mesh ``(N, 3)``/``(T, 3)``."""
    o3d = import_open3d()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(triangles, dtype=np.uint32)),
    )
    points = scene.compute_closest_points(o3d.core.Tensor(np.concatenate(queries).astype(np.float32)))["points"]
    return np.split(points.numpy().astype(np.float64), np.cumsum([len(q) for q in queries[:-1]]))  # one query pass


TARGET_FRAMES = ("aligned", "frontal")
"""Frames a model may predict its volume in: aligned with the image (VRN) or frontal (the no-alignment ablation)."""


def scoring_vertices(vertices: np.ndarray, pose: np.ndarray, frame: str) -> np.ndarray:
    """Ground-truth ``(V, 3)`` crop-coordinate vertices in the frame a model predicts its volume in.

    ``"aligned"``: as they are. ``"frontal"``: frontalised with the sample's ``(3,)`` pose about the
    mesh's mean vertex, exactly as the frontal target volume was voxelised
    (:func:`lightning_vrn.geometry.voxelise.voxelise_frontal`). Pass the whole mesh (the pivot is
    its mean vertex) and take the face region afterwards. Every scorer decides the frame here.
    """
    if frame not in TARGET_FRAMES:
        raise ValueError(f"target frame must be one of {TARGET_FRAMES}, got {frame!r}")
    vertices = np.asarray(vertices, dtype=np.float64)
    if frame == "aligned":
        return vertices
    return frontalise(vertices, crop_rotation(np.asarray(pose, dtype=np.float64)))[0]


class NME(Metric):
    """NME over samples, exact under DDP; ``compute()`` gives the means, :meth:`per_sample` the table.

    ``grid``: the volumes' :class:`VoxelGrid` (or its ``to_dict()``); the ICP cut-off is
    ``icp_distance_ratio`` times each sample's interocular distance; ``icp_subsample``: see
    :func:`sample_nme`. The states are per-sample values (gathered across processes); a distributed
    sampler repeats a few samples to even out the processes, and both the means and the table count
    each dataset index once. Samples whose prediction has no surface are ``failed``: NaN in the table,
    left out of the means. ``pool``: an :class:`NMEPool` that scores the samples while the next batches
    come (None: in this process, during :meth:`update`); its results join the states, in the order
    the samples came, before anything reads them (``compute``, :meth:`per_sample`, a merge), so the
    numbers are the serial ones. An error of a sample (other than an empty prediction) is raised there.
    The caller owns the pool.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    PER_SAMPLE = ("sample_index", "sample_yaw", "sample_expression", "sample_nme", "sample_nme_aligned",
                  "sample_nme_closest")

    def __init__(
        self,
        grid: VoxelGrid | Mapping[str, Any],
        icp_distance_ratio: float = ICP_DISTANCE_RATIO,
        icp_iterations: int = 30,
        icp_subsample: int = 1,
        pool: NMEPool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.grid = grid if isinstance(grid, VoxelGrid) else VoxelGrid.from_dict(grid)
        self.icp_distance_ratio = float(icp_distance_ratio)
        self.icp_iterations = int(icp_iterations)
        self.icp_subsample = int(icp_subsample)
        self.pool = pool or NMEPool(1)
        self._pending: list[tuple[list[Future], np.ndarray, np.ndarray, np.ndarray]] = []
        # Per-sample values are float64 1-D tensors (float32 would round the NME). torchmetrics
        # stands in an empty tensor of the metric's dtype for a process that saw no sample, and
        # all gathered tensors must share one dtype: hence set_dtype.
        for name in self.PER_SAMPLE:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, pred_volumes, gt_vertices, interocular, yaw, index, expression=None) -> None:
        """Add a batch.

        ``pred_volumes`` (B, D, H, W) soft occupancy; ``gt_vertices`` (B, F, 3) face-region vertices
        in crop pixels, in the frame of the prediction (:func:`scoring_vertices`), or a length-B
        sequence of (F_b, 3); ``interocular`` (B,) pixels; ``yaw`` (B,) radians; ``index`` (B,)
        dataset sample indices; ``expression`` (B,) dominant-expression label ids (None: unknown, -1).
        """
        interocular, yaw, index = (_as_numpy(v).reshape(-1) for v in (interocular, yaw, index))
        count = len(pred_volumes)
        expression = np.full(count, -1.0) if expression is None else _as_numpy(expression).reshape(-1)
        if not (len(gt_vertices) == len(interocular) == len(yaw) == len(index) == len(expression) == count):
            raise ValueError(
                f"NME.update needs one entry per sample: got {count} volumes, {len(gt_vertices)} vertex sets, "
                f"{len(interocular)} interocular distances, {len(yaw)} yaws, {len(index)} indices, "
                f"{len(expression)} expressions"
            )
        volumes = pred_volumes.detach().cpu().numpy() if torch.is_tensor(pred_volumes) else pred_volumes
        futures = [
            self.pool.submit(_sample_values, volumes[b], _as_numpy(gt_vertices[b]), interocular[b], self.grid,
                             self.icp_distance_ratio * interocular[b], self.icp_iterations, self.icp_subsample)
            for b in range(count)
        ]
        self._pending.append((futures, index, np.degrees(yaw), expression))

    def sync(self, *args, **kwargs) -> None:
        """The samples still being scored join the states first (``compute`` and :meth:`per_sample` sync)."""
        self._collect()
        super().sync(*args, **kwargs)

    def merge_state(self, incoming_state) -> None:
        """torchmetrics' merge, once both metrics' pending samples are in their states."""
        self._collect()
        if isinstance(incoming_state, NME):
            incoming_state._collect()
        super().merge_state(incoming_state)

    def reset(self) -> None:
        """Clear the states; samples still being scored are cancelled or their results dropped."""
        for futures, *_ in self._pending:
            for future in futures:
                future.cancel()
        self._pending = []
        super().reset()

    def _collect(self) -> None:
        """Wait for the pending samples and append their values to the states, batch by batch in update order."""
        pending, self._pending = self._pending, []
        device = self.device
        for futures, index, yaw_deg, expression in pending:
            values = np.array([_result_or_failed(future) for future in futures]).reshape(len(futures), 3)
            for name, column in zip(self.PER_SAMPLE, (index, yaw_deg, expression, *values.T)):
                getattr(self, name).append(torch.as_tensor(column, dtype=torch.float64, device=device))

    def compute(self) -> dict[str, torch.Tensor]:
        """``nme``, ``nme_aligned`` (means over non-failed samples, NaN if none), ``count``, ``failed``."""
        table = self._table()
        ok = ~table["failed"]
        nan = float("nan")
        return {
            "nme": torch.tensor(table["nme"][ok].mean() if ok.any() else nan, dtype=torch.float64),
            "nme_aligned": torch.tensor(table["nme_aligned"][ok].mean() if ok.any() else nan, dtype=torch.float64),
            "count": torch.tensor(int(ok.sum())),
            "failed": torch.tensor(int((~ok).sum())),
        }

    def per_sample(self) -> dict[str, np.ndarray]:
        """Per-sample table over all processes (columns of :data:`lightning_vrn.metrics.report.COLUMNS`).

        Sorted by index; a sample seen more than once (a distributed sampler pads the last batch
        with repeats) appears once. Under DDP every process must call this (it gathers).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True):
            return self._table()

    def _table(self) -> dict[str, np.ndarray]:
        """The (already synchronised) states as a deduplicated, index-sorted table."""
        columns = [_gathered(getattr(self, name)) for name in self.PER_SAMPLE]
        index, first = np.unique(columns[0].astype(np.int64), return_index=True)
        yaw_deg, expression, nme, nme_aligned, nme_closest = (column[first] for column in columns[1:])
        return {
            "index": index,
            "yaw_deg": yaw_deg,
            "expression": expression.astype(np.int64),
            "nme": nme,
            "nme_aligned": nme_aligned,
            "nme_closest": nme_closest,
            "failed": ~np.isfinite(nme),
        }


def _sample_values(pred_volume: np.ndarray, gt_vertices: np.ndarray, interocular: float, grid: VoxelGrid,
                   icp_max_distance: float, icp_iterations: int, icp_subsample: int) -> tuple[float, float, float]:
    """The job :class:`NME` gives its pool: :func:`sample_nme`'s ``(nme, nme_aligned, nme_closest)``."""
    result = sample_nme(pred_volume, gt_vertices, interocular, grid, icp_max_distance=icp_max_distance,
                        icp_iterations=icp_iterations, icp_subsample=icp_subsample)
    return result.nme, result.nme_aligned, result.nme_closest


def _result_or_failed(future: Future) -> tuple[float, float, float]:
    """A sample's values, NaN for a prediction without a surface; any other error of the sample is raised."""
    try:
        return future.result()
    except EmptyPredictionError:
        return (np.nan, np.nan, np.nan)


def _as_numpy(values) -> np.ndarray:
    """Tensor, array or sequence -> float64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def _gathered(state) -> np.ndarray:
    """A per-sample state (list of 1-D tensors, or one tensor after a sync) -> 1-D float64 numpy array."""
    if isinstance(state, list) and not state:
        return np.zeros(0, dtype=np.float64)
    return dim_zero_cat(state).cpu().numpy().astype(np.float64)
