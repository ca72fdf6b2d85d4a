"""Synthetic face images: shade a posed mesh over a random textured background.

A posed mesh in crop coordinates (x right, y down, z away from the camera, pixels) is z-buffered
with :func:`lightning_vrn.geometry.raster.rasterise` and shaded per pixel with Lambert's law,
``albedo * (ambient + light_colour * max(0, n . l))``, using the Gouraud-interpolated per-vertex
albedo and per-pixel (interpolated, renormalised) vertex normals. Everything random about one
image lives in a :class:`RenderSettings`, drawn from a numpy ``Generator``, so an image is
reproducible from its settings. Textures (background, occluders) are smooth value noise,
gradients, stripes or checkerboards in crop-size units, so a 96 px crop looks like a
down-scaled 192 px one.

Triangles must be counter-clockwise seen from the front in the model frame (y up, z towards
the camera): the model -> crop transform is a proper rotation, so the normal
``(v1 - v0) x (v2 - v0)`` then points towards the camera (negative crop z).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image
from scipy.ndimage import convolve, gaussian_filter
from scipy.spatial import cKDTree

from lightning_vrn.geometry.mesh_check import check_mesh
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.landmark_scheme import GROUPS

TEXTURE_KINDS = ("noise", "gradient", "stripes", "checker")
LIGHTINGS = ("lambert", "rich")
"""How a face is lit: ``lambert`` one directional light plus a flat ambient; ``rich`` also an ambient that varies
with the normal (first-order spherical harmonics), colour temperature, cast shadows and specular highlights
(:meth:`RenderSettings.sample`)."""
SHADOW_BIAS_PX = 2.5
"""How far (px) a point must lie behind the surface nearest the light to be in its shadow."""
SKINS = ("plain", "detailed")
"""How much a face's albedo shows: ``plain`` skin tone, smooth variation, lips, eyes, brows; ``detailed`` also
pores, freckles, moles, blush, eye shadow, stubble and teeth in an open mouth (:class:`SkinDetail`)."""
CAMERAS = ("basic", "photographic")
"""What the camera does to an image: ``basic`` a little defocus, sensor noise and gamma; ``photographic`` also
stronger defocus, motion blur, white balance, a lower resolution scaled back up and JPEG (:meth:`RenderSettings.sample`)."""
OCCLUDER_SHAPES = ("ellipse", "rectangle", "hand")
REFERENCE_SIZE = 192  # crop size (px) at which blur sigmas are given

# Skin tones (linear RGB albedo) at the two ends of the sampled range.
LIGHT_SKIN = np.array([0.95, 0.80, 0.70])
DARK_SKIN = np.array([0.36, 0.23, 0.16])
SCLERA = np.array([0.85, 0.80, 0.76])
TEETH = np.array([0.85, 0.82, 0.72])


@dataclass(eq=False)
class TextureSettings:
    """A random texture: a pattern mixing two colours, shaded by smooth noise, plus fine grain."""

    kind: str               # one of TEXTURE_KINDS
    colour_a: np.ndarray    # (3,) RGB in [0, 1]
    colour_b: np.ndarray    # (3,) RGB in [0, 1]
    angle: float            # radians, direction of the gradient / stripes / checker
    period: float           # stripe / checker period as a fraction of the crop size
    shading: float          # amplitude of the smooth brightness modulation (relative)
    grain: float            # amplitude of the fine noise (relative)
    seed: int               # seeds the noise fields

    @classmethod
    def sample(cls, rng: np.random.Generator, base_colour: np.ndarray | None = None) -> "TextureSettings":
        """Random texture; with ``base_colour`` (3,) both colours stay near it (e.g. skin for a hand)."""
        if base_colour is None:
            colour_a, colour_b = rng.uniform(0.05, 0.95, size=(2, 3))
        else:
            colour_a, colour_b = np.clip(base_colour * rng.uniform(0.8, 1.1, size=(2, 3)), 0.0, 1.0)
        return cls(
            kind=str(rng.choice(TEXTURE_KINDS)) if base_colour is None else "noise",
            colour_a=colour_a,
            colour_b=colour_b,
            angle=float(rng.uniform(0.0, np.pi)),
            period=float(rng.uniform(0.04, 0.3)),
            shading=float(rng.uniform(0.05, 0.35)),
            grain=float(rng.uniform(0.0, 0.08)),
            seed=int(rng.integers(2**31)),
        )


@dataclass(eq=False)
class OccluderSettings:
    """A textured shape in front of the face, placed relative to the face's bounding box."""

    shape: str              # one of OCCLUDER_SHAPES
    centre: np.ndarray      # (2,) x, y as fractions of the face bounding box (0 = left/top, 1 = right/bottom)
    half_size: np.ndarray   # (2,) half extents as fractions of the face bounding box width, height
    angle: float            # radians, in-plane rotation of the shape
    texture: TextureSettings

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "OccluderSettings":
        """Random ellipse, rectangle or hand covering part of the face."""
        shape = str(rng.choice(OCCLUDER_SHAPES))
        skin = _sample_skin_tone(rng) if shape == "hand" else None
        return cls(
            shape=shape,
            centre=rng.uniform(0.1, 0.9, size=2),
            half_size=rng.uniform(0.15, 0.4, size=2) if shape != "hand" else np.full(2, rng.uniform(0.3, 0.5)),
            angle=float(rng.uniform(-np.pi, np.pi)),
            texture=TextureSettings.sample(rng, base_colour=skin),
        )


