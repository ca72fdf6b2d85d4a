"""The built-in face model: a procedural, symmetric human face generated from code alone.

Construction (all lengths in mm; design frame: nose tip at the origin, x = image right, y up,
z toward the camera; the finished model is shifted so its bounding box is centred at the origin):

- Surface parameters: a regular grid of columns ``theta`` (azimuth, -90..90 degrees) and rows.
  Every column runs from the jaw border ``y_bottom(theta)`` (the chin at theta = 0 rising to the
  jaw angle at the sides) to the top of the forehead. One grid row lies just above and one just
  below the lip contact line in every column, so an opened mouth stretches that one row of
  triangles: the mesh stays closed across the lips.
- Base surface: at height y an arc ``x = W(y) sin(theta)``,
  ``z = Z_side(y) + (Z_front(y) - Z_side(y)) cos(theta)^p(y)`` (an ellipse, p = 1, in the upper
  face, more arched below): the face wraps round to the sides about 93 mm behind the nose tip,
  so a profile is visible at 90 degrees of yaw.
- Features: a height field ``h(x0, y0)`` over the frontal design coordinates
  ``(x0, y0) = (W sin(theta), y)``, added along the base surface normal: nose (dorsum, tip,
  alar wings, nostrils), eyes (sockets, eyeballs under lids, palpebral fissures, lid creases),
  brow ridges, lips, cheekbones, cheeks, nasolabial folds, chin. The lowest rows roll in under
  the jaw.
- Identity modes and expression blendshapes are explicit, smooth, localised displacement fields
  over the same design coordinates (listed in ``IDENTITY_MODES`` and ``EXPRESSIONS``).
- Landmarks: the vertex nearest each designed iBUG position in the design coordinates; the jaw
  contour points are equally spaced along the frontal silhouette of the jaw. Right-side ids are
  mirrored to the left so the landmark set is exactly symmetric.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.interpolate import PchipInterpolator

from data_prep.face_model import FaceModel
from lightning_vrn.landmark_scheme import FLIP, NUM_LANDMARKS

# ----- grid ---------------------------------------------------------------------------------
NUM_COLUMNS = 161                 # odd: one column on the midline
NUM_ROWS = 150
ROWS_BELOW_MOUTH = 42             # rows from the jaw border up to the lip contact line
Y_TOP = 100.0                     # top of the forehead
Y_MOUTH = -33.0                   # lip contact line
Y_CHIN = -86.0                    # jaw border on the midline (under the chin)
Y_JAW_ANGLE = -50.0               # jaw border at the sides
JAW_CURVE = 2.5                   # y_bottom(theta) = Y_JAW_ANGLE + (Y_CHIN - Y_JAW_ANGLE) (1 - |sin(theta)|^JAW_CURVE)

# ----- jaw border: the lowest rows roll in under the jaw ---------------------------------------
RIM_DEPTH = 14.0                  # how far the jaw border rolls in under the jaw (mm)
RIM_WIDTH = 14.0                  # over this height above the border (mm)
RIM_DIRECTION = (0.4, 0.35, -0.9)  # (inward x fraction, up, back) of the roll

# ----- features ---------------------------------------------------------------------------------
NOSE_PROTRUSION = ((-18, 0), (-16, 0.5), (-14, 5), (-11, 12), (-7, 19.5), (-3, 24), (0, 25.2), (4, 22.5),
                   (10, 18.5), (20, 12.5), (30, 7), (40, 3), (46, 0.5), (50, 0))
NOSE_HALF_WIDTH = ((-18, 9), (-10, 11), (-4, 13.5), (3, 13.5), (12, 12), (25, 10.5), (38, 9.5), (50, 10))
MUZZLE = ((-56, 0), (-50, 0), (-43, 2.5), (-33, 4.5), (-26, 6.5), (-15, 6.5), (-8, 3), (0, 0))
MUZZLE_HALF_WIDTH = 28.0          # lateral falloff of the forward-set mouth region
ALA_CENTRE, ALA_RADII, ALA_HEIGHT = (11.5, -6.5), (8.0, 7.0), 5.0
EYE_INNER, EYE_OUTER = (16.5, 35.0), (47.5, 37.0)     # palpebral fissure corners (x > 0 side)
UPPER_LID_RISE, LOWER_LID_DROP = 5.0, 3.8              # fissure half-heights above / below the corner line
EYE_CENTRE = (32.0, 36.0)
BROW_POINTS = ((12.0, 52.5), (36.0, 57.5), (56.0, 49.0))   # brow arc, inner -> outer
MOUTH_CORNER_X = 24.0
UPPER_LIP_HEIGHT, LOWER_LIP_HEIGHT = 8.0, 10.0
JAW_PIVOT = (-5.0, -78.0)         # (y, z) of the axis the opening jaw turns about (mid-ramus, in front of the ear)
MOUTH_OPEN_ANGLE = np.deg2rad(17.0)  # chin swings down and back
# Half-height of the band around the contact line where the opening jaw's weight goes 0 -> 1; the
# grid rows next to the line are at least 0.6 mm away between the mouth corners, so no vertex is
# inside it and exactly one row of triangles stretches.
LIP_SEPARATION_BAND = 0.25

EXPRESSIONS = ("mouth_open", "smile", "brows_up", "frown", "eyes_closed", "pucker")
IDENTITY_MODES = ("face_width", "face_length", "face_depth", "jaw_width", "chin_height", "chin_protrusion",
                  "nose_length", "nose_width", "nose_protrusion", "nose_bridge", "nose_tip_lift",
                  "eye_spacing", "eye_size", "eye_depth", "brow_height", "brow_ridge", "lip_fullness",
                  "mouth_width", "philtrum_length", "cheek_fullness", "cheekbones", "forehead_slope",
                  "upper_face_width")


def _profile(knots):
    """Smooth shape-preserving interpolant through (y, value) knots, held constant outside them."""
    knots = np.asarray(knots, dtype=np.float64)
    spline = PchipInterpolator(knots[:, 0], knots[:, 1])
    return lambda y: spline(np.clip(y, knots[0, 0], knots[-1, 0]))


def _smoothstep(t):
    """0 below 0, 1 above 1, C1-smooth in between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x, y, cx, cy, sx, sy):
    """Axis-aligned Gaussian bump of peak 1 centred at (cx, cy) with widths (sx, sy)."""
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _dome(x, y, cx, cy, rx, ry, power=1.5):
    """Compact elliptical bump ``(1 - r^2)^power`` (peak 1, zero outside the ellipse)."""
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.maximum(1.0 - r2, 0.0) ** power


