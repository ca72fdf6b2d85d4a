"""Accessories in front of a face, for the image only: glasses, a hat, a microphone, locks of hair.

People in photographs wear glasses and hats, speak into microphones and have hair across their faces; a network
that never saw them takes a rim for a brow or a brim for a forehead. Each accessory is geometry in the face
model's frame (mm; x image right, y up, z toward the camera), sized from the face's own landmarks like the head of
:mod:`data_prep.head` and placed clear of the face's surface with its frontal depth map, so it is z-buffered with
the face and hides it correctly at any pose. It is never voxelised: the target volume stays the face's.

- ``glasses``: an elliptic rim around each eye in one plane in front of everything of the face inside the rims, a
  bridge in front of the nose, temples out past the sides of the face and back toward the ears; dark lenses (sun
  glasses) in some;
- ``hat``: a crown over a skull-sized ellipsoid down to a band above the brows (in front of the forehead where it
  covers it), with a peak in front (a cap) or a brim all round;
- ``microphone``: a ball on a handle in front of the mouth or chin, the handle going down and toward the camera;
- ``locks``: two to five tapering bundles of hair from above the hairline across the forehead, an eye or a
  cheek, :data:`LOCK_OFFSET_MM` off the skin.

:func:`accessory_mesh` builds them with their colours; :class:`Accessories` holds what one image wears.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.head import FaceFrame, FrontalDepth, ellipsoid
from lightning_vrn.landmark_scheme import GROUPS

ACCESSORY_KINDS = ("glasses", "hat", "microphone", "locks")
CLEARANCE_MM = 2.0
"""How far an accessory's surface stays in front of the face's surface where it covers it (glasses, hat)."""
LOCK_OFFSET_MM = 1.0
"""Gap between a lock of hair's surface and the skin under it."""
TUBE_SIDES = 8


@dataclass(frozen=True)
class Accessories:
    """What one image wears: ``kinds`` (each one of :data:`ACCESSORY_KINDS`, none twice) and the ``seed`` of their
    shapes and colours."""

    kinds: tuple[str, ...]
    seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Accessories":
        """One accessory, or two of different kinds (one time in four)."""
        count = 2 if rng.random() < 0.25 else 1
        kinds = tuple(str(kind) for kind in rng.choice(ACCESSORY_KINDS, size=count, replace=False))
        return cls(kinds=kinds, seed=int(rng.integers(2**31)))


def accessory_mesh(face: np.ndarray, depth: FrontalDepth, landmark_vertices: np.ndarray,
                   accessories: Accessories, hair_colour: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The accessories in front of a ``(V, 3)`` model-frame face (mm) with its :class:`~data_prep.head.FrontalDepth`
    ``depth`` and (68,) landmark vertex ids: vertices (N, 3) mm, triangles (M, 3) counter-clockwise seen from
    outside, albedo (N, 3).
    ``hair_colour`` (3,) colours the locks (the brows' colour, so they match)."""
    frame = FaceFrame.of(face, landmark_vertices)
    landmarks = face[np.asarray(landmark_vertices, dtype=np.int64)]
    vertices, triangles, albedo, offset = [], [], [], 0
    for index, kind in enumerate(accessories.kinds):
        rng = np.random.default_rng([accessories.seed, index])
        if kind == "locks":
            parts = _locks(frame, depth, rng, np.asarray(hair_colour, dtype=np.float64))
        else:
            parts = _BUILDERS[kind](frame, depth, landmarks, face, rng)
        for part_vertices, part_triangles, colour in parts:
            vertices.append(part_vertices)
            triangles.append(part_triangles + offset)
            albedo.append(np.broadcast_to(colour, part_vertices.shape))
            offset += len(part_vertices)
    if not vertices:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3))
    return np.vstack(vertices), np.vstack(triangles), np.vstack(albedo)


# ----------------------------------------------------------------------------- geometry


