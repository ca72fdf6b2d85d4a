"""Reader for the ICT Face Model (ICT-FaceKit, USC ICT, MIT licence) as one ``.npz``: a whole head, of which the
face region is voxelised and everything is rendered.

Arrays read (the layout of ``ict_face_model.npz``; a user converts the toolkit's OBJ files once):
``neutral`` (N, 3) centimetres, x toward the subject's left, y up, z toward the camera (our model frame);
``faces`` (Q, 4) 0-based quads, -1 as the 4th index of a triangle; ``identity`` (K_id, N, 3) and ``expressions``
(K_exp, N, 3) vertex offsets, identity modes already scaled to standard-normal coefficients and expressions at
full weight; ``expression_names`` (K_exp,); ``landmarks_68`` (68,) iBUG-68 vertex ids; ``region_names`` and
``region_ranges`` (P, 2) inclusive vertex ranges of each part, the ``face`` region first.

The face region (``face``: the vertices ``0 .. face[1]``, the face between the ears without ears and neck, which
also reaches 89 mm under the chin) becomes the :class:`~data_prep.face_model.FaceModel`'s mesh, the one
voxelised, stored and scored; of the ICT regions it is the one closest to the Basel face region of AFLW2000-3D's
ground truth (docs/synthetic_images.md). Every other vertex becomes its
:class:`~data_prep.face_model.ModelHead`, rendered and never voxelised: head and neck, mouth socket, eye sockets,
gums and tongue, teeth, eyeballs, eyelashes. The lacrimal fluid, eye blend and eye occlusion meshes are not
rendered (their vertices stay, unused): they are transparent overlays that an opaque renderer would draw as grey
films over the eyes. The corrective expression ``mouthClose`` is left out (:data:`CORRECTIVE_EXPRESSIONS`).
Lengths are converted to mm; quads are split into two triangles.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from data_prep.face_model import HEAD_PARTS, FaceModel, ModelHead

FACE_REGION = "face"
PART_OF_REGION = {
    "head_and_neck": "skin", "mouth_socket": "mouth", "eye_socket_left": "skin", "eye_socket_right": "skin",
    "gums_and_tongue": "gums", "teeth": "teeth", "eyeball_left": "eye", "eyeball_right": "eye",
    "eyelashes_left": "lashes", "eyelashes_right": "lashes",
}
"""How each rendered region other than the face is coloured (:data:`~data_prep.face_model.HEAD_PARTS`);
regions not named here (the transparent overlays) are not rendered."""
CORRECTIVE_EXPRESSIONS = ("mouthClose",)
"""Expression shapes left out: ARKit's ``mouthClose`` corrects ``jawOpen`` (closes the lips over an open jaw); alone it
pushes the upper lip 25 mm through the lower one (tests/test_ict.py), so a sampler drawing shapes independently
must not see it."""
REQUIRED_ARRAYS = ("neutral", "faces", "identity", "expressions", "expression_names", "landmarks_68",
                   "region_names", "region_ranges")
MM_PER_CM = 10.0


def load_ict(path) -> FaceModel:
    """The ICT Face Model in ``path`` (the ``.npz``, or a folder holding ``ict_face_model.npz``) as a
    :class:`FaceModel` of its face region with the rest of the head as its :class:`ModelHead`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "ict_face_model.npz"
    if not path.is_file():
        raise FileNotFoundError(f"ICT Face Model file {path} not found: pass 'ict:/path/to/ict_face_model.npz'")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in REQUIRED_ARRAYS if name not in arrays.files]
            data = {} if missing else {name: arrays[name] for name in REQUIRED_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # truncated or not an .npz
        raise ValueError(f"{path} is not a readable ICT Face Model .npz ({type(error).__name__}: {error})") from None
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing} of an ICT Face Model .npz (it needs {list(REQUIRED_ARRAYS)})")
    regions = {str(name): (int(lo), int(hi)) for name, (lo, hi) in zip(data["region_names"], data["region_ranges"])}
    if regions.get(FACE_REGION, (None,))[0] != 0:
        raise ValueError(f"{path}: the '{FACE_REGION}' region must be the first vertices (0..k), got "
                         f"{regions.get(FACE_REGION)}")
    num_face = regions[FACE_REGION][1] + 1
    neutral = data["neutral"].astype(np.float32) * MM_PER_CM
    identity = data["identity"].astype(np.float32) * MM_PER_CM
    names = [str(name) for name in data["expression_names"]]
    kept = [k for k, name in enumerate(names) if name not in CORRECTIVE_EXPRESSIONS]
    expressions = data["expressions"][kept].astype(np.float32) * MM_PER_CM

    rendered = np.zeros(len(neutral), dtype=bool)
    rendered[:num_face] = True
    part = np.zeros(len(neutral), dtype=np.uint8)
    for name, (lo, hi) in regions.items():
        if name in PART_OF_REGION:
            rendered[lo:hi + 1] = True
            part[lo:hi + 1] = HEAD_PARTS.index(PART_OF_REGION[name])
    triangles = _triangles(data["faces"])
    triangles = triangles[rendered[triangles].all(axis=1)]
    face_only = (triangles < num_face).all(axis=1)
    triangles = _facing_camera(triangles, neutral, face_only)

    return FaceModel(
        name="ict",
        mean=neutral[:num_face],
        identity_basis=identity[:, :num_face],
        expression_basis=expressions[:, :num_face],
        expression_names=[names[k] for k in kept],
        triangles=triangles[face_only],
        landmark_vertices=data["landmarks_68"].astype(np.int64),
        face_region=np.arange(num_face, dtype=np.int64),
        head=ModelHead(mean=neutral[num_face:], identity_basis=identity[:, num_face:],
                       expression_basis=expressions[:, num_face:], triangles=triangles[~face_only],
                       part=part[num_face:]),
    ).validate()


def _triangles(quads: np.ndarray) -> np.ndarray:
    """(T, 3) int64 triangles of ``(Q, 4)`` quads (-1 as the 4th index of a triangle): each quad split along 0-2."""
    quads = np.asarray(quads, dtype=np.int64)
    if quads.ndim != 2 or quads.shape[1] != 4:
        raise ValueError(f"ICT faces must be (Q, 4) quads, got shape {quads.shape}")
    return np.concatenate([quads[:, [0, 1, 2]], quads[quads[:, 3] >= 0][:, [0, 2, 3]]])


def _facing_camera(triangles: np.ndarray, vertices: np.ndarray, face_only: np.ndarray) -> np.ndarray:
    """``triangles`` reversed if the face's area-weighted normal points away from the camera (-z): ours are
    counter-clockwise seen from the front."""
    corners = vertices[triangles[face_only]].astype(np.float64)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).sum(axis=0)
    return triangles if normal[2] > 0 else triangles[:, ::-1].copy()