def _half_width(y):
    """Half-width W(y) of the face outline: 72 mm at the cheekbones, narrower at the forehead and jaw."""
    return np.where(y > 10.0, 72.0 - 0.0012 * (y - 10.0) ** 2, 72.0 - 4.4e-3 * np.abs(10.0 - y) ** 1.95)


def _front_depth(y):
    """Midline depth of the base surface (before nose, lips, brows, chin): flat face, forehead sloping back."""
    return np.where(y > 20.0, -22.0 - 0.0035 * (y - 20.0) ** 2, -22.0 - 0.0006 * (y - 20.0) ** 2)


def _side_depth(y):
    """Depth of the sides of the face (about 93 mm behind the nose tip), coming forward toward the jaw."""
    return -90.0 + 0.005 * np.maximum(-20.0 - y, 0.0) ** 2


def _arc_power(y):
    """Cross-section power: 1 (an ellipse) in the upper face, 1.8 (arched, narrower) in the lower face."""
    t = np.clip((20.0 - y) / 55.0, 0.0, 1.0)
    return 1.0 + 0.8 * t ** 3 * (10.0 - 15.0 * t + 6.0 * t * t)


def _fissure(ax):
    """Palpebral fissure at |x| = ``ax``: position u in [0, 1] (inner -> outer corner), inside flag,
    lower and upper lid margin heights y (mm)."""
    (xi, yi), (xo, yo) = EYE_INNER, EYE_OUTER
    u = (ax - xi) / (xo - xi)
    inside = (u > 0) & (u < 1)
    u = np.clip(u, 0.0, 1.0)
    corner_line = yi + (yo - yi) * u
    upper = corner_line + UPPER_LID_RISE * np.sin(np.pi * u ** 0.85) ** 0.8
    lower = corner_line - LOWER_LID_DROP * np.sin(np.pi * u) ** 0.9
    return u, inside, lower, upper