def tube(path: np.ndarray, radius, closed: bool = False, sides: int = TUBE_SIDES) -> tuple[np.ndarray, np.ndarray]:
    """A tube of ``radius`` mm (a scalar or one per point) along ``path`` (N, 3) mm, open at its ends (or a ring
    when ``closed``): ``(N * sides, 3)`` vertices and triangles counter-clockwise seen from outside."""
    path = np.asarray(path, dtype=np.float64)
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(path),))
    after = np.roll(path, -1, axis=0) if closed else np.vstack([path[1:], 2 * path[-1] - path[-2]])
    before = np.roll(path, 1, axis=0) if closed else np.vstack([2 * path[0] - path[1], path[:-1]])
    tangent = after - before
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    reference = np.eye(3)[np.abs(tangent).sum(0).argsort()]   # the axes, the one the path runs along least first
    normal = np.cross(tangent, reference[0])
    turned = np.linalg.norm(normal, axis=1) < 0.3   # where the path runs along that axis after all
    normal[turned] = np.cross(tangent[turned], reference[1])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    angle = np.linspace(0.0, 2 * np.pi, sides, endpoint=False)
    rings = path[:, None] + radius[:, None, None] * (np.cos(angle)[None, :, None] * normal[:, None]
                                                     + np.sin(angle)[None, :, None] * binormal[:, None])
    segments = len(path) if closed else len(path) - 1
    start = np.arange(segments)[:, None] * sides
    following = (start + sides) % (len(path) * sides)
    a, b = start + np.arange(sides), start + (np.arange(sides) + 1) % sides
    c, d = following + np.arange(sides), following + (np.arange(sides) + 1) % sides
    triangles = np.concatenate([np.stack([a, b, c], -1), np.stack([b, d, c], -1)], axis=1).reshape(-1, 3)
    axis_point = 0.5 * (path[triangles[:, 0] // sides] + path[triangles[:, 2] // sides])
    return rings.reshape(-1, 3), _facing_away_from(rings.reshape(-1, 3), triangles, axis_point)


def _facing_away_from(vertices: np.ndarray, triangles: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``triangles`` each turned so that its normal points away from its point ``inside`` (T, 3)."""
    corners = vertices[triangles]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    flip = np.einsum("tc,tc->t", normal, corners.mean(1) - inside) < 0
    return np.where(flip[:, None], triangles[:, ::-1], triangles)


def _sheet(points: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Triangles of a ``(rows, columns, 3)`` grid of points as one sheet, facing toward ``up`` (3,)."""
    rows, columns = points.shape[:2]
    a = (np.arange(rows - 1)[:, None] * columns + np.arange(columns - 1)).ravel()
    triangles = np.concatenate([np.stack([a, a + 1, a + columns], 1), np.stack([a + 1, a + columns + 1, a + columns], 1)])
    flat = points.reshape(-1, 3)
    return _facing_away_from(flat, triangles, flat[triangles].mean(1) - np.asarray(up, dtype=np.float64))


def _in_front(depth: FrontalDepth, points: np.ndarray, clearance: float) -> np.ndarray:
    """``(N, 3)`` points with those behind the face's surface (or nearer it than ``clearance`` mm) moved straight
    forward to ``clearance`` in front of it."""
    z, covered = depth.at(points[:, :2])
    return np.column_stack([points[:, :2], np.maximum(points[:, 2], np.where(covered, z + clearance, -np.inf))])


def _front_within(depth: FrontalDepth, centre: np.ndarray, half_size: np.ndarray) -> float:
    """The face's largest z (mm) inside the ellipse of ``half_size`` (2,) around ``centre`` (2,) (-inf if none)."""
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 15), np.linspace(-1, 1, 15)), -1).reshape(-1, 2)
    z, covered = depth.at(centre + grid[(grid**2).sum(1) <= 1.0] * half_size)
    return float(z[covered].max()) if covered.any() else -np.inf


# ----------------------------------------------------------------------------- the accessories


