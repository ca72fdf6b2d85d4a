"""Reader for the Surrey Face Model (SFM, from the eos project): shape PCA model + expression blendshapes.

Files expected in one directory: ``sfm_shape_3448.bin`` and ``expression_blendshapes_3448.bin``
(cereal portable binary, little-endian), ``ibug_to_sfm.txt`` (iBUG-68 -> vertex id, 50 of 68) and
``sfm_model_contours.json`` (face outline vertex chains).

Shape file layout: uint32 class version; the shape PcaModel as mean, orthonormal basis and
eigenvalues, each an Eigen matrix (int32 rows, int32 cols, float32 data column-major), then the
triangle list (uint64 count + int32 x3 each); a colour PcaModel in the same layout (empty); texture
coordinates (uint64 count + float64 x2 each). Blendshapes file: uint64 count, then per blendshape
a name (uint64 length + bytes) and an Eigen matrix (3V x 1).

The SFM frame already is ours (mm, x toward the subject's left, y up, z toward the camera,
triangles counter-clockwise seen from the front), so no axis change is applied.

Landmarks the mapping file leaves out are filled as follows:
- jaw contour (iBUG 1-8 and 10-17, 1-based): the eos contour chains run from above the ear
  down to beside the chin. We keep the part at or below the height of the outer eye corner,
  append the chin vertex (iBUG 9) and take, in iBUG order, the chain vertices nearest 8
  equally spaced arc-length positions (frontal x-y projection) from that start to the chin.
- inner mouth corners (iBUG 61 and 65): the SFM mouth opening ends at the outer mouth corner
  vertices, so these reuse the vertices of iBUG 49 and 55.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from data_prep.face_model import FaceModel
from lightning_vrn.landmark_scheme import GROUPS, NUM_LANDMARKS, OUTER_EYE_CORNERS

SHAPE_FILE = "sfm_shape_3448.bin"
BLENDSHAPES_FILE = "expression_blendshapes_3448.bin"
LANDMARKS_FILE = "ibug_to_sfm.txt"
CONTOURS_FILE = "sfm_model_contours.json"
REQUIRED_FILES = (SHAPE_FILE, BLENDSHAPES_FILE, LANDMARKS_FILE, CONTOURS_FILE)

CHIN = 8                         # iBUG 9, 1-based
INNER_MOUTH_CORNERS = {60: 48, 64: 54}   # 0-based: inner corner -> outer corner it reuses
JAW_POINTS_PER_SIDE = 8


class _Reader:
    """Sequential little-endian reader over one file's bytes; errors name the file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.offset = 0

    def _take(self, num_bytes: int, what: str) -> int:
        if num_bytes < 0 or self.offset + num_bytes > len(self.data):
            raise ValueError(f"{self.path}: file ends early while reading {what} (needs {num_bytes} bytes at "
                             f"offset {self.offset}, file has {len(self.data)}); the file is truncated or not "
                             f"an SFM model file")
        start = self.offset
        self.offset += num_bytes
        return start

    def scalar(self, fmt: str, what: str):
        """One little-endian struct scalar (``"I"``, ``"Q"``, ``"i"``)."""
        return struct.unpack_from("<" + fmt, self.data, self._take(struct.calcsize(fmt), what))[0]

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """``count`` little-endian values of ``dtype`` (numpy code, e.g. ``"f4"``)."""
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.data, "<" + dtype, count, self._take(count * itemsize, what)).copy()

    def matrix(self, what: str) -> np.ndarray:
        """An Eigen float32 matrix: int32 rows, int32 cols, column-major data -> (rows, cols)."""
        rows, cols = self.scalar("i", what + " rows"), self.scalar("i", what + " cols")
        if rows < 0 or cols < 0:
            raise ValueError(f"{self.path}: {what} has a negative size {rows}x{cols}; not an SFM model file")
        return self.array("f4", rows * cols, what).reshape(cols, rows).T

    def triangles(self, what: str) -> np.ndarray:
        """uint64 count + int32 x3 each -> (T, 3) int64."""
        count = self.scalar("Q", what + " count")
        return self.array("i4", 3 * count, what).reshape(-1, 3).astype(np.int64)

    def finish(self):
        """Raise if bytes are left over (a different file layout)."""
        if self.offset != len(self.data):
            raise ValueError(f"{self.path}: {len(self.data) - self.offset} unexpected bytes after the model; "
                             f"not the SFM layout this reader knows")