def _brow_line(ax):
    """Brow arc height y (mm) at |x| = ``ax`` (the quadratic through ``BROW_POINTS``)."""
    xs, ys = np.array(BROW_POINTS).T
    return np.polyval(np.polyfit(xs, ys, 2), ax)


def _lip_heights(x):
    """Vermilion heights (mm) above and below the contact line at ``x``: (upper lip, lower lip).

    Both shrink to zero at the mouth corners; the upper one dips at the philtrum (Cupid's bow).
    """
    q = np.sqrt(np.clip(1.0 - (np.asarray(x) / MOUTH_CORNER_X) ** 2, 0.0, 1.0))
    return UPPER_LIP_HEIGHT * q - 1.2 * np.exp(-((x / 2.2) ** 2)) * q, LOWER_LIP_HEIGHT * q


class _Design:
    """The parameter grid, its design coordinates, base surface and the named feature fields."""

    def __init__(self):
        theta = np.linspace(-np.pi / 2, np.pi / 2, NUM_COLUMNS)
        rows = np.arange(NUM_ROWS, dtype=np.float64)
        self.theta = np.repeat(theta[None, :], NUM_ROWS, axis=0)            # (rows, columns)
        y_bottom = Y_JAW_ANGLE + (Y_CHIN - Y_JAW_ANGLE) * (1.0 - np.abs(np.sin(theta)) ** JAW_CURVE)
        lower = y_bottom[None, :] + (Y_MOUTH - y_bottom[None, :]) * rows[:ROWS_BELOW_MOUTH, None] / (
            ROWS_BELOW_MOUTH - 0.5)
        upper_rows = rows[ROWS_BELOW_MOUTH:, None] - ROWS_BELOW_MOUTH + 0.5
        upper = Y_MOUTH + (Y_TOP - Y_MOUTH) * upper_rows / (NUM_ROWS - ROWS_BELOW_MOUTH - 0.5)
        self.y = np.concatenate([lower, np.broadcast_to(upper, (len(upper_rows), NUM_COLUMNS))], axis=0)
        self.height_above_border = self.y - y_bottom[None, :]

        front, side = _front_depth(self.y), _side_depth(self.y)
        self.x = _half_width(self.y) * np.sin(self.theta)
        arc = np.abs(np.cos(self.theta)) ** _arc_power(self.y)
        base = np.stack([self.x, self.y, side + (front - side) * arc], axis=-1)
        self.normal = self._normals(base)
        # Roll the lowest rows inward under the jaw.
        rim = RIM_DEPTH * np.maximum(1.0 - self.height_above_border / RIM_WIDTH, 0.0) ** 2
        inward, up, back = RIM_DIRECTION
        self.base = base + rim[..., None] * _vector(-inward * self.normal[..., 0], up, back)
        self.ax = np.abs(self.x)
        self.side = np.tanh(self.x / 3.0)     # smooth sign of x: odd fields do not fold at the midline

    @staticmethod
    def _normals(surface: np.ndarray) -> np.ndarray:
        """Unit outward normals (rows, columns, 3) of a grid surface by finite differences."""
        along_rows = np.gradient(surface, axis=0)      # toward the top
        along_columns = np.gradient(surface, axis=1)   # toward image right
        normal = np.cross(along_columns, along_rows)
        return normal / np.linalg.norm(normal, axis=-1, keepdims=True)

    # ----- feature height fields (mm along the base normal) -------------------------------------
    def nose(self):
        """Dorsum, tip and columella as one ridge with a midline profile and a width profile."""
        protrusion = _profile(NOSE_PROTRUSION)(self.y)
        u = self.x / _profile(NOSE_HALF_WIDTH)(self.y)
        return protrusion * np.maximum(1.0 - u * u, 0.0) ** 1.4

    def alae(self):
        """Nostril wings with the alar groove around them and the nostril openings beneath."""
        cx, cy = ALA_CENTRE
        wings = ALA_HEIGHT * _dome(self.ax, self.y, cx, cy, *ALA_RADII)
        radius = np.sqrt(((self.ax - cx) / ALA_RADII[0]) ** 2 + ((self.y - cy) / ALA_RADII[1]) ** 2)
        upper_lateral = _smoothstep((self.ax - 6.0) / 4.0) * _smoothstep((self.y - cy + 0.5 * ALA_RADII[1]) / 3.0)
        groove = -1.6 * np.exp(-(((radius - 1.02) / 0.14) ** 2)) * upper_lateral
        nostrils = -3.0 * _gauss(self.ax, self.y, 6.5, -12.0, 2.2, 1.6)
        return wings + groove + nostrils

    def eyes(self):
        """Orbit hollow, eyeball under the lids, fissure inset, upper lid crease, lower lid bulge."""
        ex, ey = EYE_CENTRE
        socket = -7.0 * _dome(self.ax, self.y, ex, ey + 2.0, 23.0, 17.0, power=1.2)
        ball = 6.0 * _dome(self.ax, self.y, ex, ey, 18.0, 12.5, power=1.2)
        u, inside, lower, upper = _fissure(self.ax)
        fissure = inside * _smoothstep((upper - self.y) / 0.8) * _smoothstep((self.y - lower) / 0.8)
        crease_line = upper + 4.0
        crease = -1.2 * np.exp(-(((self.y - crease_line) / 1.4) ** 2)) * np.sin(np.pi * u) ** 0.5
        lower_lid = 0.8 * np.exp(-(((self.y - lower + 1.5) / 1.2) ** 2)) * np.sin(np.pi * u) ** 0.7
        return socket + ball - 1.6 * fissure + crease + lower_lid

    def brows(self):
        """Supraorbital ridges along the brow arcs plus the glabella."""
        along = _smoothstep((self.ax - 4.0) / 10.0) * (1.0 - _smoothstep((self.ax - 56.0) / 10.0))
        ridge = 3.0 * np.exp(-(((self.y - _brow_line(self.ax) + 2.0) / 5.5) ** 2)) * along
        return ridge + 1.5 * _gauss(self.x, self.y, 0.0, 52.0, 8.0, 6.0)

    def lips(self):
        """Upper and lower lip (zero on the contact line, a crease) and the mouth corner dimples."""
        q = np.sqrt(np.clip(1.0 - (self.x / MOUTH_CORNER_X) ** 2, 0.0, 1.0))
        upper_height, lower_height = _lip_heights(self.x)
        v_up = np.clip((self.y - Y_MOUTH) / (upper_height + 1e-3), 0.0, 1.0)
        v_low = np.clip((Y_MOUTH - self.y) / (lower_height + 1e-3), 0.0, 1.0)
        upper = 3.8 * q * np.sin(np.pi * v_up) ** 0.8
        lower = 4.2 * q * np.sin(np.pi * v_low) ** 0.8
        corners = -2.0 * _gauss(self.ax, self.y, MOUTH_CORNER_X, Y_MOUTH, 3.5, 3.5)
        return upper + lower + corners

    def muzzle(self):
        """The mouth region (upper lip skin to below the lower lip) stands forward of the cheeks."""
        return _profile(MUZZLE)(self.y) * np.exp(-((self.x / MUZZLE_HALF_WIDTH) ** 2))

    def cheeks(self):
        """Cheekbones, cheek fullness and nasolabial folds."""
        bones = 4.5 * _gauss(self.ax, self.y, 47.0, 16.0, 12.0, 9.0)
        full = 3.0 * _gauss(self.ax, self.y, 36.0, -10.0, 13.0, 12.0)
        # Nasolabial fold: groove along the segment from beside the ala to beside the mouth corner.
        a, b = np.array([17.0, -6.0]), np.array([30.0, -40.0])
        rel = np.stack([self.ax - a[0], self.y - a[1]], axis=-1)
        t = np.clip(rel @ (b - a) / np.dot(b - a, b - a), 0.0, 1.0)
        distance = np.linalg.norm(rel - t[..., None] * (b - a), axis=-1)
        fold = -1.0 * np.exp(-((distance / 2.2) ** 2)) * np.sin(np.pi * t) ** 0.5
        return bones + full + fold

    def chin(self):
        """Chin prominence and the groove under the lower lip."""
        return 3.5 * _gauss(self.x, self.y, 0.0, -66.0, 13.0, 8.0) - 2.5 * _gauss(self.x, self.y, 0.0, -50.0, 14.0,
                                                                                    3.5)

    def heights(self) -> dict[str, np.ndarray]:
        """All feature height fields by name (rows, columns)."""
        return {"nose": self.nose(), "alae": self.alae(), "eyes": self.eyes(), "brows": self.brows(),
                "lips": self.lips(), "muzzle": self.muzzle(), "cheeks": self.cheeks(), "chin": self.chin()}

    def mean(self, heights: dict[str, np.ndarray]) -> np.ndarray:
        """(rows, columns, 3) mean face in the design frame from the feature ``heights``."""
        return self.base + sum(heights.values())[..., None] * self.normal