def _glasses(frame: FaceFrame, depth: FrontalDepth, landmarks: np.ndarray, face: np.ndarray,
             rng: np.random.Generator) -> list:
    """Rims, bridge, temples and (sun glasses) lenses, each ``(vertices, triangles, colour)``."""
    io = frame.io
    eyes = [landmarks[list(GROUPS[side])].mean(0) for side in ("right_eye", "left_eye")]   # image left, right
    half = np.array([rng.uniform(0.22, 0.3), 0.0]) * io
    half[1] = half[0] * rng.uniform(0.6, 0.9)
    rim = rng.uniform(0.8, 2.0)
    lens_z = max(_front_within(depth, eye[:2], half + rim) for eye in eyes) + rim + rng.uniform(CLEARANCE_MM, 8.0)
    angle = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    frame_colour = rng.choice([[0.03, 0.03, 0.03], [0.35, 0.2, 0.1], [0.7, 0.68, 0.62], rng.uniform(0, 1, 3)])
    parts = []
    for eye in eyes:
        loop = np.column_stack([eye[0] + half[0] * np.cos(angle), eye[1] + half[1] * np.sin(angle),
                                np.full(len(angle), lens_z)])
        parts.append((*tube(loop, rim, closed=True), frame_colour))
    inner = [eyes[0][0] + half[0], eyes[1][0] - half[0]]
    bridge_y = max(eyes[0][1], eyes[1][1]) + 0.3 * half[1]
    bridge = np.column_stack([np.linspace(*inner, 9), bridge_y + 0.15 * half[1] * np.sin(np.linspace(0, np.pi, 9)),
                              np.full(9, lens_z)])
    parts.append((*tube(_in_front(depth, bridge, rim + CLEARANCE_MM), rim), frame_colour))
    near_eyes = np.abs(face[:, 1] - frame.eye_y) < 0.15 * io
    side = np.abs(face[near_eyes, 0] - frame.centre_x).max() + rim + CLEARANCE_MM
    ear_z = frame.brow_z - 5.0 - io   # about the skull's middle, where the ears are
    for sign, eye in ((-1, eyes[0]), (1, eyes[1])):
        outer = eye[0] + sign * half[0]
        corner = frame.centre_x + sign * max(side, abs(outer - frame.centre_x))
        temple = np.array([[outer, eye[1], lens_z], [corner, eye[1], lens_z], [corner, eye[1] - 0.05 * io, ear_z]])
        parts.append((*tube(_along(temple, 3.0), rim), frame_colour))
    if rng.random() < 0.3:   # sun glasses: dark lenses just behind the rims
        tint = rng.uniform(0.02, 0.15) * rng.uniform(0.7, 1.3, size=3)
        for eye in eyes:
            radial = np.linspace(0.0, 1.0, 6)[:, None, None]
            disc = np.concatenate([eye[:2] + radial * (half * np.column_stack([np.cos(angle), np.sin(angle)])),
                                   np.full((6, len(angle), 1), lens_z - 0.5 * rim)], axis=-1)
            disc = np.concatenate([disc, disc[:, :1]], axis=1)   # close the seam
            parts.append((disc.reshape(-1, 3), _sheet(disc, [0.0, 0.0, 1.0]), tint))
    return parts


def _hat(frame: FaceFrame, depth: FrontalDepth, landmarks: np.ndarray, face: np.ndarray,
         rng: np.random.Generator) -> list:
    """A crown down to a band above the brows, and a peak (cap) or a brim, each ``(vertices, triangles, colour)``."""
    io = frame.io
    radii = np.array([rng.uniform(0.92, 1.05), rng.uniform(1.35, 1.55), rng.uniform(1.1, 1.25)]) * io
    centre = np.array([frame.centre_x, frame.eye_y - 0.15 * io, frame.brow_z - radii[2]])
    band_front = frame.brow_y + rng.uniform(0.1, 0.5) * io
    band_back = band_front - rng.uniform(0.0, 0.5) * io

    def band(z):   # the band's height (mm) at depth z, falling from the front to the back
        return band_back + (band_front - band_back) * np.clip((z - centre[2] + radii[2]) / (2 * radii[2]), 0, 1)

    crown, crown_triangles = ellipsoid(centre, radii, 40, 80)
    crown_triangles = crown_triangles[(crown[crown_triangles, 1] >= band(crown[crown_triangles, 2])).all(1)]
    front = crown[:, 2] > centre[2]   # only the crown's front half may be pulled in front of the forehead
    crown[front] = _in_front(depth, crown[front], CLEARANCE_MM)
    colour = rng.uniform(0.05, 0.9, size=3)
    parts = [(crown, crown_triangles, colour)]
    cap = rng.random() < 0.6
    reach = (rng.uniform(0.5, 0.8) if cap else rng.uniform(0.25, 0.6)) * io
    azimuth = np.linspace(-0.45 * np.pi, 0.45 * np.pi, 24) if cap else np.linspace(0.0, 2 * np.pi, 61)
    spread = np.linspace(0.0, 1.0, 6)[:, None]
    direction = np.stack([np.sin(azimuth), np.cos(azimuth)], -1)                      # (A, 2) in x, z
    height = (band_front - centre[1]) / radii[1]
    edge = np.sqrt(max(1.0 - height**2, 0.05)) * radii[[0, 2]]                       # the crown's cross-section
    xz = centre[[0, 2]] + direction * (edge + spread[..., None] * reach)                # (6, A, 2)
    droop = rng.uniform(0.0, 0.25) * reach * spread**2                               # the peak bends down
    brim = np.stack([xz[..., 0], band(xz[..., 1]) - droop, xz[..., 1]], -1)
    brim_triangles, brim = _sheet(brim, [0.0, 1.0, 0.0]), brim.reshape(-1, 3)
    front = brim[:, 2] > centre[2]
    brim[front] = _in_front(depth, brim[front], CLEARANCE_MM)
    parts.append((brim, brim_triangles, colour * rng.uniform(0.6, 1.0)))
    return parts


