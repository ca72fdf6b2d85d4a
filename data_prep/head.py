"""A head around a face, for the image only: skull, ears, neck, shoulders and hair (short, long, a fringe, a beard).

300W-LP's photos show whole people while its volumes hold the face region alone; a synthetic face floating on a
background teaches a network to find the face by its silhouette, which a photo does not have. So the
synthetic data can draw a head around each face (``data_prep.synthetic --heads``): it is rendered with the face,
z-buffered with it (the near ear hides the far background, the nose hides the far cheek, a fringe covers the
forehead), and never voxelised: the target volume stays exactly the face's.

Geometry is in the face model's frame (mm; x image right, y up, z toward the camera) and sized from the face's
own landmarks, so it fits any model: the unit is the outer interocular distance ``io`` (about 90 mm on an adult):

- skull: an ellipsoid ``width * io`` across, ``length * io`` from front to back with its front 5 mm behind the
  brows, its top ``height * io`` above the eye line;
- ears: flat ellipsoids ``ear_size * io`` tall on the skull's sides, between the eye line and the nose's base;
- neck: a vertical ellipsoid ``neck_width * io`` across, from inside the skull to inside the shoulders;
- shoulders: a wide ellipsoid under the neck, in clothing colour;
- hair: the skull above a hairline ``hairline * io`` above the brows at the front, falling below the ears at the
  back, standing ``hair_thickness`` mm off the skull; ``long`` hair adds a curtain behind the ears down to
  ``hair_length * io`` below the chin; a ``fringe`` is a sheet of hair just in front of the forehead, reaching
  that fraction of the way from the hairline to the brows; a ``beard`` paints hair over the lower face.

Every part of the skull, ears, neck, shoulders and curtain that would lie in front of the face seen from the front
is pushed :data:`BEHIND_FACE_MM` behind it, so the face is covered only where hair covers it on purpose (the
fringe). :func:`head_mesh` builds the geometry, :func:`head_albedo` its colours, :func:`beard_weight` the beard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_fill_holes, distance_transform_edt
from scipy.spatial import cKDTree

from lightning_vrn.geometry.raster import rasterise

HAIR_STYLES = ("bald", "short", "long")
PARTS = ("skull", "ear", "neck", "shoulders", "curtain", "fringe")
"""The parts of a :class:`HeadMesh`, in the order they are built (``HeadMesh.part`` indexes this)."""
BEHIND_FACE_MM = 2.0
"""How far behind the face's surface (seen from the front) head parts that would cover it are pushed (mm)."""
FRINGE_OFFSET_MM = 2.5
"""How far in front of the forehead the fringe's sheet lies (mm)."""
HAIR_TAPER_MM = 15.0
"""Distance from the face over which hair on a model's own scalp grows to its full thickness (mm)."""
DEPTH_MAP_MM = 1.5
"""Pixel size (mm) of the face's frontal depth map used to push head parts behind the face."""

# Landmark ids (iBUG-68, 0-based) the head is sized from.
_JAW_ENDS, _CHIN, _BROWS, _EYE_CORNERS, _NOSE_BASE, _MOUTH = (0, 16), 8, (19, 24), (36, 45), 33, range(48, 60)


@dataclass(eq=False)
class HeadSettings:
    """The random shape and colours of one head (sizes as multiples of the outer interocular distance ``io``)."""

    width: float            # skull breadth / io
    length: float           # skull length, front to back / io
    height: float           # top of the skull above the eye line / io
    ear_size: float         # ear height / io
    neck_width: float       # neck breadth / io
    hair_style: str         # one of HAIR_STYLES
    hairline: float         # front hairline above the brows / io
    hair_thickness: float   # mm the hair stands off the skull
    hair_length: float      # long hair: how far below the chin it reaches / io
    fringe: float           # fraction of the way from the hairline down to the brows the fringe reaches (0: none)
    beard: float            # density of hair over the lower face (0: none)
    hair_colour: np.ndarray      # (3,) RGB albedo
    clothing_colour: np.ndarray  # (3,) RGB albedo
    seed: int               # seeds the hair's strand noise

    @classmethod
    def sample(cls, rng: np.random.Generator, hair_colour: np.ndarray) -> "HeadSettings":
        """A random head with hair of ``hair_colour`` (3,) (the brows' colour, so they match)."""
        style = str(rng.choice(HAIR_STYLES, p=[0.1, 0.5, 0.4]))
        return cls(width=float(rng.uniform(1.5, 1.75)), length=float(rng.uniform(1.95, 2.25)),
                   height=float(rng.uniform(1.15, 1.4)), ear_size=float(rng.uniform(0.6, 0.75)),
                   neck_width=float(rng.uniform(1.0, 1.3)), hair_style=style,
                   hairline=float(rng.uniform(0.35, 0.8)), hair_thickness=float(rng.uniform(2.0, 14.0)),
                   hair_length=float(rng.uniform(0.0, 1.5)),
                   fringe=float(rng.uniform(0.3, 0.85)) if style != "bald" and rng.random() < 0.35 else 0.0,
                   beard=float(rng.uniform(0.2, 0.9)) if rng.random() < 0.15 else 0.0,
                   hair_colour=np.asarray(hair_colour, dtype=np.float64),
                   clothing_colour=rng.uniform(0.05, 0.9, size=3), seed=int(rng.integers(2**31)))