@dataclass(eq=False)
class SkinDetail:
    """Small-scale appearance painted over a face's albedo (mm in the model frame)."""

    pores: float            # std of per-vertex brightness noise (relative)
    freckles: int           # number of freckles over the cheeks and nose
    moles: int              # number of moles anywhere on the face
    blush: float            # redness added on the cheeks (relative)
    eye_shadow: float       # how much the lids take ``shadow_colour``
    shadow_colour: np.ndarray  # (3,) RGB
    stubble: float          # darkening of the lower face by stubble
    seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "SkinDetail":
        return cls(pores=float(rng.uniform(0.0, 0.06)), freckles=int(rng.choice([0, 0, rng.integers(10, 150)])),
                   moles=int(rng.integers(0, 4)), blush=float(rng.uniform(0.0, 0.2)),
                   eye_shadow=float(rng.choice([0.0, rng.uniform(0.2, 0.6)])),
                   shadow_colour=rng.uniform(0.1, 0.6, size=3),
                   stubble=float(rng.choice([0.0, 0.0, rng.uniform(0.1, 0.4)])), seed=int(rng.integers(2**31)))


@dataclass(eq=False)
class RenderSettings:
    """All randomness of one rendered image (lighting, albedo, background, occluders, camera)."""

    light_direction: np.ndarray  # (3,) unit vector in crop coordinates from the surface to the light (-z = camera side)
    light_colour: np.ndarray     # (3,) RGB multipliers of the directional light
    ambient: float               # ambient light level
    skin_tone: np.ndarray        # (3,) base albedo RGB in [0, 1]
    background: TextureSettings
    albedo_variation: float = 0.06     # amplitude of the smooth (tens of mm) albedo variation
    albedo_noise: float = 0.015        # std of the per-vertex albedo noise
    albedo_seed: int = 0
    lip_tint: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.55, 0.6]))  # (3,) lip albedo / skin
    brow_colour: np.ndarray = field(default_factory=lambda: np.array([0.12, 0.08, 0.06]))  # (3,) hair albedo
    brow_density: float = 0.7          # 0..1, how much the brows cover the skin
    iris_colour: np.ndarray = field(default_factory=lambda: np.array([0.25, 0.15, 0.08]))  # (3,)
    occluders: list[OccluderSettings] = field(default_factory=list)
    blur_sigma: float = 0.0            # Gaussian camera blur, px at a 192 px crop
    motion_blur: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (2,) px at 192 px: the exposure's smear
    sensor_noise: float = 0.0          # std of additive pixel noise, in [0, 1] intensity units
    gamma: float = 1.0                 # output = intensity ** (1 / gamma)
    noise_seed: int = 0
    white_balance: np.ndarray = field(default_factory=lambda: np.ones(3))  # (3,) RGB gains, mean 1
    downscale: float = 1.0             # the image is made at size / downscale px, then scaled back up (bilinear)
    jpeg_quality: int = 0              # JPEG quality the image went through (0: none)
    environment: np.ndarray | None = None  # (4, 3) ambient RGB = row 0 + normal @ rows 1-3 (None: flat ``ambient``)
    shadows: bool = False              # the directional light casts shadows
    specular: float = 0.0              # strength of the Blinn-Phong highlight
    shininess: float = 20.0            # its exponent
    skin_detail: SkinDetail | None = None  # pores, freckles, moles, makeup, stubble, teeth (None: plain skin)

    @classmethod
    def sample(cls, rng: np.random.Generator, occluders: bool = False, camera: str = "basic",
               lighting: str = "lambert", skin: str = "plain") -> "RenderSettings":
        """Random settings; ``occluders=True`` adds one or two occluders; ``camera`` one of :data:`CAMERAS`;
        ``lighting`` one of :data:`LIGHTINGS`; ``skin`` one of :data:`SKINS`. The photographic camera's draws,
        then the rich lighting's, then the skin's come last, so the rest of the settings (and anything drawn
        before them from ``rng``) are the same either way."""
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
        if lighting not in LIGHTINGS:
            raise ValueError(f"lighting must be one of {LIGHTINGS}, got {lighting!r}")
        if skin not in SKINS:
            raise ValueError(f"skin must be one of {SKINS}, got {skin!r}")
        # Light within 75 degrees of the camera axis, uniform on that spherical cap.
        cos_polar = rng.uniform(np.cos(np.radians(75.0)), 1.0)
        azimuth = rng.uniform(0.0, 2.0 * np.pi)
        sin_polar = np.sqrt(1.0 - cos_polar**2)
        direction = np.array([sin_polar * np.cos(azimuth), sin_polar * np.sin(azimuth), -cos_polar])
        hair = rng.uniform()
        settings = cls(
            light_direction=direction,
            light_colour=rng.uniform(0.55, 0.95) * rng.uniform(0.88, 1.12, size=3),
            ambient=float(rng.uniform(0.15, 0.45)),
            skin_tone=_sample_skin_tone(rng),
            background=TextureSettings.sample(rng),
            albedo_variation=float(rng.uniform(0.03, 0.1)),
            albedo_noise=float(rng.uniform(0.005, 0.03)),
            albedo_seed=int(rng.integers(2**31)),
            lip_tint=rng.uniform([0.75, 0.45, 0.5], [0.95, 0.65, 0.7]),
            brow_colour=(1.0 - hair) * np.array([0.06, 0.05, 0.04]) + hair * np.array([0.5, 0.38, 0.24]),
            brow_density=float(rng.uniform(0.5, 0.9)),
            iris_colour=np.clip(rng.choice([[0.25, 0.15, 0.08], [0.2, 0.3, 0.4], [0.25, 0.3, 0.15]])
                                * rng.uniform(0.7, 1.3), 0.0, 1.0),
            occluders=[OccluderSettings.sample(rng) for _ in range(rng.integers(1, 3) if occluders else 0)],
            blur_sigma=float(rng.uniform(0.0, 0.8)),
            sensor_noise=float(rng.uniform(0.0, 0.02)),
            gamma=float(rng.uniform(0.85, 1.15)),
            noise_seed=int(rng.integers(2**31)),
        )
        if camera == "photographic":
            gains = rng.uniform(0.85, 1.15, size=3)
            settings = replace(settings, blur_sigma=float(rng.uniform(0.0, 2.0)), white_balance=gains / gains.mean(),
                               downscale=float(rng.choice([1.0, rng.uniform(1.0, 3.0)])),
                               jpeg_quality=int(rng.integers(30, 96)))
        if lighting == "rich":
            settings = _rich_lighting(settings, rng)
        if skin == "detailed":
            settings = replace(settings, skin_detail=SkinDetail.sample(rng))
        if camera == "photographic":   # its own generator: nothing drawn from rng, so every later draw is unchanged
            smear = np.random.default_rng([settings.noise_seed, 1])
            angle = smear.uniform(0.0, np.pi)
            length = float(smear.choice([0.0, smear.uniform(1.0, 8.0)]))
            settings = replace(settings, motion_blur=length * np.array([np.cos(angle), np.sin(angle)]))
        return settings


