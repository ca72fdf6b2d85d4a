"""The one face-like test surface: a left-right symmetric height field (an elliptic dome on a flat
flange, with a nose) meshed on a lattice in model mm, with 68 landmark vertices placed like iBUG's;
posed into a crop, optionally cut open, voxelised, and written as a dataset file."""

from __future__ import annotations

import numpy as np

from lightning_vrn.dataset_file import DatasetWriter
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal
from lightning_vrn.landmark_scheme import FLIP

HALF_WIDTH_MM, HALF_HEIGHT_MM = 75.0, 95.0
FACE_WIDTH = 0.5625
"""Default fraction of the crop width the 150 mm wide face spans: 54 px of a 96 px crop (0.36 px per mm)."""

# Model (x, y) in mm (x to the image right when frontal, y up) of the landmarks on the subject's
# right (negative x) and on the mid line; the rest are their mirror images through FLIP.
_RIGHT_AND_MIDDLE = {
    **{k: (-65 * np.cos(np.pi * k / 16), 10 - 75 * np.sin(np.pi * k / 16)) for k in range(9)},  # jaw 0..8
    **{17 + k: (-55 + 10 * k, 40) for k in range(5)},                                           # right brow
    27: (0, 30), 28: (0, 20), 29: (0, 10), 30: (0, 0),                                          # nose bridge
    31: (-12, -8), 32: (-6, -8), 33: (0, -8),                                                   # nostrils
    36: (-45, 25), 37: (-37, 30), 38: (-27, 30), 39: (-20, 25), 40: (-27, 20), 41: (-37, 20),   # right eye
    48: (-25, -30), 49: (-15, -25), 50: (-6, -23), 51: (0, -24), 57: (0, -41), 58: (-6, -40), 59: (-15, -38),
    60: (-20, -30), 61: (-8, -28), 62: (0, -28), 66: (0, -33), 67: (-8, -33),                   # lips
}


def face_mesh(columns: int = 41, cut=None):
    """Symmetric face in model mm: ``(vertices (V, 3), triangles (T, 3), landmark_vertices (68,))``.

    Over the ellipse ``(x / 75)^2 + (y / 95)^2 <= 1`` (mm; x right, y up, z towards the camera):
    an elliptic dome ``max(60 sqrt(1 - r^2) - 15, 0)`` rising 45 mm from a flat flange plus a nose
    bump 25 mm high, lowered by 30 mm to put the origin mid-depth (flange at z = -30, nose tip at
    40). The planar rim is the deepest part, so it closes the voxelised solid (which has no
    thickness there). A lattice of ``columns`` across the 150 mm width and
    ``round(columns * 95 / 75)`` rows (square-ish cells; 41 columns: about 1,600 vertices; 90:
    about 7,900) keeps the vertices of the triangles inside the ellipse. Landmark ``i`` is the
    lattice vertex nearest an iBUG-like position and ``FLIP[i]`` its mirror vertex, which needs odd
    ``columns`` (a column on the mid line). ``cut`` ``(centre x, centre y, radius x, radius y)`` mm
    drops the triangles with a vertex inside that ellipse (a mouth hole, or a notch where it reaches
    the outline) and keeps every vertex, so the vertices equal the uncut mesh's.
    """
    rows = round(columns * HALF_HEIGHT_MM / HALF_WIDTH_MM)
    x, y = np.meshgrid(np.linspace(-HALF_WIDTH_MM, HALF_WIDTH_MM, columns),
                       np.linspace(-HALF_HEIGHT_MM, HALF_HEIGHT_MM, rows))
    r2 = (x / HALF_WIDTH_MM) ** 2 + (y / HALF_HEIGHT_MM) ** 2
    dome = np.maximum(60.0 * np.sqrt(np.clip(1.0 - r2, 0.0, None)) - 15.0, 0.0)
    nose = 25.0 * np.exp(-((x / 10.0) ** 2) - ((y - 5.0) / 22.0) ** 2)
    lattice = np.stack([x, y, dome + nose - 30.0], -1).reshape(-1, 3)

    ids = np.arange(rows * columns).reshape(rows, columns)
    quads = np.stack([ids[:-1, :-1], ids[:-1, 1:], ids[1:, :-1], ids[1:, 1:]], -1).reshape(-1, 4)
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [1, 3, 2]]])
    triangles = triangles[(r2.ravel() <= 1.0)[triangles].all(axis=1)]
    used, triangles = np.unique(triangles, return_inverse=True)
    triangles = triangles.reshape(-1, 3)
    vertices = lattice[used]

    landmark_cells = np.zeros((68, 2), dtype=np.int64)  # (row, column) on the lattice
    for k, (lx, ly) in _RIGHT_AND_MIDDLE.items():
        cell = (int(np.argmin(np.abs(y[:, 0] - ly))), int(np.argmin(np.abs(x[0] - lx))))
        landmark_cells[k] = cell
        landmark_cells[FLIP[k]] = (cell[0], columns - 1 - cell[1])
    landmark_vertices = np.searchsorted(used, ids[landmark_cells[:, 0], landmark_cells[:, 1]])

    if cut is not None:
        cut_x, cut_y, radius_x, radius_y = cut
        inside = ((vertices[:, 0] - cut_x) / radius_x) ** 2 + ((vertices[:, 1] - cut_y) / radius_y) ** 2 < 1.0
        triangles = triangles[~inside[triangles].any(axis=1)]
    return vertices, triangles, landmark_vertices