@dataclass(eq=False)
class HeadMesh:
    """A head's geometry: ``vertices`` (R, 3) mm in the model frame, ``triangles`` (T, 3) ids into them,
    counter-clockwise seen from outside; per vertex the ``hair`` cover (R,) in [0, 1] and the ``part`` (R,) uint8,
    an index into :data:`PARTS`."""

    vertices: np.ndarray
    triangles: np.ndarray
    hair: np.ndarray
    part: np.ndarray


@dataclass(frozen=True)
class FaceFrame:
    """Where the face is, from its landmarks (mm): eye line ``eye_y``, brows ``brow_y`` and depth ``brow_z``,
    nose base ``nose_base_y``, chin ``chin_y``, midline ``centre_x`` and interocular ``io``."""

    io: float
    centre_x: float
    eye_y: float
    brow_y: float
    brow_z: float
    nose_base_y: float
    chin_y: float

    @classmethod
    def of(cls, face: np.ndarray, landmark_vertices: np.ndarray) -> "FaceFrame":
        needed = [*_JAW_ENDS, _CHIN, *_BROWS, *_EYE_CORNERS, _NOSE_BASE]
        ids = np.asarray(landmark_vertices, dtype=np.int64)
        if ids.shape != (68,) or (ids[needed] < 0).any():
            raise ValueError(f"a head is sized from the face's landmarks {needed}: the face model lacks some of them "
                             f"(landmark vertex ids {ids[needed].tolist()}); use it without --heads")
        points = face[ids]
        corners = points[list(_EYE_CORNERS)]
        return cls(io=float(np.linalg.norm(corners[1] - corners[0])), centre_x=float(points[list(_JAW_ENDS), 0].mean()),
                   eye_y=float(corners[:, 1].mean()), brow_y=float(points[list(_BROWS), 1].mean()),
                   brow_z=float(points[list(_BROWS), 2].mean()), nose_base_y=float(points[_NOSE_BASE, 1]),
                   chin_y=float(points[_CHIN, 1]))