def _microphone(frame: FaceFrame, depth: FrontalDepth, landmarks: np.ndarray, face: np.ndarray,
                rng: np.random.Generator) -> list:
    """A ball (the grille) on a handle in front of the mouth or chin, each ``(vertices, triangles, colour)``."""
    io = frame.io
    mouth = landmarks[list(GROUPS["outer_lips"])].mean(0)
    ball = rng.uniform(0.18, 0.28) * io
    xy = mouth[:2] + np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.0)]) * io
    front = _front_within(depth, xy, np.full(2, ball))
    centre = np.append(xy, (front if np.isfinite(front) else mouth[2]) + ball + rng.uniform(5.0, 40.0))
    handle = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(0.0, 0.6)])
    handle /= np.linalg.norm(handle)
    length = rng.uniform(1.2, 2.0) * io
    path = centre + handle * np.linspace(0.7 * ball, ball + length, 12)[:, None]
    grille = rng.choice([[0.1, 0.1, 0.1], [0.55, 0.55, 0.55]])
    return [(*ellipsoid(centre, np.full(3, ball), 12, 24), grille),
            (*tube(path, rng.uniform(0.1, 0.16) * io), rng.uniform(0.02, 0.3) * np.ones(3))]


def _locks(frame: FaceFrame, depth: FrontalDepth, rng: np.random.Generator, hair_colour: np.ndarray) -> list:
    """Two to five tapering locks of hair across the upper face, each ``(vertices, triangles, colour)``."""
    io, parts = frame.io, []
    for _ in range(int(rng.integers(2, 6))):
        start = np.array([frame.centre_x + rng.uniform(-0.6, 0.6) * io, frame.brow_y + rng.uniform(0.4, 0.8) * io])
        end = np.array([frame.centre_x + rng.uniform(-0.7, 0.7) * io,
                        rng.uniform(frame.nose_base_y, frame.brow_y + 0.1 * io)])
        bend = 0.5 * (start + end) + rng.uniform(-0.25, 0.25, size=2) * io
        t = np.linspace(0.0, 1.0, 24)[:, None]
        xy = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end            # a quadratic Bezier curve
        radius = rng.uniform(2.0, 4.5) * (1.0 - 0.7 * t[:, 0])
        z, covered = depth.at(xy)
        if not covered.any():
            continue
        known = np.flatnonzero(covered)   # off the face (above it) a point takes the nearest covered depth
        z = z[known[np.abs(np.arange(len(z))[:, None] - known[None]).argmin(1)]]
        path = np.column_stack([xy, z + radius + LOCK_OFFSET_MM])
        parts.append((*tube(path, radius), np.clip(hair_colour * rng.uniform(0.8, 1.2), 0.0, 1.0)))
    return parts


def _along(corners: np.ndarray, step: float) -> np.ndarray:
    """``(N, 3)`` points along the polyline through ``corners`` (K, 3), about ``step`` mm apart."""
    points = [corners[:1]]
    for a, b in zip(corners[:-1], corners[1:]):
        count = max(int(np.ceil(np.linalg.norm(b - a) / step)), 1)
        points.append(a + (b - a) * np.linspace(0.0, 1.0, count + 1)[1:, None])
    return np.vstack(points)


_BUILDERS = {"glasses": _glasses, "hat": _hat, "microphone": _microphone}