def _vector(dx=0.0, dy=0.0, dz=0.0) -> np.ndarray:
    """Stack scalar fields into (rows, columns, 3)."""
    return np.stack(np.broadcast_arrays(dx, dy, dz), axis=-1).astype(np.float64)


def _identity_fields(design: _Design, mean: np.ndarray, heights: dict) -> list[np.ndarray]:
    """One displacement field (rows, columns, 3) per identity mode, scaled to about one standard deviation."""
    x, y, ax, side, normal = design.x, design.y, design.ax, design.side, design.normal
    zero = np.zeros_like(x)
    px, py, pz = mean[..., 0], mean[..., 1], mean[..., 2]
    lower_face = 1.0 - _smoothstep((y + 20.0) / 35.0)
    chin_region = 1.0 - _smoothstep((y + 45.0) / 20.0)
    nose_region = _dome(ax, y, 0.0, 8.0, 22.0, 30.0, power=1.0)
    ex, ey = EYE_CENTRE
    eye_region = _gauss(ax, y, ex, ey, 11.0, 9.0)
    mouth_region = _gauss(x, y, 0.0, Y_MOUTH, 26.0, 10.0)
    brow_region = _gauss(ax, y, 34.0, 54.0, 22.0, 9.0)
    fields = {
        "face_width": _vector(0.035 * px, zero, zero),
        "face_length": _vector(zero, 0.04 * py, zero),
        "face_depth": _vector(zero, zero, 0.05 * pz),
        "jaw_width": _vector(0.07 * px * lower_face, zero, zero),
        "chin_height": _vector(zero, -4.0 * chin_region, zero),
        "chin_protrusion": normal * (2.5 * _gauss(x, y, 0.0, -66.0, 15.0, 10.0))[..., None],
        "nose_length": _vector(zero, -3.0 * nose_region * _smoothstep((45.0 - y) / 45.0), zero),
        "nose_width": _vector(2.0 * side * _gauss(ax, y, 12.0, -7.0, 7.0, 7.0), zero, zero),
        "nose_protrusion": normal * (0.12 * heights["nose"])[..., None],
        "nose_bridge": normal * (2.0 * _gauss(x, y, 0.0, 32.0, 6.0, 10.0))[..., None],
        "nose_tip_lift": _vector(zero, 2.5 * _gauss(x, y, 0.0, -6.0, 10.0, 7.0), zero),
        "eye_spacing": _vector(2.0 * side * eye_region, zero, zero),
        "eye_size": 0.1 * _gauss(ax, y, ex, ey, 13.0, 10.0)[..., None] * _vector(x - side * ex, y - ey, zero),
        "eye_depth": normal * (-2.5 * _dome(ax, y, ex, ey + 1.0, 22.0, 15.0, power=1.2))[..., None],
        "brow_height": _vector(zero, 3.0 * brow_region, zero),
        "brow_ridge": normal * (0.7 * heights["brows"])[..., None],
        "lip_fullness": normal * (0.4 * design.lips().clip(min=0.0))[..., None],
        "mouth_width": _vector(3.0 * (x / MOUTH_CORNER_X) * mouth_region, zero, zero),
        "philtrum_length": _vector(zero, -2.5 * _gauss(x, y, 0.0, Y_MOUTH - 5.0, 30.0, 16.0), zero),
        "cheek_fullness": normal * (3.5 * _gauss(ax, y, 40.0, -12.0, 14.0, 14.0))[..., None],
        "cheekbones": normal * (2.5 * _gauss(ax, y, 50.0, 15.0, 12.0, 9.0))[..., None],
        "forehead_slope": _vector(zero, zero, 6.0 * _smoothstep((y - 50.0) / 50.0) ** 2),
        "upper_face_width": _vector(0.04 * px * _smoothstep((y - 20.0) / 40.0), zero, zero),
    }
    return [fields[name] for name in IDENTITY_MODES]


