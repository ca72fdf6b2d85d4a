"""Fit a linear face model and a scaled-orthographic camera to 2D landmarks (the paper's EOS row).

Shape: ``X(c) = mean + basis @ c``, ``(V, 3)`` in model millimetres (x to the image right when
frontal, y up, z toward the camera: docs/conventions.md, "Pose"), with coefficients ``c`` in units
of their prior scale (a standard deviation, or a full blendshape), so one Tikhonov weight suits all.
Camera: scaled orthographic into crop pixels, ``crop_xy = scale * (R @ X)[:2] + t`` with ``R`` a
proper rotation from model to crop axes (y down, z away from the camera): for a posed face
``R = F @ euler_to_matrix(pose)``, the rotation of :func:`~lightning_vrn.geometry.pose.model_to_crop`.

Cost, over the landmarks ``l`` (L, 2) and the model's landmark vertices:
``sum |scale * (R X_l(c))[:2] + t - l|^2 + regularisation * scale^2 * |c|^2``, i.e.
``scale^2`` times (squared residuals in model millimetres + ``regularisation * |c|^2``): the weight
does not depend on the crop size. As eos's ``fit_shape_and_pose``, it alternates, from the mean shape:

- camera given the shape: affine least squares ``l ~ A X_l + b`` on the landmarks, then the nearest
  scaled-orthographic camera: ``A = U S V^T`` gives the rotation's first two rows ``U V^T`` and the
  third is their cross product (a proper rotation);
- shape given the rotation: linear least squares for ``(scale, scale * c, t)`` jointly, the exact
  minimiser of the cost for that rotation, so the model's size-like modes and the camera scale trade
  within one step instead of over many alternations.

Depth is not observable from 2D landmarks: :meth:`ShapeFit.crop_vertices` places the mesh in depth
by the caller's convention (its nearest point at a given crop z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_vrn.geometry.pose import FLIP_YZ, matrix_to_euler


class LandmarksDoNotFit(ValueError):
    """A sample's landmarks have no face-like fit (a non-positive scale): a detector's degenerate output."""


@dataclass(frozen=True, eq=False)
class ShapeFit:
    """A fitted face: ``coefficients`` (K,), its shape ``model_vertices`` (V, 3) mm, and the camera:
    ``rotation`` (3, 3) model -> crop axes, ``scale`` crop px per mm, ``translation_2d`` (2,) crop px."""

    coefficients: np.ndarray
    model_vertices: np.ndarray
    rotation: np.ndarray
    scale: float
    translation_2d: np.ndarray

    @property
    def pose(self) -> np.ndarray:
        """``(3,)`` pitch, yaw, roll in radians (docs/conventions.md, "Pose")."""
        return matrix_to_euler(FLIP_YZ @ self.rotation)

    @property
    def crop_rotation(self) -> np.ndarray:
        """``(3, 3)`` rotation in crop coordinates taking the frontal face to the fitted one:
        ``pose.crop_rotation(self.pose)``, without going through Euler angles (what the voxeliser takes)."""
        return self.rotation @ FLIP_YZ

    def crop_vertices(self, z_front: float) -> np.ndarray:
        """``(V, 3)`` fitted mesh in crop coordinates: x, y by the fitted camera, z = ``scale * (R X)_z``
        shifted so that the mesh's nearest point lies at crop z ``z_front`` (pixels)."""
        posed = self.scale * self.model_vertices @ self.rotation.T
        posed[:, :2] += self.translation_2d
        posed[:, 2] += z_front - posed[:, 2].min()
        return posed


def fit_shape_to_landmarks(landmarks_2d: np.ndarray, mean: np.ndarray, basis: np.ndarray,
                           landmark_vertices: np.ndarray, regularisation: float, iterations: int = 30) -> ShapeFit:
    """Fit coefficients and a scaled-orthographic camera to ``(L, 2)`` landmarks in crop pixels.

    ``mean`` (V, 3) and ``basis`` (V, 3, K) in model mm (see the module docstring);
    ``landmark_vertices`` (L,) the vertex id of each landmark; ``regularisation`` > 0 the weight of
    ``|c|^2`` against squared residuals in mm; ``iterations`` alternations (the default is ample with
    ``regularisation`` 3 on synthetic faces; a weight near 0 leaves the shape barely constrained and
    needs many more: benchmarks/results_settings.md).
    """
    landmarks_2d = np.asarray(landmarks_2d, dtype=np.float64)
    landmark_vertices = np.asarray(landmark_vertices)
    mean, basis = np.asarray(mean), np.asarray(basis)
    if mean.ndim != 2 or mean.shape[1] != 3 or basis.shape[:2] != mean.shape or basis.ndim != 3:
        raise ValueError(f"mean must be (V, 3) and basis (V, 3, K); got {mean.shape} and {basis.shape}")
    if landmarks_2d.shape != (len(landmark_vertices), 2) or not np.isfinite(landmarks_2d).all():
        raise ValueError(f"landmarks must be finite (L, 2) for L = {len(landmark_vertices)} landmark vertices, "
                         f"got shape {landmarks_2d.shape}")
    if not regularisation > 0 or iterations < 1:
        raise ValueError(f"regularisation must be > 0 and iterations >= 1, got {regularisation} and {iterations}")
    num_landmarks, num_coefficients = len(landmark_vertices), basis.shape[2]
    mean_l = mean[landmark_vertices].astype(np.float64)          # (L, 3)
    basis_l = basis[landmark_vertices].astype(np.float64)        # (L, 3, K)
    damping = np.diag(np.r_[0.0, np.full(num_coefficients, float(regularisation)), 0.0, 0.0])
    coefficients = np.zeros(num_coefficients)
    for _ in range(iterations):
        rotation = _nearest_rotation(mean_l + basis_l @ coefficients, landmarks_2d)
        # Unknowns (scale, scale * c, t): landmarks = scale * R2 mean_l + R2 basis_l (scale * c) + t.
        design = np.concatenate([
            (mean_l @ rotation[:2].T).reshape(-1, 1),
            np.einsum("ij,ljk->lik", rotation[:2], basis_l).reshape(2 * num_landmarks, num_coefficients),
            np.tile(np.eye(2), (num_landmarks, 1)),
        ], axis=1)
        solution = np.linalg.solve(design.T @ design + damping, design.T @ landmarks_2d.reshape(-1))
        scale, translation = solution[0], solution[-2:]
        if not scale > 0:
            raise LandmarksDoNotFit(f"the landmarks do not fit the face model (fitted scale {scale}); are they a face's "
                             f"{num_landmarks} landmarks in the model's order?")
        coefficients = solution[1:-2] / scale
    model_vertices = mean.astype(np.float64) + basis.astype(np.float64) @ coefficients
    return ShapeFit(coefficients, model_vertices, rotation, float(scale), translation)


def _nearest_rotation(points: np.ndarray, landmarks_2d: np.ndarray) -> np.ndarray:
    """``(3, 3)`` rotation of the scaled-orthographic camera nearest the affine map of ``(L, 3)`` points
    onto ``(L, 2)`` landmarks (least squares)."""
    affine = np.linalg.lstsq(points - points.mean(0), landmarks_2d - landmarks_2d.mean(0), rcond=None)[0].T
    u, _, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt
    return np.vstack([rows, np.cross(rows[0], rows[1])])