def to_crop(vertices_mm, grid: VoxelGrid, pose, offset_px=(0.0, 0.0), face_width: float = FACE_WIDTH):
    """Pose model-mm vertices (V, 3) into ``grid``'s crop: ``(vertices_crop (V, 3) px, rotation (3, 3))``.

    The 150 mm wide face spans ``face_width`` of the crop width (default ``FACE_WIDTH``), with its
    origin at the crop centre plus ``offset_px`` (x, y) and at the grid's depth centre.
    ``rotation`` is ``crop_rotation(pose)``.
    """
    scale = face_width * grid.crop_size / (2 * HALF_WIDTH_MM)  # px per mm
    centre = ((grid.width - 1) / 2 + offset_px[0], (grid.height - 1) / 2 + offset_px[1], grid.z_centre)
    return model_to_crop(vertices_mm, pose, scale, centre), crop_rotation(pose)


def posed_face(grid: VoxelGrid, pose, offset_px=(0.0, 0.0), face_width: float = FACE_WIDTH, columns: int = 41,
               cut=None):
    """The face posed in ``grid``'s crop: ``(vertices_crop (V, 3) px, triangles (T, 3), landmark_vertices (68,),
    rotation (3, 3))``; ``columns`` and ``cut`` as in :func:`face_mesh`, the rest as in :func:`to_crop`."""
    vertices_mm, triangles, landmark_vertices = face_mesh(columns, cut)
    vertices, rotation = to_crop(vertices_mm, grid, pose, offset_px, face_width)
    return vertices, triangles, landmark_vertices, rotation


def shaded_image(vertices, triangles, grid: VoxelGrid, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: the face (crop px vertices (V, 3), triangles (T, 3)) shaded by depth over a noisy background."""
    raster = rasterise(vertices, triangles, grid.height, grid.width)
    near = np.where(raster.mask, (raster.depth.max(where=raster.mask, initial=-np.inf) - raster.depth) / 25.0, 0.0)
    image = 0.2 + 0.1 * rng.random((grid.height, grid.width, 3)) + near[..., None] * np.array([0.7, 0.5, 0.4])
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def toy_sample(grid: VoxelGrid, pose, offset_px=(0.0, 0.0), rng=None, frontal: bool = False) -> dict:
    """A DatasetWriter sample of the posed face (plus ``triangles``, ``landmark_vertices``, ``rotation``)."""
    rng = rng or np.random.default_rng(0)
    vertices, triangles, landmark_vertices, rotation = posed_face(grid, pose, offset_px)
    sample = {
        "image": shaded_image(vertices, triangles, grid, rng),
        "volume": voxelise(vertices, triangles, rotation, grid),
        "landmarks_2d": vertices[landmark_vertices, :2].astype(np.float32),
        "landmarks_3d": vertices[landmark_vertices].astype(np.float32),
        "pose": np.asarray(pose, dtype=np.float32),
        "vertices": vertices.astype(np.float32),
    }
    if frontal:
        sample["volume_frontal"] = voxelise_frontal(vertices, triangles, rotation, grid)
    return {**sample, "triangles": triangles, "landmark_vertices": landmark_vertices, "rotation": rotation}


TOY_EXPRESSIONS = ("neutral", "smile", "frown")
"""Expression label names of a toy file written with ``expressions=True``: sample ``i`` has label ``i % 3``."""


def write_toy_dataset(path, grid: VoxelGrid, num_samples: int, seed: int = 0, frontal: bool = False,
                      expressions: bool = False):
    """Write ``num_samples`` randomly posed toy faces to ``path``; returns the list of samples written.

    ``expressions``: store expression labels (:data:`TOY_EXPRESSIONS`, sample ``i`` gets ``i % 3``).
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        pose = rng.uniform([-0.3, -0.7, -0.3], [0.3, 0.7, 0.3])
        samples.append(toy_sample(grid, pose, rng.uniform(-4, 4, 2), rng, frontal))
    first = samples[0]
    writer = DatasetWriter(path, grid, num_samples, len(first["vertices"]), first["triangles"],
                           face_region=np.arange(len(first["vertices"])), landmark_vertices=first["landmark_vertices"],
                           attrs={"face_model": "toy", "source": "tests/helpers/toy_face.py", "created_by": "tests",
                                  "seed": seed},
                           with_frontal=frontal, expression_names=TOY_EXPRESSIONS if expressions else None)
    keys = ["image", "volume", "landmarks_2d", "landmarks_3d", "pose", "vertices"]
    keys += ["volume_frontal"] if frontal else []
    for index, sample in enumerate(samples):
        labels = {"expression_label": index % len(TOY_EXPRESSIONS)} if expressions else {}
        writer.write(index, {**{key: sample[key] for key in keys}, **labels})
    writer.finish()
    return samples