WARM_LIGHT, COOL_LIGHT = np.array([1.0, 0.82, 0.64]), np.array([0.82, 0.92, 1.06])
"""RGB of a warm (about 3,000 K) and a cool (about 8,000 K) light relative to daylight."""


def _rich_lighting(settings: RenderSettings, rng: np.random.Generator) -> RenderSettings:
    """``settings`` with the ambient turned into a first-order spherical-harmonic environment (its level kept, a
    gradient up to half of it toward a random direction), the key and ambient lights each given a colour
    temperature between :data:`WARM_LIGHT` and :data:`COOL_LIGHT`, shadows (80% of faces) and a highlight."""
    def temperature():
        mix = rng.uniform()
        return (1 - mix) * WARM_LIGHT + mix * COOL_LIGHT

    environment = settings.ambient * temperature()
    gradient = rng.normal(size=3)
    gradient *= rng.uniform(0.0, 0.5) / np.linalg.norm(gradient)
    return replace(settings, environment=np.vstack([environment, np.outer(gradient, environment)]),
                   light_colour=np.asarray(settings.light_colour) * temperature(), shadows=bool(rng.random() < 0.8),
                   specular=float(rng.uniform(0.0, 0.35)), shininess=float(rng.uniform(8.0, 60.0)))


def _sample_skin_tone(rng: np.random.Generator) -> np.ndarray:
    """(3,) skin albedo between :data:`LIGHT_SKIN` and :data:`DARK_SKIN` with a small hue jitter."""
    darkness = rng.uniform()
    tone = (1.0 - darkness) * LIGHT_SKIN + darkness * DARK_SKIN
    return np.clip(tone * rng.normal(1.0, 0.04, size=3), 0.0, 1.0)


# ----------------------------------------------------------------------------- albedo


