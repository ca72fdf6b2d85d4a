"""One interface for linear 3D morphable face models (the built-in procedural model, the Surrey, Basel or ICT model).

Model frame (millimetres): x = image right when the face is frontal (the subject's left), y up,
z toward the camera, roughly centred at the origin. A face is
``mean + sum_k identity[k] * identity_basis[k] + sum_k expression[k] * expression_basis[k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_vrn.dataset_file import NEUTRAL, UNIQUE_ID_FIELDS
from lightning_vrn.geometry.topology import as_vertex_ids
from lightning_vrn.landmark_scheme import NUM_LANDMARKS

# Chance that a sampled face is neutral; otherwise 1 or 2 blendshapes are active.
NEUTRAL_PROBABILITY = 0.35
IDENTITY_CLIP = 3.0
NEUTRAL_THRESHOLD = 0.1
"""A face whose every |expression coefficient| is below this (a tenth of the full expression) is neutral.

With :meth:`FaceModel.sample_coefficients` that is 38.6% of faces (20,000 draws; 36.6% of the first
500; the 35% drawn neutral plus weak single or double blendshapes); at 0.1 the strongest
built-in blendshape, ``mouth_open``, moves the chin 2.6 mm."""


def expression_label(expression: np.ndarray) -> int:
    """Dominant expression of ``(K_exp,)`` coefficients: 0 (neutral) if every ``|c| < NEUTRAL_THRESHOLD``,
    else ``1 + argmax |c|``, an id into :attr:`FaceModel.expression_label_names`.

    The sign is ignored: the sampler draws only non-negative weights; a negative one (a fit's) still
    names the blendshape that moves the face most.
    """
    magnitude = np.abs(np.asarray(expression, dtype=np.float64))
    if magnitude.ndim != 1:
        raise ValueError(f"expression coefficients must have shape (K_exp,), got {magnitude.shape}")
    return 0 if not len(magnitude) or magnitude.max() < NEUTRAL_THRESHOLD else 1 + int(magnitude.argmax())


HEAD_PARTS = ("skin", "mouth", "teeth", "gums", "eye", "lashes")
"""What each vertex of a :class:`ModelHead` is, for its colour (:func:`data_prep.scene.head_part_albedo`)."""


@dataclass
class ModelHead:
    """Geometry a face model renders around its face but leaves out of the volume (the ICT model's head and neck,
    mouth, teeth, eyeballs, eyelashes).

    ``mean`` (R, 3) float32 mm; ``identity_basis`` (K_id, R, 3) and ``expression_basis`` (K_exp, R, 3) float32,
    moved by the face's own coefficients; ``triangles`` (T, 3) int64 ids into the face's V vertices followed by
    these R; ``part`` (R,) uint8, an index into :data:`HEAD_PARTS`.
    """

    mean: np.ndarray
    identity_basis: np.ndarray
    expression_basis: np.ndarray
    triangles: np.ndarray
    part: np.ndarray


def _linear_shape(mean: np.ndarray, bases: tuple[np.ndarray, np.ndarray], coefficients: tuple, model: str) -> np.ndarray:
    """``mean`` (N, 3) plus each basis (K, N, 3) weighted by its ``(K,)`` coefficients (None: left out), float32."""
    vertices = mean.astype(np.float32, copy=True)
    for name, values, basis in zip(("identity", "expression"), coefficients, bases):
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(basis),):
            raise ValueError(f"face model {model!r}: {name} coefficients must have shape ({len(basis)},), "
                             f"got {values.shape}")
        vertices += np.tensordot(values, basis, axes=1)
    return vertices


@dataclass
class FaceModel:
    """A linear face model with a fixed mesh topology.

    ``mean`` (V, 3) float32 mm; ``identity_basis`` (K_id, V, 3) float32, scaled so coefficients
    ~ N(0, 1) give plausible people; ``expression_basis`` (K_exp, V, 3) float32 blendshape offsets
    (coefficient 1.0 = the full expression) named by ``expression_names``; ``triangles`` (T, 3)
    int64, counter-clockwise seen from the front (normals toward +z); ``landmark_vertices`` (68,)
    int64 vertex ids of the iBUG-68 landmarks (0-based iBUG order); ``face_region`` (F,) int64
    vertex ids used for NME; ``leading_components``: the bases are the leading columns of a larger model's
    (3DDFA's train.configs: the first 40 shape and 10 expression columns of the BFM's 199 and 29), so a longer
    parameter vector applies cut to its first values (:func:`data_prep.mat_faces.parameters_for_model`);
    ``head``: geometry rendered around the face but not voxelised (:class:`ModelHead`; None: the face alone).
    """

    name: str
    mean: np.ndarray
    identity_basis: np.ndarray
    expression_basis: np.ndarray
    expression_names: list[str]
    triangles: np.ndarray
    landmark_vertices: np.ndarray
    face_region: np.ndarray
    leading_components: bool = False
    head: ModelHead | None = None

    @property
    def expression_label_names(self) -> tuple[str, ...]:
        """Name of each :func:`expression_label` id: ``"neutral"``, then ``expression_names``."""
        return (NEUTRAL, *self.expression_names)

    @property
    def num_vertices(self) -> int:
        """Number of mesh vertices V."""
        return int(self.mean.shape[0])

    def shape(self, identity=None, expression=None) -> np.ndarray:
        """(V, 3) float32 face in mm for ``(K_id,)`` identity and ``(K_exp,)`` expression coefficients.

        ``None`` (or zeros) for either gives the mean identity / the neutral expression.
        """
        return _linear_shape(self.mean, (self.identity_basis, self.expression_basis), (identity, expression), self.name)

    def head_shape(self, identity=None, expression=None) -> np.ndarray:
        """(R, 3) float32 vertices of :attr:`head` (mm) for the same coefficients as :meth:`shape`."""
        if self.head is None:
            raise ValueError(f"face model {self.name!r} has no head geometry of its own")
        return _linear_shape(self.head.mean, (self.head.identity_basis, self.head.expression_basis),
                             (identity, expression), self.name)

    def sample_coefficients(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random ``(K_id,)`` identity ~ N(0, 1) clipped to +-3 and a sparse ``(K_exp,)`` expression mix.

        The expression is neutral with probability ``NEUTRAL_PROBABILITY``; otherwise one or two
        distinct blendshapes are active with weights uniform in [0, 1]. Both float32.
        """
        identity = np.clip(rng.standard_normal(len(self.identity_basis)), -IDENTITY_CLIP, IDENTITY_CLIP)
        expression = np.zeros(len(self.expression_basis))
        if len(expression) and rng.random() >= NEUTRAL_PROBABILITY:
            active = rng.choice(len(expression), size=min(int(rng.integers(1, 3)), len(expression)), replace=False)
            expression[active] = rng.uniform(0.0, 1.0, size=len(active))
        return identity.astype(np.float32), expression.astype(np.float32)

    def validate(self) -> "FaceModel":
        """Check shapes, index ranges and finiteness; raise ValueError naming the model and the problem."""
        def fail(problem: str):
            raise ValueError(f"face model {self.name!r}: {problem}")

        if self.mean.ndim != 2 or self.mean.shape[1] != 3 or len(self.mean) < 3:
            fail(f"mean must have shape (V, 3), got {self.mean.shape}")
        num_vertices = self.num_vertices
        for label, basis in (("identity_basis", self.identity_basis), ("expression_basis", self.expression_basis)):
            if basis.ndim != 3 or basis.shape[1:] != (num_vertices, 3):
                fail(f"{label} must have shape (K, {num_vertices}, 3), got {basis.shape}")
        if len(self.expression_names) != len(self.expression_basis):
            fail(f"{len(self.expression_names)} expression names for {len(self.expression_basis)} blendshapes")
        if NEUTRAL in self.expression_names or len(set(self.expression_names)) != len(self.expression_names):
            fail(f"expression names {self.expression_names} must be distinct and not {NEUTRAL!r} (label 0)")
        for label, array in (("mean", self.mean), ("identity_basis", self.identity_basis),
                             ("expression_basis", self.expression_basis)):
            if not np.all(np.isfinite(array)):
                fail(f"{label} contains NaN or infinite values")
        if self.triangles.ndim != 2 or self.triangles.shape[1] != 3 or len(self.triangles) == 0:
            fail(f"triangles must have shape (T, 3), got {self.triangles.shape}")
        if self.landmark_vertices.shape != (NUM_LANDMARKS,):
            fail(f"landmark_vertices must have shape ({NUM_LANDMARKS},), got {self.landmark_vertices.shape}")
        if self.face_region.ndim != 1 or len(self.face_region) == 0:
            fail(f"face_region must be a non-empty 1-D index array, got shape {self.face_region.shape}")
        for label, ids in (("triangles", self.triangles), ("landmark_vertices", self.landmark_vertices),
                           ("face_region", self.face_region)):
            as_vertex_ids(ids, num_vertices, f"face model {self.name!r}: {label}", unique=label in UNIQUE_ID_FIELDS)
        if self.head is not None:
            head, num_head = self.head, len(self.head.mean)
            for label, basis, count in (("identity", head.identity_basis, len(self.identity_basis)),
                                        ("expression", head.expression_basis, len(self.expression_basis))):
                if basis.shape != (count, num_head, 3):
                    fail(f"head {label} basis must have shape ({count}, {num_head}, 3), got {basis.shape}")
            if head.part.shape != (num_head,) or head.part.max(initial=0) >= len(HEAD_PARTS):
                fail(f"head part labels must be (R,) = ({num_head},) ids below {len(HEAD_PARTS)}")
            as_vertex_ids(head.triangles, num_vertices + num_head, f"face model {self.name!r}: head triangles",
                          unique=False)
        return self


def load_face_model(spec: str) -> FaceModel:
    """Load a face model by spec: ``"builtin"``, ``"sfm:/path/to/dir"`` (Surrey Face Model files),
    ``"bfm:/path"`` (a Basel Face Model file or folder, :mod:`data_prep.bfm`; micrometres, not mm) or
    ``"ict:/path/to/ict_face_model.npz"`` (the ICT Face Model with its head, :mod:`data_prep.ict`).

    Raises ValueError for an unknown spec and FileNotFoundError for a missing directory or file.
    """
    if spec == "builtin":
        from data_prep.builtin_face import builtin_face_model

        return builtin_face_model()
    if spec.startswith("sfm:"):
        from data_prep.sfm import load_sfm

        directory = spec[len("sfm:"):]
        if not directory:
            raise ValueError("face model spec 'sfm:' needs a directory, e.g. 'sfm:/path/to/sfm'")
        return load_sfm(Path(directory).expanduser())
    if spec.startswith("ict:"):
        from data_prep.ict import load_ict

        location = spec[len("ict:"):]
        if not location:
            raise ValueError("face model spec 'ict:' needs the ICT Face Model file, e.g. 'ict:/path/to/ict_face_model.npz'")
        return load_ict(location)
    if spec.startswith("bfm:"):
        from data_prep.bfm import load_bfm

        location = spec[len("bfm:"):]
        if not location:
            raise ValueError("face model spec 'bfm:' needs a file or folder, e.g. 'bfm:/path/to/Model_Shape.mat'")
        return load_bfm(location)
    raise ValueError(f"unknown face model spec {spec!r}: use 'builtin', 'sfm:/path/to/sfm_dir', "
                     f"'bfm:/path/to/bfm_file_or_dir' or 'ict:/path/to/ict_face_model.npz'")