def _expression_fields(design: _Design, mean: np.ndarray) -> list[np.ndarray]:
    """One blendshape offset field (rows, columns, 3) per name in ``EXPRESSIONS`` (coefficient 1 = full)."""
    x, y, ax, side, normal = design.x, design.y, design.ax, design.side, design.normal
    zero = np.zeros_like(x)

    # mouth_open: the jaw turns about JAW_PIVOT. Between the mouth corners its weight jumps from 0
    # to 1 inside the thin band round the contact line (between two grid rows), so the lower lip
    # separates and one row of triangles stretches across the mouth. Near the line the weight
    # falls off toward the corners (a lens-shaped opening) and reaches 1 a lip height lower;
    # beside the mouth the band widens, so the cheeks stretch smoothly.
    beyond_corner = np.maximum(ax - MOUTH_CORNER_X, 0.0)
    still_above = Y_MOUTH + LIP_SEPARATION_BAND + 1.2 * beyond_corner
    fully_moving_below = Y_MOUTH - LIP_SEPARATION_BAND - 0.5 * beyond_corner
    step = _smoothstep((still_above - y) / (still_above - fully_moving_below))
    opening = np.sqrt(np.clip(1.0 - (x / MOUTH_CORNER_X) ** 2, 0.0, 1.0))
    below_lip = _smoothstep((Y_MOUTH - y) / LOWER_LIP_HEIGHT)
    jaw_weight = step * (1.0 - (1.0 - opening) * (1.0 - below_lip))
    pivot_y, pivot_z = JAW_PIVOT
    rel_y, rel_z = mean[..., 1] - pivot_y, mean[..., 2] - pivot_z
    c, s = np.cos(MOUTH_OPEN_ANGLE), np.sin(MOUTH_OPEN_ANGLE)
    rotation_offset = _vector(zero, (c - 1.0) * rel_y - s * rel_z, s * rel_y + (c - 1.0) * rel_z)
    mouth_open = jaw_weight[..., None] * rotation_offset

    # smile: mouth corners up, out and back; cheeks rise and fill.
    corner = _gauss(ax, y, MOUTH_CORNER_X, Y_MOUTH, 9.0, 8.0)
    cheek = _gauss(ax, y, 36.0, -8.0, 12.0, 11.0)
    smile = _vector(4.0 * side * corner, 5.0 * corner + 2.0 * cheek, -3.0 * corner) \
        + normal * (2.5 * cheek)[..., None]

    # brows_up: brows and the forehead below the hairline move up.
    brows_up = _vector(zero, 6.0 * _gauss(ax, y, 30.0, 58.0, 30.0, 14.0), zero)

    # frown: inner brows down and together, the glabella bunches forward.
    inner_brow = _gauss(ax, y, 14.0, 52.0, 12.0, 9.0)
    frown = _vector(-3.0 * side * inner_brow, -4.0 * inner_brow, zero) \
        + normal * (1.5 * _gauss(x, y, 0.0, 50.0, 7.0, 6.0))[..., None]

    # eyes_closed: the upper lid slides down onto the lower lid margin; the skin above stretches.
    u, inside, lower, upper = _fissure(ax)
    gap = (upper - lower) * inside
    in_fissure = (y >= lower) & (y <= upper)
    drop = np.where(in_fissure, 0.95 * (y - lower),
                    np.where(y > upper, 0.95 * gap * (1.0 - _smoothstep((y - upper) / 9.0)), 0.0))
    eyes_closed = _vector(zero, -drop * inside, zero)

    # pucker: lips push forward and the mouth corners draw in.
    lips = _gauss(x, y, 0.0, Y_MOUTH, 18.0, 9.0)
    pucker = _vector(-6.0 * (x / MOUTH_CORNER_X) * _gauss(x, y, 0.0, Y_MOUTH, 28.0, 10.0), zero, zero) \
        + normal * (6.0 * lips)[..., None]

    fields = {"mouth_open": mouth_open, "smile": smile, "brows_up": brows_up, "frown": frown,
              "eyes_closed": eyes_closed, "pucker": pucker}
    return [fields[name] for name in EXPRESSIONS]


