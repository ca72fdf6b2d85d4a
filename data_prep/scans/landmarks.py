"""A scan's 68 landmarks and face region: the frontal render that landmark files and the detector refer to,
2D landmarks lifted onto the surface through its depth, and the triangles near the nose tip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.render import RenderSettings, TextureSettings, render
from data_prep.scans.reading import Scan, ScanError
from lightning_vrn.geometry.crop import landmark_crop
from lightning_vrn.geometry.pose import model_to_crop
from lightning_vrn.geometry.raster import rasterise
from lightning_vrn.landmark_scheme import NUM_LANDMARKS, outer_interocular

FACE_RADIUS_RATIO = 1.0
"""Face-region radius about the nose tip in outer interocular distances (about 95 mm on an adult: the
radius commonly cropped from Florence scans; it keeps forehead, cheeks and chin and drops ears and neck)."""
NOSE_TIP = 30
"""0-based iBUG index of the nose tip (31, 1-based)."""
MIN_FACE_VERTICES = 100
"""A face region with fewer vertices means no face was found."""
FRONTAL_SIZE = 192
"""Side (px) of the frontal render that 68x2 landmark files refer to (``--save-frontal`` writes it)."""
FRONTAL_FILL = 0.9
"""The frontal render's scale: the scan's larger x/y extent spans this fraction of the image."""
LIFT_SEARCH_PX = 3
"""A 2D landmark off the rendered scan takes the depth of the nearest covered pixel within this many pixels."""
LANDMARK_SUFFIXES = (".txt", ".npy")


@dataclass(frozen=True)
class FrontalView:
    """The orthographic frontal render's placement: ``crop = model_to_crop(vertices, 0, scale, translation)``."""

    scale: float              # px per scan unit
    translation: np.ndarray   # (3,) crop position of the scan origin (px)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        return model_to_crop(points, np.zeros(3), self.scale, self.translation)

    def to_scan(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_crop` for ``(N, 3)`` crop points."""
        return (np.asarray(points, dtype=np.float64) - self.translation) / self.scale * np.array([1.0, -1.0, -1.0])


def frontal_view(vertices: np.ndarray, size: int, landmarks_2d_scan: np.ndarray | None = None) -> FrontalView:
    """Placement of the frontal render of ``size`` px: the scan's x/y box filling :data:`FRONTAL_FILL` of it,
    centred; or, given ``(68, 2)`` scan-frame x/y landmarks, their box placed as
    :func:`~lightning_vrn.geometry.crop.landmark_crop` places a face. The nearest point is at z = 0."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if landmarks_2d_scan is None:
        lo, hi = vertices[:, :2].min(0), vertices[:, :2].max(0)
        scale = FRONTAL_FILL * size / max(float((hi - lo).max()), 1e-12)
        centre = (size - 1) / 2.0
        translation = np.array([centre - scale * 0.5 * (lo[0] + hi[0]), centre + scale * 0.5 * (lo[1] + hi[1])])
    else:
        flipped = np.asarray(landmarks_2d_scan, dtype=np.float64) * [1.0, -1.0]  # y down, as in the crop
        crop = landmark_crop(flipped, size)
        scale, translation = crop.scale, np.asarray(crop.translation)
    return FrontalView(scale, np.append(translation, scale * vertices[:, 2].max()))


def neutral_settings() -> RenderSettings:
    """Lighting for the frontal render that landmarks are found on: white light from the camera, grey background."""
    grey = np.full(3, 0.5)
    background = TextureSettings("noise", grey, grey, 0.0, 0.1, 0.0, 0.0, 0)
    return RenderSettings(light_direction=np.array([0.0, 0.0, -1.0]), light_colour=np.full(3, 0.7), ambient=0.4,
                          skin_tone=grey, background=background)


def render_frontal(scan: Scan, view: FrontalView, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 frontal render of ``scan`` placed by ``view`` under :func:`neutral_settings`."""
    return render(view.to_crop(scan.vertices), scan.triangles, scan.albedo, size, neutral_settings())[0]


def lift_landmarks(landmarks_px: np.ndarray, scan: Scan, view: FrontalView, size: int, where: str) -> np.ndarray:
    """``(68, 2)`` pixels on the frontal render (``view``, ``size``) -> ``(68, 3)`` scan-frame points on the surface.

    Depth: bilinear over the covered pixels around each landmark (the nearest covered pixel within
    :data:`LIFT_SEARCH_PX` when none of the four is covered). :class:`ScanError` (naming ``where``) for
    a landmark off the scan.
    """
    landmarks_px = np.asarray(landmarks_px, dtype=np.float64)
    depth = rasterise(view.to_crop(scan.vertices), scan.triangles, size, size).depth
    covered = np.isfinite(depth)
    rows, cols = np.nonzero(covered)
    lifted = np.empty((NUM_LANDMARKS, 3))
    for i, (x, y) in enumerate(landmarks_px):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        weights, values = [], []
        for yy, xx, weight in ((y0, x0, (1 - (x - x0)) * (1 - (y - y0))), (y0, x0 + 1, (x - x0) * (1 - (y - y0))),
                               (y0 + 1, x0, (1 - (x - x0)) * (y - y0)), (y0 + 1, x0 + 1, (x - x0) * (y - y0))):
            if 0 <= yy < size and 0 <= xx < size and covered[yy, xx]:
                weights.append(weight)
                values.append(depth[yy, xx])
        if sum(weights) > 1e-9:
            z = float(np.dot(weights, values) / sum(weights))
        else:
            distance = np.hypot(cols - x, rows - y) if len(rows) else np.array([np.inf])
            nearest = int(distance.argmin())
            if distance[nearest] > LIFT_SEARCH_PX:
                raise ScanError(f"{where}: landmark {i + 1} (1-based) at ({x:.1f}, {y:.1f}) px of the frontal render "
                                f"is not on the scan: no face found (check the landmarks or the scan's orientation)")
            z = float(depth[rows[nearest], cols[nearest]])
        lifted[i] = (x, y, z)
    return view.to_scan(lifted)


class LandmarkDetector:
    """68 landmarks of a frontal render by a trained landmark checkpoint (``landmark_hourglass``).

    Two passes: the whole scan framed by :func:`frontal_view`, then the face re-framed by the first
    pass's landmarks as the detector was trained (``sqrt(w h)`` of the landmark box at
    :data:`~lightning_vrn.geometry.crop.LANDMARK_BOX_FRACTION` of its crop).
    """

    def __init__(self, checkpoint):
        import torch

        from lightning_vrn.models import load_model

        torch.set_num_threads(1)
        self.model = load_model(checkpoint)
        if not callable(getattr(self.model, "landmarks", None)):
            raise ValueError(f"--landmarks-model {checkpoint}: variant {self.model.variant!r} predicts no landmarks; "
                             f"pass a landmark_hourglass checkpoint (python -m experiments.train with its config)")
        self.crop_size = self.model.grid.crop_size

    def detect(self, image: np.ndarray) -> np.ndarray:
        """``(S, S, 3)`` uint8 render at the detector's crop size -> ``(68, 2)`` float64 pixels."""
        import torch

        batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)}
        return self.model.landmarks(batch)[0].double().numpy()

    def find(self, scan: Scan, where: str) -> np.ndarray:
        """``(68, 3)`` scan-frame landmarks of ``scan``."""
        view = frontal_view(scan.vertices, self.crop_size)
        landmarks = lift_landmarks(self.detect(render_frontal(scan, view, self.crop_size)), scan, view,
                                   self.crop_size, where)
        view = frontal_view(scan.vertices, self.crop_size, landmarks[:, :2])
        return lift_landmarks(self.detect(render_frontal(scan, view, self.crop_size)), scan, view,
                              self.crop_size, where)


def landmark_file(landmark_dir: Path, scan_id: str) -> Path | None:
    """``landmark_dir/<scan id>.txt`` or ``.npy`` (the scan's path under the root, suffix replaced), if present."""
    for suffix in LANDMARK_SUFFIXES:
        candidate = landmark_dir / f"{scan_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_landmark_file(path: Path, scan: Scan) -> np.ndarray:
    """``(68, 3)`` scan-frame landmarks from a file of 68 rows: x y z on the scan, or x y pixels on the frontal
    render (:func:`frontal_view` at :data:`FRONTAL_SIZE`), lifted. Text: whitespace or commas."""
    try:
        values = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except ValueError:
        try:
            values = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as error:
            raise ScanError(f"{path}: not a table of numbers ({error}); write 68 rows of 'x y' or 'x y z'") from None
    values = np.asarray(values, dtype=np.float64)
    if values.shape not in ((NUM_LANDMARKS, 2), (NUM_LANDMARKS, 3)) or not np.isfinite(values).all():
        raise ScanError(f"{path}: landmarks must be 68 finite rows of 'x y' (pixels on the {FRONTAL_SIZE} px frontal "
                        f"render) or 'x y z' (on the scan), got shape {values.shape}")
    if values.shape[1] == 3:
        return values
    return lift_landmarks(values, scan, frontal_view(scan.vertices, FRONTAL_SIZE), FRONTAL_SIZE, str(path))


# ----------------------------------------------------------------------------- face region


def face_region(vertices: np.ndarray, triangles: np.ndarray, landmarks_3d: np.ndarray,
                where: str) -> tuple[np.ndarray, np.ndarray]:
    """The sub-mesh ``(F, 3)``, ``(T_f, 3)`` of triangles whose corners all lie within
    :data:`FACE_RADIUS_RATIO` interocular distances of the nose tip; unused vertices dropped."""
    interocular = float(outer_interocular(landmarks_3d))
    if not interocular > 0:
        raise ScanError(f"{where}: the outer eye corners coincide: no face found")
    inside = np.linalg.norm(vertices - landmarks_3d[NOSE_TIP], axis=1) <= FACE_RADIUS_RATIO * interocular
    kept = triangles[inside[triangles].all(axis=1)]
    used = np.unique(kept)
    if len(used) < MIN_FACE_VERTICES:
        raise ScanError(f"{where}: only {len(used)} scan vertices within {FACE_RADIUS_RATIO:g} interocular distances "
                        f"of the nose tip: no face found (check the landmarks)")
    new_id = np.full(len(vertices), -1, dtype=np.int64)
    new_id[used] = np.arange(len(used))
    return vertices[used], new_id[kept]