def read_shape_model(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``sfm_shape_*.bin`` -> mean (V, 3), basis (3V, K) orthonormal, eigenvalues (K,), triangles (T, 3)."""
    reader = _Reader(path)
    reader.scalar("I", "class version")
    mean = reader.matrix("shape mean")
    basis = reader.matrix("shape basis")
    eigenvalues = reader.matrix("shape eigenvalues")
    triangles = reader.triangles("triangle list")
    for part in ("mean", "basis", "eigenvalues"):
        reader.matrix(f"colour {part}")
    reader.triangles("colour triangle list")
    texture_count = reader.scalar("Q", "texture coordinate count")
    reader.array("f8", 2 * texture_count, "texture coordinates")
    reader.finish()
    if mean.shape[1] != 1 or mean.shape[0] % 3 or basis.shape[0] != mean.shape[0] \
            or eigenvalues.shape != (basis.shape[1], 1):
        raise ValueError(f"{path}: inconsistent shape model sizes: mean {mean.shape}, basis {basis.shape}, "
                         f"eigenvalues {eigenvalues.shape}")
    return mean.reshape(-1, 3), basis, eigenvalues[:, 0], triangles


def read_blendshapes(path: Path, num_vertices: int) -> tuple[list[str], np.ndarray]:
    """Read ``expression_blendshapes_*.bin`` -> names and offsets (K, V, 3)."""
    reader = _Reader(path)
    names, offsets = [], []
    for index in range(reader.scalar("Q", "blendshape count")):
        length = reader.scalar("Q", f"blendshape {index} name length")
        names.append(reader.array("u1", length, f"blendshape {index} name").tobytes().decode("utf-8"))
        offset = reader.matrix(f"blendshape {names[-1]!r}")
        if offset.shape != (3 * num_vertices, 1):
            raise ValueError(f"{path}: blendshape {names[-1]!r} has shape {offset.shape}, expected "
                             f"({3 * num_vertices}, 1) for a {num_vertices}-vertex model")
        offsets.append(offset.reshape(num_vertices, 3))
    reader.finish()
    return names, np.stack(offsets) if offsets else np.zeros((0, num_vertices, 3), np.float32)


def read_landmark_mapping(path: Path) -> dict[int, int]:
    """Read ``ibug_to_sfm.txt`` -> {0-based iBUG index: vertex id} from its ``[landmark_mappings]`` table."""
    mapping, in_table = {}, False
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            in_table = line == "[landmark_mappings]"
        elif in_table and line:
            match = re.fullmatch(r"(\d+)\s*=\s*(\d+)", line)
            if not match:
                raise ValueError(f"{path}: cannot parse landmark mapping line {line!r}")
            mapping[int(match[1]) - 1] = int(match[2])
    if not mapping:
        raise ValueError(f"{path}: no [landmark_mappings] entries found")
    return mapping


def _jaw_from_contour(mean: np.ndarray, chain: list[int], chin: int, start_height: float) -> np.ndarray:
    """8 vertex ids along a contour chain (ear -> chin), equally spaced in frontal arc length, chin excluded."""
    chain = np.asarray(chain, dtype=np.int64)
    below = mean[chain, 1] <= start_height
    if not below.any():
        raise ValueError("SFM contour chain never reaches below the eyes: sfm_model_contours.json does not fit this model")
    first = int(np.argmax(below))
    path = np.append(chain[first:], chin)
    steps = np.linalg.norm(np.diff(mean[path, :2], axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    targets = np.linspace(0.0, arc[-1], JAW_POINTS_PER_SIDE + 1)[:-1]
    return path[np.abs(arc[None, :] - targets[:, None]).argmin(axis=1)]


def load_sfm(directory: Path) -> FaceModel:
    """Load the Surrey Face Model from ``directory`` as a :class:`FaceModel` (all vertices in the face region)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"SFM directory {directory} does not exist; pass 'sfm:DIR' with a directory "
                                f"holding {', '.join(REQUIRED_FILES)}")
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"SFM file {directory / name} is missing; the directory must hold "
                                    f"{', '.join(REQUIRED_FILES)}")
    mean, basis, eigenvalues, triangles = read_shape_model(directory / SHAPE_FILE)
    num_vertices = len(mean)
    names, blendshapes = read_blendshapes(directory / BLENDSHAPES_FILE, num_vertices)
    identity_basis = (basis * np.sqrt(np.maximum(eigenvalues, 0.0))).T.reshape(-1, num_vertices, 3)

    landmarks = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    mapping_file = directory / LANDMARKS_FILE
    for ibug, vertex in read_landmark_mapping(mapping_file).items():
        if not (0 <= ibug < NUM_LANDMARKS and 0 <= vertex < num_vertices):
            raise ValueError(f"{mapping_file}: iBUG landmark {ibug + 1} -> vertex {vertex} is out of range "
                             f"(landmarks 1-{NUM_LANDMARKS}, vertices 0-{num_vertices - 1})")
        landmarks[ibug] = vertex
    needed = [*OUTER_EYE_CORNERS, CHIN, *INNER_MOUTH_CORNERS.values()]
    missing = [i + 1 for i in needed if landmarks[i] < 0]
    if missing:
        raise ValueError(f"{mapping_file} does not map iBUG landmarks {missing}, which the jaw and mouth "
                         f"construction needs; use the eos project's ibug_to_sfm.txt")
    contours = json.loads((directory / CONTOURS_FILE).read_text())
    try:
        right, left = contours["model_contour"]["right_contour"], contours["model_contour"]["left_contour"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{directory / CONTOURS_FILE}: expected model_contour.right_contour/left_contour") from err
    eye_height = mean[landmarks[list(OUTER_EYE_CORNERS)], 1].mean()
    jaw = list(GROUPS["jaw"])
    landmarks[jaw[:CHIN]] = _jaw_from_contour(mean, right, landmarks[CHIN], eye_height)
    landmarks[jaw[CHIN + 1:]] = _jaw_from_contour(mean, left, landmarks[CHIN], eye_height)[::-1]
    for inner, outer in INNER_MOUTH_CORNERS.items():
        landmarks[inner] = landmarks[outer]

    model = FaceModel(
        name="sfm",
        mean=mean.astype(np.float32),
        identity_basis=identity_basis.astype(np.float32),
        expression_basis=blendshapes.astype(np.float32),
        expression_names=names,
        triangles=triangles,
        landmark_vertices=landmarks,
        face_region=np.arange(num_vertices, dtype=np.int64),
    )
    return model.validate()