def _grid_triangles() -> np.ndarray:
    """(T, 3) triangles of the row-major grid, counter-clockwise seen from the front (+z)."""
    r, c = np.meshgrid(np.arange(NUM_ROWS - 1), np.arange(NUM_COLUMNS - 1), indexing="ij")
    v00 = (r * NUM_COLUMNS + c).ravel()
    v01, v10 = v00 + 1, v00 + NUM_COLUMNS          # right neighbour, upper neighbour
    v11 = v10 + 1
    return np.concatenate([np.stack([v00, v01, v11], 1), np.stack([v00, v11, v10], 1)]).astype(np.int64)


def _mirror_ids(ids: np.ndarray) -> np.ndarray:
    """Vertex ids of the mirror images (x -> -x) of grid vertices ``ids``."""
    row, column = np.divmod(ids, NUM_COLUMNS)
    return row * NUM_COLUMNS + (NUM_COLUMNS - 1 - column)


def _design_landmarks() -> dict[int, tuple[float, float]]:
    """Designed (x0, y0) of the right-side and midline iBUG landmarks (0-based), jaw excluded."""
    (xi, _), (xo, _) = EYE_INNER, EYE_OUTER
    lid_x = xo - (xo - xi) * np.array([1 / 3, 2 / 3])           # a third and two thirds from the outer corner
    _, _, lower_lid, upper_lid = _fissure(lid_x)
    brow_x = np.array([56.0, 47.0, 36.0, 24.0, 13.0])           # outer -> inner
    brow_y = _brow_line(brow_x)
    lip_x = np.array([15.0, 5.0, 0.0, 7.0, 16.0])
    upper_lip, lower_lip = _lip_heights(lip_x)
    above, below = Y_MOUTH + 0.3, Y_MOUTH - 0.3                 # the rows either side of the contact line
    points = {17 + k: (-brow_x[k], brow_y[k]) for k in range(5)}
    points.update({
        27: (0.0, 38.0), 28: (0.0, 26.0), 29: (0.0, 13.0), 30: (0.0, -1.5),
        31: (-12.0, -11.0), 32: (-6.5, -13.5), 33: (0.0, -15.0),
        36: (-xo, EYE_OUTER[1]), 37: (-lid_x[0], upper_lid[0] + 0.2), 38: (-lid_x[1], upper_lid[1] + 0.2),
        39: (-xi, EYE_INNER[1]), 40: (-lid_x[1], lower_lid[1] - 0.2), 41: (-lid_x[0], lower_lid[0] - 0.2),
        48: (-MOUTH_CORNER_X, above),
        49: (-lip_x[0], Y_MOUTH + upper_lip[0]), 50: (-lip_x[1], Y_MOUTH + upper_lip[1]),
        51: (0.0, Y_MOUTH + upper_lip[2]),
        57: (0.0, Y_MOUTH - lower_lip[2]), 58: (-lip_x[3], Y_MOUTH - lower_lip[3]),
        59: (-lip_x[4], Y_MOUTH - lower_lip[4]),
        60: (-MOUTH_CORNER_X + 3.0, above), 61: (-10.0, above), 62: (0.0, above),
        66: (0.0, below), 67: (-10.0, below),
    })
    return points