def vertex_albedo(vertices_model_mm: np.ndarray, settings: RenderSettings,
                  landmark_vertices: np.ndarray | None = None, paint_eyes: bool = True) -> np.ndarray:
    """``(V, 3)`` per-vertex albedo in [0, 1] for a model-frame mesh ``(V, 3)`` in mm.

    Skin tone times a smooth random variation (sinusoids of 40-150 mm wavelength) plus
    per-vertex noise. With ``landmark_vertices`` ((68,) iBUG-68 vertex ids; -1 = missing, which
    skips that feature), lips are tinted, the mouth opening darkened, eyes get sclera and iris,
    and brows are painted with ``settings.brow_colour``; ``paint_eyes=False`` leaves the eyes to a model's
    own eyeballs. Features are located in the frontal model x-y plane (y up), so call this on the unposed mesh.
    """
    vertices = np.asarray(vertices_model_mm, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.isfinite(vertices).all():
        raise ValueError(f"vertices_model_mm must be a finite (V, 3) array, got shape {vertices.shape}")
    rng = np.random.default_rng(settings.albedo_seed)

    # Smooth variation: brightness and redness as sums of random 3D sinusoids.
    num_waves = 6
    wavelength = rng.uniform(40.0, 150.0, size=num_waves)
    wave_dir = rng.normal(size=(num_waves, 3))
    wave_vec = wave_dir / np.linalg.norm(wave_dir, axis=1, keepdims=True) * (2 * np.pi / wavelength)[:, None]
    waves = np.cos(vertices @ wave_vec.T + rng.uniform(0, 2 * np.pi, size=num_waves))  # (V, K)
    brightness = waves[:, : num_waves // 2].sum(1) / np.sqrt(num_waves / 2)
    redness = waves[:, num_waves // 2:].sum(1) / np.sqrt(num_waves / 2)
    variation = 1.0 + settings.albedo_variation * (brightness[:, None] + 0.5 * redness[:, None] * [1.0, -0.3, -0.5])
    albedo = settings.skin_tone * variation
    albedo = albedo + settings.albedo_noise * rng.standard_normal(vertices.shape)

    if landmark_vertices is not None:
        albedo = _paint_features(vertices, albedo, np.asarray(landmark_vertices, dtype=np.int64), settings, rng,
                                 paint_eyes)
        if settings.skin_detail is not None:
            albedo = _paint_detail(vertices, albedo, np.asarray(landmark_vertices, dtype=np.int64), settings)
    return np.clip(albedo, 0.0, 1.0)


def _paint_detail(vertices: np.ndarray, albedo: np.ndarray, landmark_vertices: np.ndarray,
                  settings: RenderSettings) -> np.ndarray:
    """``settings.skin_detail`` painted over ``(V, 3)`` albedo, located by the landmark vertices (68,): pores as
    per-vertex noise; freckles (1-2 mm) on the cheeks and nose; moles (1.5-3 mm) anywhere; blush around each
    cheek's centre; eye shadow between each eye and its brow; stubble below the nose outside the lips; teeth in
    the upper part of an open mouth."""
    detail = settings.skin_detail
    rng = np.random.default_rng(detail.seed)
    albedo = albedo * (1.0 + detail.pores * rng.standard_normal(len(vertices)))[:, None]
    if (landmark_vertices < 0).any():  # a model without every landmark: pores alone
        return albedo
    mark = vertices[landmark_vertices]

    def spots(centres: np.ndarray, radius: np.ndarray) -> np.ndarray:
        """(V,) largest Gaussian bump of the spots (N, 3) of radii (N,) mm at each vertex."""
        if not len(centres):
            return np.zeros(len(vertices))
        distance, nearest = cKDTree(centres).query(vertices)
        return np.exp(-0.5 * (distance / radius[nearest]) ** 2)

    cheeks = np.vstack([0.5 * (mark[41] + mark[48]), 0.5 * (mark[46] + mark[54])])   # between eye and mouth corner
    around = np.vstack([cheeks, mark[30:31]])[None, :, :2]                          # the cheeks and the nose tip
    freckled = np.flatnonzero(np.linalg.norm(vertices[:, None, :2] - around, axis=-1).min(axis=1) < 35.0)
    freckles = rng.choice(freckled, size=detail.freckles)
    albedo = albedo * (1.0 - 0.35 * spots(vertices[freckles], rng.uniform(0.5, 1.0, len(freckles))))[:, None]
    moles = rng.choice(len(vertices), size=detail.moles)
    albedo = _blend(albedo, np.array([0.18, 0.1, 0.07]), 0.9 * spots(vertices[moles], rng.uniform(0.8, 1.5, len(moles))))
    blush = spots(cheeks, np.full(2, 18.0)) * detail.blush
    albedo = albedo * (1.0 + blush[:, None] * [0.4, -0.25, -0.25])
    lids = np.vstack([0.5 * (mark[38] + mark[20]), 0.5 * (mark[43] + mark[23])])   # between each eye and its brow
    albedo = _blend(albedo, detail.shadow_colour, detail.eye_shadow * spots(lids, np.full(2, 7.0)))
    lips = _polygon_signed_distance(vertices[:, :2], mark[48:60, :2]) < 2.0
    below_nose = vertices[:, 1] < mark[33, 1] - 4.0
    stubble = detail.stubble * below_nose * ~lips * rng.uniform(0.3, 1.0, len(vertices))
    albedo = albedo * (1.0 - stubble[:, None])
    inner = mark[60:68, :2]
    opening = inner[:, 1].max() - inner[:, 1].min()
    if opening > 3.0:  # an open mouth: teeth in the upper part, below the upper lip
        teeth = (_polygon_signed_distance(vertices[:, :2], inner) < 0) & (vertices[:, 1] > inner[:, 1].max() - 0.4 * opening)
        albedo[teeth] = TEETH
    return albedo


def _paint_features(vertices: np.ndarray, albedo: np.ndarray, landmark_vertices: np.ndarray,
                    settings: RenderSettings, rng: np.random.Generator, paint_eyes: bool = True) -> np.ndarray:
    """Blend lips, mouth opening, eyes and brows into ``(V, 3)`` albedo using the landmark vertex ids."""
    if landmark_vertices.shape != (68,) or landmark_vertices.max() >= len(vertices):
        raise ValueError(f"landmark_vertices must be (68,) vertex ids below {len(vertices)}, "
                         f"got shape {landmark_vertices.shape}")
    xy = vertices[:, :2]

    def feature(ids) -> np.ndarray | None:
        """(K, 3) model positions of landmark ids, or None when any is missing."""
        ids = landmark_vertices[list(ids)]
        return None if (ids < 0).any() else vertices[ids]

    def near_in_depth(points: np.ndarray) -> np.ndarray:
        """(V,) bool, vertices within 20 mm in z of a feature (keeps paint off far surfaces)."""
        return np.abs(vertices[:, 2] - np.median(points[:, 2])) < 20.0

    outer_lip, inner_lip = feature(GROUPS["outer_lips"]), feature(GROUPS["inner_lips"])
    if outer_lip is not None and inner_lip is not None:
        depth_ok = near_in_depth(outer_lip)
        lips = _soft_inside(_polygon_signed_distance(xy, outer_lip[:, :2]), 1.0) * depth_ok
        mouth = _soft_inside(_polygon_signed_distance(xy, inner_lip[:, :2]), 0.5) * depth_ok
        lip_colour = settings.skin_tone * settings.lip_tint
        albedo = _blend(albedo, albedo / np.maximum(settings.skin_tone, 1e-3) * lip_colour, lips * (1 - mouth))
        albedo = _blend(albedo, 0.25 * lip_colour, mouth)

    for group in ("right_eye", "left_eye") if paint_eyes else ():
        eye = feature(GROUPS[group])
        if eye is None:
            continue
        corners = eye[[0, 3], :2]
        iris_radius = 0.22 * np.linalg.norm(corners[1] - corners[0])
        centre_distance = np.linalg.norm(xy - eye[:, :2].mean(0), axis=1)
        inside = _soft_inside(_polygon_signed_distance(xy, eye[:, :2]), 0.5) * near_in_depth(eye)
        iris = _soft_inside(centre_distance - iris_radius, 0.5)
        pupil = _soft_inside(centre_distance - 0.4 * iris_radius, 0.3)
        albedo = _blend(albedo, eye_albedo(iris, pupil, settings.iris_colour), inside)

    # Brows: thicker towards the nose; polylines are ordered from the outer end to the inner end.
    for ids in (GROUPS["right_brow"], reversed(GROUPS["left_brow"])):
        brow = feature(ids)
        if brow is None:
            continue
        distance, along = _polyline_distance(xy, brow[:, :2])
        half_width = 2.0 + 2.5 * along
        hair = settings.brow_density * np.clip(1.0 + 0.3 * rng.standard_normal(len(xy)), 0.0, 1.0 / settings.brow_density)
        albedo = _blend(albedo, settings.brow_colour, _soft_inside(distance - half_width, 1.0) * hair * near_in_depth(brow))
    return albedo


def eye_albedo(iris: np.ndarray, pupil: np.ndarray, iris_colour: np.ndarray) -> np.ndarray:
    """(N, 3) albedo of an eye from (N,) iris and pupil weights in [0, 1]: the sclera, blended into
    ``iris_colour`` (3,) by ``iris``, then into a near-black pupil by ``pupil``."""
    return _blend(_blend(np.broadcast_to(SCLERA, (len(iris), 3)), iris_colour, iris), 0.03, pupil)


def _blend(base: np.ndarray, paint, weight: np.ndarray) -> np.ndarray:
    """``base * (1 - weight) + paint * weight`` with (V,) weights on (V, 3) colours."""
    return base + (paint - base) * weight[:, None]


def _soft_inside(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, a linear ramp ``edge`` wide across the boundary."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _segment_distance(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``(N, K)`` from ``(N, 2)`` points to ``K`` segments, and the position ``(N, K)`` in [0, 1] along each."""
    seg_x, seg_y = (ends - starts).T                        # (K,) each
    rel_x = points[:, :1] - starts[:, 0]                    # (N, K)
    rel_y = points[:, 1:] - starts[:, 1]
    t = np.clip((rel_x * seg_x + rel_y * seg_y) / np.maximum(seg_x**2 + seg_y**2, 1e-12), 0.0, 1.0)
    return np.hypot(rel_x - t * seg_x, rel_y - t * seg_y), t


def _polygon_signed_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """``(N,)`` distance from ``(N, 2)`` points to a closed ``(K, 2)`` polygon's outline, negative inside."""
    starts, ends = polygon, np.roll(polygon, -1, axis=0)
    distance = _segment_distance(points, starts, ends)[0].min(1)
    # Even-odd rule: count the edges crossed by a ray towards +x.
    py = points[:, 1:2]
    straddles = (starts[:, 1] > py) != (ends[:, 1] > py)    # (N, K)
    dy = np.where(ends[:, 1] == starts[:, 1], 1.0, ends[:, 1] - starts[:, 1])
    x_cross = starts[:, 0] + (py - starts[:, 1]) * (ends[:, 0] - starts[:, 0]) / dy
    inside = (straddles & (points[:, :1] < x_cross)).sum(1) % 2 == 1
    return np.where(inside, -distance, distance)


def _polyline_distance(points: np.ndarray, polyline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` distance from points to an open ``(K, 2)`` polyline and ``(N,)`` position along it in [0, 1]."""
    distance, t = _segment_distance(points, polyline[:-1], polyline[1:])
    nearest = distance.argmin(1)
    rows = np.arange(len(points))
    return distance[rows, nearest], (nearest + t[rows, nearest]) / (len(polyline) - 1)


# ----------------------------------------------------------------------------- textures


def _value_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """``(size, size, channels)`` smooth noise: a ``cells x cells`` random lattice, smoothstep-interpolated."""
    t = (np.arange(size) + 0.5) * (cells / size)
    left = np.minimum(t.astype(np.int64), cells - 1)
    frac = t - left
    weight = frac * frac * (3.0 - 2.0 * frac)
    interp = np.zeros((size, cells + 1))
    interp[np.arange(size), left] = 1.0 - weight
    interp[np.arange(size), left + 1] = weight
    lattice = rng.standard_normal((channels, cells + 1, cells + 1))
    return np.moveaxis(interp @ lattice @ interp.T, 0, -1)


def _octave_noise(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """``(size, size, channels)`` noise at three scales, roughly zero mean and unit std."""
    field_sum = sum(amplitude * _value_noise(rng, size, cells, channels)
                    for cells, amplitude in ((3, 1.0), (8, 0.5), (24, 0.25)))
    return field_sum / field_sum.std()


def texture_image(texture: TextureSettings, size: int) -> np.ndarray:
    """``(size, size, 3)`` float RGB in [0, 1] for a texture covering the whole crop."""
    rng = np.random.default_rng(texture.seed)
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size                 # crop fractions (row, col)
    along = u * np.cos(texture.angle) + v * np.sin(texture.angle)
    across = -u * np.sin(texture.angle) + v * np.cos(texture.angle)
    if texture.kind == "noise":
        noise = _octave_noise(rng, size, 1) + 0.4 * _octave_noise(rng, size, 3)
        mix = 1.0 / (1.0 + np.exp(-1.5 * noise))
    elif texture.kind == "gradient":
        mix = ((along - along.min()) / (along.max() - along.min()))[..., None]
    elif texture.kind == "stripes":
        mix = (0.5 + 0.5 * np.sin(2 * np.pi * along / texture.period))[..., None]
    elif texture.kind == "checker":
        mix = ((np.floor(along / texture.period) + np.floor(across / texture.period)) % 2)[..., None]
    else:
        raise ValueError(f"unknown texture kind {texture.kind!r}; expected one of {TEXTURE_KINDS}")
    colour = texture.colour_a + (texture.colour_b - texture.colour_a) * mix
    shading = 1.0 + texture.shading * np.tanh(_octave_noise(rng, size, 1))
    grain = 1.0 + texture.grain * _value_noise(rng, size, 64, 1)
    return np.clip(colour * shading * grain, 0.0, 1.0)


# ----------------------------------------------------------------------------- occluders


def _occluder_mask(occluder: OccluderSettings, face_box: np.ndarray, size: int) -> np.ndarray:
    """``(size, size)`` bool pixels covered by ``occluder`` placed in ``face_box`` (x0, y0, x1, y1) px."""
    box_min, box_extent = face_box[:2], face_box[2:] - face_box[:2] + 1.0
    centre = box_min + occluder.centre * box_extent
    half = np.maximum(occluder.half_size * box_extent, 1.0)
    rows, cols = np.mgrid[0:size, 0:size]
    dx, dy = cols - centre[0], rows - centre[1]
    cos, sin = np.cos(occluder.angle), np.sin(occluder.angle)
    # Pixel positions in the shape's own frame, where the shape fills [-1, 1]^2.
    local = np.stack([(cos * dx + sin * dy) / half[0], (-sin * dx + cos * dy) / half[1]], axis=-1)
    if occluder.shape == "ellipse":
        return (local**2).sum(-1) <= 1.0
    if occluder.shape == "rectangle":
        return np.abs(local).max(-1) <= 1.0
    if occluder.shape == "hand":
        palm = ((local[..., 0] / 0.5) ** 2 + ((local[..., 1] - 0.3) / 0.55) ** 2) <= 1.0
        # Four fingers pointing up (-y) and a thumb to the side, as capsules of the given radii.
        starts = np.array([[-0.36, 0.0], [-0.12, -0.05], [0.12, -0.05], [0.36, 0.0], [0.35, 0.45]])
        ends = np.array([[-0.42, -0.75], [-0.14, -0.98], [0.14, -0.93], [0.42, -0.7], [0.9, 0.0]])
        radii = np.array([0.1, 0.11, 0.11, 0.1, 0.13])
        distance = _segment_distance(local.reshape(-1, 2), starts, ends)[0].reshape(size, size, -1)
        return palm | (distance <= radii).any(-1)
    raise ValueError(f"unknown occluder shape {occluder.shape!r}; expected one of {OCCLUDER_SHAPES}")


# ----------------------------------------------------------------------------- shading


def _check_inputs(vertices_crop, triangles, albedo, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 vertices (V, 3), int64 triangles (T, 3) and float64 albedo (V, 3)."""
    vertices, triangles = check_mesh(vertices_crop, triangles, "render",
                                     fix="check the pose/scale that produced vertices_crop")
    albedo = np.asarray(albedo, dtype=np.float64)
    if albedo.shape != vertices.shape or not np.isfinite(albedo).all():
        raise ValueError(f"albedo must be a finite array of shape {vertices.shape} (one RGB per vertex), "
                         f"got {albedo.shape}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer number of pixels, got {size!r}")
    return vertices, triangles, albedo


def render(vertices_crop: np.ndarray, triangles: np.ndarray, albedo: np.ndarray, size: int,
           settings: RenderSettings, face_triangles: int | None = None,
           background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a posed mesh into a ``size x size`` crop.

    ``vertices_crop`` (V, 3) crop coordinates in px, ``triangles`` (T, 3) vertex ids
    (counter-clockwise seen from the front in the model frame), ``albedo`` (V, 3) in [0, 1].
    Returns the ``(size, size, 3)`` uint8 RGB image and the ``(size, size)`` bool face mask:
    pixels where the face is the front-most surface and no occluder hides it. The face is the first
    ``face_triangles`` triangles (None: all of them; the rest are a head around it, :mod:`data_prep.head`).
    ``background``: (S, S, 3) float RGB in [0, 1] behind the mesh (None: ``settings.background``'s texture).
    """
    intensity, face_mask = shade(vertices_crop, triangles, albedo, size, settings, face_triangles, background)
    if settings.occluders:
        rows, cols = np.nonzero(face_mask) if face_mask.any() else (np.array([0, size - 1]),) * 2
        face_box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)
        for occluder in settings.occluders:
            hidden = _occluder_mask(occluder, face_box, size)
            intensity[hidden] = texture_image(occluder.texture, size)[hidden]
            face_mask &= ~hidden

    if settings.blur_sigma > 0:
        sigma = settings.blur_sigma * size / REFERENCE_SIZE
        intensity = gaussian_filter(intensity, sigma=(sigma, sigma, 0), mode="nearest")
    if np.any(settings.motion_blur):
        intensity = motion_blurred(intensity, np.asarray(settings.motion_blur) * size / REFERENCE_SIZE)
    if settings.sensor_noise > 0:
        intensity = intensity + settings.sensor_noise * np.random.default_rng(settings.noise_seed).standard_normal(
            intensity.shape)
    intensity = intensity * np.asarray(settings.white_balance)
    image = np.clip(intensity, 0.0, 1.0) ** (1.0 / settings.gamma)
    return photographed(np.round(image * 255.0).astype(np.uint8), settings), face_mask


def shade(vertices_crop: np.ndarray, triangles: np.ndarray, albedo: np.ndarray, size: int, settings: RenderSettings,
          face_triangles: int | None = None, background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The lit mesh over ``background`` (or ``settings.background``'s texture) as :func:`render` takes them, before
    occluders and the camera: ``(S, S, 3)`` float RGB (linear, not clipped) and the ``(S, S)`` face mask."""
    vertices, triangles, albedo = _check_inputs(vertices_crop, triangles, albedo, size)
    raster = rasterise(vertices, triangles, size, size)
    covered = raster.mask

    # Per-pixel albedo and normal in one interpolation pass.
    pixel_values = raster.interpolate(np.hstack([albedo, vertex_normals(vertices, triangles)]), triangles)[covered]
    pixel_albedo, pixel_normal = pixel_values[:, :3], pixel_values[:, 3:]
    pixel_normal /= np.maximum(np.linalg.norm(pixel_normal, axis=1, keepdims=True), 1e-12)
    if covered.any() and (pixel_normal[:, 2] > 0).mean() > 0.5:
        raise ValueError("most visible surface faces away from the camera: triangles must be counter-clockwise "
                         "seen from the front in the model frame (reverse them with triangles[:, ::-1])")
    light = np.asarray(settings.light_direction, dtype=np.float64)
    light = light / np.linalg.norm(light)
    lit = np.maximum(pixel_normal @ light, 0.0)[:, None]
    if settings.shadows and covered.any():
        points = raster.interpolate(vertices, triangles)[covered]
        lit = lit * ~_in_shadow(vertices, triangles, points, light)[:, None]
    ambient = settings.ambient if settings.environment is None else \
        np.maximum(settings.environment[0] + pixel_normal @ settings.environment[1:], 0.0)
    light_colour = np.asarray(settings.light_colour)
    intensity = texture_image(settings.background, size) if background is None else np.array(background, float)
    intensity[covered] = pixel_albedo * (ambient + light_colour * lit)
    if settings.specular > 0:  # Blinn-Phong, the camera along +z
        halfway = (light + [0.0, 0.0, -1.0]) / np.linalg.norm(light + [0.0, 0.0, -1.0])
        highlight = np.maximum(pixel_normal @ halfway, 0.0)[:, None] ** settings.shininess * (lit > 0)
        intensity[covered] += settings.specular * light_colour * highlight
    return intensity, covered & (raster.triangle < (len(triangles) if face_triangles is None else face_triangles))


def motion_blurred(image: np.ndarray, smear: np.ndarray) -> np.ndarray:
    """``(S, S, C)`` float ``image`` averaged along the segment ``smear`` (2,) x, y px centred on each pixel, as
    a camera moving at constant speed during the exposure records it (a line kernel, bilinear between pixels)."""
    length = float(np.linalg.norm(smear))
    reach = int(np.ceil(length / 2)) + 1
    kernel = np.zeros((2 * reach + 1, 2 * reach + 1))
    steps = np.linspace(-0.5, 0.5, 4 * int(np.ceil(length)) + 1)[:, None] * np.asarray(smear)[None] + reach
    low = np.floor(steps).astype(int)
    for dx in (0, 1):   # splat each point of the segment onto its four nearest kernel cells
        for dy in (0, 1):
            weight = (1 - np.abs(steps[:, 0] - low[:, 0] - dx)) * (1 - np.abs(steps[:, 1] - low[:, 1] - dy))
            np.add.at(kernel, (low[:, 1] + dy, low[:, 0] + dx), weight)
    kernel /= kernel.sum()
    return np.stack([convolve(image[..., channel], kernel, mode="nearest") for channel in range(image.shape[2])], -1)


def _in_shadow(vertices: np.ndarray, triangles: np.ndarray, points: np.ndarray, light: np.ndarray) -> np.ndarray:
    """(P,) whether each of ``points`` (P, 3) crop px lies more than :data:`SHADOW_BIAS_PX` behind the surface
    of the mesh nearest the light (unit ``light``, from the surface toward it): a shadow map, the mesh
    z-buffered as seen from the light at one pixel per crop pixel."""
    toward_camera = np.array([0.0, 0.0, -1.0])
    axis = np.cross(light, toward_camera)
    sine, cosine = np.linalg.norm(axis), float(light @ toward_camera)
    if sine < 1e-9:  # the light is the camera
        rotation = np.eye(3)
    else:
        k = axis / sine
        cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rotation = np.eye(3) + sine * cross + (1 - cosine) * cross @ cross  # takes the light's direction to -z
    seen, queried = vertices @ rotation.T, points @ rotation.T
    origin = seen[:, :2].min(axis=0) - 1.0
    width, height = (np.ceil(seen[:, :2].max(axis=0) - origin) + 2).astype(int)
    depth = rasterise(seen - [*origin, 0.0], triangles, height, width).depth
    col, row = np.round(queried[:, :2] - origin).astype(int).T
    inside = (col >= 0) & (row >= 0) & (col < width) & (row < height)
    nearest = np.full(len(points), np.inf)
    nearest[inside] = depth[row[inside], col[inside]]
    return queried[:, 2] > nearest + SHADOW_BIAS_PX


def photographed(image: np.ndarray, settings: RenderSettings) -> np.ndarray:
    """``(S, S, 3)`` uint8 through the camera's lower resolution (scaled down by ``downscale``, back up) and JPEG."""
    size = image.shape[0]
    if settings.downscale > 1.0:
        small = max(1, round(size / settings.downscale))
        picture = Image.fromarray(image).resize((small, small), Image.Resampling.BILINEAR, reducing_gap=None)
        image = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR))
    if settings.jpeg_quality:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=settings.jpeg_quality)
        image = np.asarray(Image.open(buffer).convert("RGB"))
    return image