def ellipsoid(centre, radii, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed ellipsoid: ``(rows * columns + 2, 3)`` vertices and triangles counter-clockwise seen from outside."""
    polar = np.linspace(0.0, np.pi, rows + 2)[1:-1, None]
    azimuth = np.linspace(0.0, 2 * np.pi, columns, endpoint=False)[None]
    unit = np.stack([np.sin(polar) * np.sin(azimuth), np.cos(polar) + 0 * azimuth,
                     np.sin(polar) * np.cos(azimuth)], -1).reshape(-1, 3)
    unit = np.vstack([unit, [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]])
    top, bottom = rows * columns, rows * columns + 1
    ring = np.arange(rows - 1)[:, None] * columns
    a = (ring + np.arange(columns)).ravel()
    b = (ring + (np.arange(columns) + 1) % columns).ravel()
    column = np.arange(columns)
    last = (rows - 1) * columns
    triangles = np.concatenate([np.stack([a, b, a + columns], 1), np.stack([b, b + columns, a + columns], 1),
                                np.stack([np.full(columns, top), (column + 1) % columns, column], 1),
                                np.stack([np.full(columns, bottom), last + column, last + (column + 1) % columns], 1)])
    return np.asarray(centre) + unit * np.asarray(radii), _outward(unit, triangles)


def _outward(unit: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``triangles`` each turned to be counter-clockwise seen from outside the unit shape ``unit`` (V, 3)."""
    corners = unit[triangles]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    inward = np.einsum("tc,tc->t", normal, corners.mean(1)) < 0
    return np.where(inward[:, None], triangles[:, ::-1], triangles)


def head_mesh(face: np.ndarray, depth: "FrontalDepth", landmark_vertices: np.ndarray,
              settings: HeadSettings, own_head: bool = False) -> HeadMesh:
    """The head around a ``(V, 3)`` model-frame face (mm) with its :class:`FrontalDepth` ``depth`` and (68,)
    landmark vertex ids.

    ``own_head``: the face model renders a head of its own (the ICT model), so only the long hair's curtain, the
    fringe and the shoulders are made (its scalp gets hair from :func:`scalp_hair`)."""
    frame = FaceFrame.of(face, landmark_vertices)
    io = frame.io
    centre, radii = _skull(frame, settings)
    neck_centre = (frame.centre_x, frame.chin_y - 0.6 * io, centre[2] + 0.2 * radii[2])
    parts = [] if own_head else _skull_ears_neck(frame, settings, centre, radii, neck_centre)
    shoulders, shoulder_triangles = ellipsoid((frame.centre_x, frame.chin_y - 2.1 * io, neck_centre[2]),
                                              np.array([2.1, 0.75, 0.9]) * io, 20, 48)
    parts.append((shoulders, shoulder_triangles, np.zeros(len(shoulders)), "shoulders"))
    if settings.hair_style == "long":
        curtain_radii = radii * (1.12 if own_head else 1.0) + settings.hair_thickness + 3.0  # clear of a model's head
        bottom = frame.chin_y - settings.hair_length * io
        curtain_radii[1] = centre[1] - bottom
        curtain, curtain_triangles = ellipsoid(centre, curtain_radii, 30, 60)
        # Only its back: a closed curtain's front would cut across the face between the depth map's samples.
        curtain_triangles = curtain_triangles[(curtain[curtain_triangles, 2] < centre[2] + 0.35 * radii[2]).all(1)]
        parts.append((curtain, curtain_triangles, np.ones(len(curtain)), "curtain"))

    parts = [(depth.push_behind(part_vertices), *rest) for part_vertices, *rest in parts]
    if settings.fringe > 0:
        parts.append((*_fringe(depth, frame, settings), "fringe"))
    vertices, triangles, hair_cover, labels, offset = [], [], [], [], 0
    for part_vertices, part_triangles, part_hair, name in parts:
        vertices.append(part_vertices)
        triangles.append(part_triangles + offset)
        hair_cover.append(part_hair)
        labels.append(np.full(len(part_vertices), PARTS.index(name), dtype=np.uint8))
        offset += len(part_vertices)
    return HeadMesh(np.vstack(vertices), np.vstack(triangles), np.concatenate(hair_cover), np.concatenate(labels))


def _skull(frame: FaceFrame, settings: HeadSettings) -> tuple[np.ndarray, np.ndarray]:
    """Centre (3,) and radii (3,) of the skull's ellipsoid (mm)."""
    radii = np.array([settings.width / 2, settings.height + 0.15, settings.length / 2]) * frame.io
    return np.array([frame.centre_x, frame.eye_y - 0.15 * frame.io, frame.brow_z - 5.0 - radii[2]]), radii


def scalp_hair(scalp: np.ndarray, face: np.ndarray, landmark_vertices: np.ndarray,
               settings: HeadSettings) -> tuple[np.ndarray, np.ndarray]:
    """Hair on a face model's own head: its ``(R, 3)`` scalp vertices (mm) moved out by the hair's thickness where
    hair covers them, and the (R,) cover, by the same hairline as the skull of :func:`head_mesh`. The thickness
    tapers to nothing over :data:`HAIR_TAPER_MM` toward the face, whose vertices never move (no step where the
    scalp meets the face)."""
    frame = FaceFrame.of(face, landmark_vertices)
    taper = np.clip(cKDTree(face).query(scalp)[0] / HAIR_TAPER_MM, 0.0, 1.0)
    return _with_hair(scalp, *_skull(frame, settings), frame, settings, taper)


def face_hair(face: np.ndarray, landmark_vertices: np.ndarray, settings: HeadSettings) -> np.ndarray:
    """(V,) hair cover of the face's own vertices above the hairline (their colour only: the face stays where it is,
    as the volume is made from it)."""
    frame = FaceFrame.of(face, landmark_vertices)
    return _hair_cover(face, *_skull(frame, settings), frame, settings)


def _with_hair(points: np.ndarray, centre: np.ndarray, radii: np.ndarray, frame: FaceFrame,
               settings: HeadSettings, taper=1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(R, 3)`` head points moved away from the skull's centre by ``hair_thickness`` times their hair cover and
    ``taper`` (a scalar or (R,)), and the (R,) cover (:func:`_hair_cover`)."""
    hair = _hair_cover(points, centre, radii, frame, settings)
    outward = (points - centre) / np.maximum(np.linalg.norm(points - centre, axis=1, keepdims=True), 1e-9)
    return points + outward * (settings.hair_thickness * hair * taper)[:, None], hair


def _skull_ears_neck(frame: FaceFrame, settings: HeadSettings, centre: np.ndarray, radii: np.ndarray,
                     neck_centre: tuple) -> list[tuple]:
    """The skull (with its hair), two ears and the neck as :func:`head_mesh`'s parts:
    ``(vertices, triangles, hair cover, part name)`` each."""
    io = frame.io
    skull, skull_triangles = ellipsoid(centre, radii, 36, 72)
    skull, hair = _with_hair(skull, centre, radii, frame, settings)
    parts = [(skull, skull_triangles, hair, "skull")]
    ear_y = 0.5 * (frame.eye_y + frame.nose_base_y)
    ear_z = centre[2] + 0.1 * radii[2]
    ear_radii = np.array([0.09, settings.ear_size / 2, 0.2]) * io
    for side in (-1.0, 1.0):
        reach = 1.0 - ((ear_y - centre[1]) / radii[1]) ** 2 - ((ear_z - centre[2]) / radii[2]) ** 2
        ear_x = centre[0] + side * (radii[0] * np.sqrt(max(reach, 0.0)) + 0.05 * io)
        ear, ear_triangles = ellipsoid((ear_x, ear_y, ear_z), ear_radii, 10, 20)
        parts.append((ear, ear_triangles, np.zeros(len(ear)), "ear"))
    neck, neck_triangles = ellipsoid(neck_centre, np.array([settings.neck_width / 2, 1.1, 0.6]) * io, 24, 32)
    parts.append((neck, neck_triangles, np.zeros(len(neck)), "neck"))
    return parts


def _hair_cover(points: np.ndarray, centre: np.ndarray, radii: np.ndarray, frame: FaceFrame,
                settings: HeadSettings) -> np.ndarray:
    """(R,) hair cover of head points: 1 above the hairline (the brows' height plus ``hairline * io`` at the
    front, falling to below the ears at the back), a 3 mm ramp across it; 0 for a bald head."""
    if settings.hair_style == "bald":
        return np.zeros(len(points))
    front_line = frame.brow_y + settings.hairline * frame.io
    back_line = frame.nose_base_y - 0.3 * frame.io
    towards_back = np.clip((centre[2] + 0.3 * radii[2] - points[:, 2]) / (0.9 * radii[2]), 0.0, 1.0)
    hairline = front_line + (back_line - front_line) * towards_back
    return np.clip((points[:, 1] - hairline) / 3.0 + 0.5, 0.0, 1.0)


def _fringe(depth: "FrontalDepth", frame: FaceFrame, settings: HeadSettings) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """A sheet of hair :data:`FRINGE_OFFSET_MM` in front of the forehead, from above the hairline down to
    ``fringe`` of the way to the brows, its lower edge uneven: vertices, triangles, hair cover (all 1)."""
    rng = np.random.default_rng(settings.seed)
    top = frame.brow_y + settings.hairline * frame.io + 10.0
    reach = frame.brow_y + (1.0 - settings.fringe) * settings.hairline * frame.io
    columns, rows = 48, 16
    x = frame.centre_x + np.linspace(-0.85, 0.85, columns) * frame.io
    lower = reach + np.repeat(rng.uniform(-0.06, 0.06, size=columns // 4 + 1) * frame.io, 4)[:columns]
    y = lower[None, :] + (top - lower)[None, :] * np.linspace(0.0, 1.0, rows)[:, None]   # (rows, columns)
    points = np.stack([np.broadcast_to(x, y.shape), y, np.zeros_like(y)], -1).reshape(-1, 3)
    z, covered = depth.at(points[:, :2])
    points[:, 2] = np.where(covered, z + FRINGE_OFFSET_MM, -np.inf)
    a = (np.arange(rows - 1)[:, None] * columns + np.arange(columns - 1)).ravel()
    triangles = np.concatenate([np.stack([a, a + 1, a + columns], 1), np.stack([a + 1, a + columns + 1, a + columns], 1)])
    triangles = triangles[np.isfinite(points[triangles, 2]).all(1)]   # only over the face
    return np.nan_to_num(points, neginf=0.0), triangles, np.ones(len(points))


class FrontalDepth:
    """The face seen from the front: its nearest z (mm) on a :data:`DEPTH_MAP_MM` grid over x, y."""

    def __init__(self, face: np.ndarray, triangles: np.ndarray):
        self.origin = np.array([face[:, 0].min() - DEPTH_MAP_MM, face[:, 1].max() + DEPTH_MAP_MM])
        width, height = np.ceil((face[:, :2].max(0) - face[:, :2].min(0)) / DEPTH_MAP_MM).astype(int) + 3
        # rasterise takes image coordinates: x right, y down, z away from the viewer.
        image = np.column_stack([(face[:, 0] - self.origin[0]) / DEPTH_MAP_MM,
                                 (self.origin[1] - face[:, 1]) / DEPTH_MAP_MM, -face[:, 2]])
        depth = -rasterise(image, triangles, height, width).depth   # -inf where the face is not
        # Openings (eyes, mouth) take the depth of the nearest face pixel, so nothing shows through them.
        holes = binary_fill_holes(np.isfinite(depth)) & ~np.isfinite(depth)
        if holes.any():
            nearest = distance_transform_edt(~np.isfinite(depth), return_distances=False, return_indices=True)
            depth[holes] = depth[tuple(index[holes] for index in nearest)]
        self.depth = depth

    def at(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The face's front z (mm) at ``(N, 2)`` model x, y (its nearest pixel) and whether the face is there."""
        col = np.round((xy[:, 0] - self.origin[0]) / DEPTH_MAP_MM).astype(int)
        row = np.round((self.origin[1] - xy[:, 1]) / DEPTH_MAP_MM).astype(int)
        inside = (col >= 0) & (row >= 0) & (col < self.depth.shape[1]) & (row < self.depth.shape[0])
        z = np.full(len(xy), -np.inf)
        z[inside] = self.depth[row[inside], col[inside]]
        return z, np.isfinite(z)

    def push_behind(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` points with those in front of the face's surface (or closer than :data:`BEHIND_FACE_MM`)
        moved straight back to :data:`BEHIND_FACE_MM` behind it."""
        z, covered = self.at(points[:, :2])
        limit = np.where(covered, z - BEHIND_FACE_MM, np.inf)
        return np.column_stack([points[:, :2], np.minimum(points[:, 2], limit)])


def head_albedo(head: HeadMesh, skin: np.ndarray, settings: HeadSettings) -> np.ndarray:
    """``(R, 3)`` albedo of the head's vertices: ``skin`` (R, 3) (the face's skin albedo at those points) with hair
    where it covers (:func:`hair_albedo`), clothing colour on the shoulders."""
    albedo = hair_albedo(head.vertices, skin, head.hair, settings)
    albedo[head.part == PARTS.index("shoulders")] = settings.clothing_colour
    return albedo


def hair_albedo(points: np.ndarray, skin: np.ndarray, cover: np.ndarray, settings: HeadSettings) -> np.ndarray:
    """``(R, 3)`` albedo of ``(R, 3)`` points (mm): ``skin`` (R, 3) blended by ``cover`` (R,) with the hair's
    colour times a strand-like noise."""
    rng = np.random.default_rng(settings.seed + 1)
    strands = 1.0 + 0.25 * np.sin(points[:, 0] * rng.uniform(0.8, 1.6) + rng.uniform(0, 2 * np.pi)) \
        * np.sin(points[:, 2] * rng.uniform(0.5, 1.2))
    hair = np.clip(settings.hair_colour * strands[:, None], 0.0, 1.0)
    return skin + (hair - skin) * cover[:, None]


def beard_weight(face: np.ndarray, landmark_vertices: np.ndarray, settings: HeadSettings) -> np.ndarray:
    """(V,) how much beard covers each face vertex: ``beard`` density below the nose's base, above the jaw's
    border and outside the lips, with strand noise; zeros without a beard."""
    if settings.beard <= 0:
        return np.zeros(len(face))
    frame = FaceFrame.of(face, landmark_vertices)
    lips = face[np.asarray(landmark_vertices)[list(_MOUTH)]]
    lip_centre, lip_radii = lips[:, :2].mean(0), (lips[:, :2].max(0) - lips[:, :2].min(0)) / 2 + 2.0
    outside_lips = (((face[:, :2] - lip_centre) / lip_radii) ** 2).sum(1) > 1.0
    below_nose = np.clip((frame.nose_base_y - 0.1 * frame.io - face[:, 1]) / 5.0, 0.0, 1.0)
    below_nose *= np.clip((face[:, 1] - frame.chin_y + 15.0) / 5.0, 0.0, 1.0)  # down to 15 mm under the chin
    noise = np.random.default_rng(settings.seed + 2).uniform(0.6, 1.0, size=len(face))
    return settings.beard * below_nose * outside_lips * noise