def _jaw_landmarks(mean: np.ndarray) -> np.ndarray:
    """Ids of iBUG jaw points 0-8: equally spaced along the right half of the jaw's frontal silhouette.

    The path runs down a column near the right side of the face from the height of the outer eye
    corner to that column's lowest vertex, then through the lowest vertex of every column to
    the chin (the midline column's lowest vertex).
    """
    grid = mean.reshape(NUM_ROWS, NUM_COLUMNS, 3)
    side_column = 4
    start_row = int(np.argmin(np.abs(grid[:, side_column, 1] - (EYE_OUTER[1] - 8.0))))
    lowest = np.argmin(grid[:, :, 1], axis=0)
    down_side = [r * NUM_COLUMNS + side_column for r in range(start_row, lowest[side_column], -1)]
    along_jaw = [lowest[c] * NUM_COLUMNS + c for c in range(side_column, NUM_COLUMNS // 2 + 1)]
    path = np.array(down_side + along_jaw)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(mean[path, :2], axis=0), axis=1))])
    targets = np.linspace(0.0, arc[-1], 9)
    return path[np.abs(arc[None, :] - targets[:, None]).argmin(axis=1)]


def _landmarks(design: _Design, mean: np.ndarray) -> np.ndarray:
    """(68,) landmark vertex ids, exactly mirror-symmetric."""
    landmarks = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    landmarks[:9] = _jaw_landmarks(mean)
    points = _design_landmarks()
    targets = np.array(list(points.values()))
    design_xy = np.stack([design.x.ravel(), design.y.ravel()], axis=1)
    distance = np.linalg.norm(design_xy[None, :, :] - targets[:, None, :], axis=-1)
    landmarks[list(points)] = distance.argmin(axis=1)
    defined = landmarks >= 0
    landmarks[FLIP[defined]] = _mirror_ids(landmarks[defined])
    return landmarks


def _face_region(design: _Design) -> np.ndarray:
    """Vertex ids used for NME: below the upper forehead, off the jaw roll and the far sides."""
    keep = (design.y < 80.0) & (design.height_above_border > RIM_WIDTH * 0.6) & (np.abs(design.theta) < np.deg2rad(72))
    return np.flatnonzero(keep.ravel()).astype(np.int64)


@functools.lru_cache(maxsize=1)
def builtin_face_model() -> FaceModel:
    """The procedural built-in :class:`FaceModel` (deterministic; built once per process, arrays read-only)."""
    design = _Design()
    heights = design.heights()
    mean = design.mean(heights)
    identity = np.stack(_identity_fields(design, mean, heights))
    expression = np.stack(_expression_fields(design, mean))
    flat_mean = mean.reshape(-1, 3)
    centre = 0.5 * (flat_mean.min(axis=0) + flat_mean.max(axis=0))
    model = FaceModel(
        name="builtin",
        mean=(flat_mean - centre).astype(np.float32),
        identity_basis=identity.reshape(len(identity), -1, 3).astype(np.float32),
        expression_basis=expression.reshape(len(expression), -1, 3).astype(np.float32),
        expression_names=list(EXPRESSIONS),
        triangles=_grid_triangles(),
        landmark_vertices=_landmarks(design, flat_mean),
        face_region=_face_region(design),
    ).validate()
    for array in (model.mean, model.identity_basis, model.expression_basis, model.triangles,
                  model.landmark_vertices, model.face_region):
        array.flags.writeable = False
    return model
