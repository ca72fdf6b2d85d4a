"""From a photo to one mesh per face, in the photo's pixel coordinates.

For every face the detector (:class:`~lightning_vrn.faces.detector.FaceDetector`) finds:

1. **Landmarks and crop.** With a landmark hourglass: it runs once on the crop that the authors' rule
   (:func:`~lightning_vrn.geometry.crop.landmark_crop`) makes of a landmark box estimated from the detector's box
   (:func:`detector_box_crop`), and the model's crop is the authors' crop of its landmarks. A second pass on that
   crop was measured and made the landmarks worse (benchmarks/results_photo_landmarks.md). **Fallback when the
   hourglass is unsure** (its 68 heatmap maxima average below :data:`CONFIDENT_PEAK`): the face is cropped from
   the detector's box, and a guided model still gets the hourglass's landmarks; the report says
   ``detector box (hourglass unsure)``. Without a landmark hourglass every face is cropped from its box.
2. **Volume.** The crop at the model's grid goes through the model (a guided model also gets the landmarks'
   heatmaps) and its 0.5 iso-surface is taken (:func:`~lightning_vrn.geometry.isosurface.volume_to_mesh`).
3. **Back to the photo.** The crop's similarity is undone
   (:meth:`~lightning_vrn.geometry.crop.CropTransform.invert`): x, y in photo pixels, z in the same pixel units,
   growing away from the camera, 0 at the crop's front plane (:func:`~lightning_vrn.geometry.crop.front_z`: the
   face's nearest point lies about there). Vertex colours are sampled from the photo.

The face detector runs photo by photo; the faces of a list of photos go through the hourglass and the volume
model in batches of :data:`FACES_PER_PASS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_vrn.faces.detector import FaceBox, FaceDetector
from lightning_vrn.geometry.crop import (LANDMARK_BOX_FRACTION, CropTransform, box_crop, front_z, landmark_crop,
                                         resample_crop)
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.heatmaps import decode_heatmaps, gaussian_heatmaps
from lightning_vrn.models.base import VRNModule
from lightning_vrn.models.guided import VRNGuided
from lightning_vrn.models.landmark_hourglass import LandmarkHourglass
from lightning_vrn.models.volume import occupancy
from lightning_vrn.visualise import vertex_colours_from_image

LANDMARK_BOX_SCALE = 0.91
LANDMARK_BOX_SHIFT = (0.0, 0.155)
"""The 68-landmark box estimated from an MTCNN box: ``sqrt(w * h)`` is ``LANDMARK_BOX_SCALE`` times the box's and
its centre lies ``LANDMARK_BOX_SHIFT`` box sizes from the box's centre. Measured on the 17 photos of
``../shared/data/aflw2000_samples`` and ``300wlp_sample`` (not the validation photos): size ratio median 0.917,
mean 0.907, spread 0.05; centre shift x median 0.02, mean 0.003 (0 taken: faces are symmetric), y median 0.155,
mean 0.154, spread 0.02."""
CONFIDENT_PEAK = 0.45
"""The landmark hourglass is trusted when its 68 heatmap maxima average at least this (targets peak at 1). Chosen on
``aflw2000_val`` (docs/reconstruct.md, "Landmarks on real photos"): the faces below it have twice the landmark
error of the rest. The value depends on how the hourglass was trained (its sigma, its training length)."""
MAX_UPSAMPLING = 2.0
"""A face is too small to crop when the crop would enlarge it more than this (its box under half the crop's
landmark box)."""
FACES_PER_PASS = 8
"""Faces per forward pass of the hourglass and of the volume model (a crowd photo does not fill the memory)."""


@dataclass
class PhotoFace:
    """One face of a photo. ``box``: the detector's; ``status``: ``ok`` or why there is no mesh; ``landmarks``
    ``(68, 2)`` photo pixels (None without a landmark hourglass); ``landmark_source``: how the crop was made;
    ``crop``: photo -> model crop; ``vertices`` ``(V, 3)`` photo pixels (module docstring), ``triangles``
    ``(T, 3)``, ``colours`` ``(V, 3)`` in [0, 1] sampled from the photo."""

    box: FaceBox
    status: str = "ok"
    landmarks: np.ndarray | None = None
    landmark_source: str = ""
    crop: CropTransform | None = None
    vertices: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    triangles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    colours: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


def detector_box_crop(box: FaceBox, crop_size: int) -> CropTransform:
    """The authors' crop of the landmark box estimated from a detector box (:data:`LANDMARK_BOX_SCALE`)."""
    x0, y0, x1, y1 = box.box
    half = LANDMARK_BOX_SCALE * box.size / 2
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + np.asarray(LANDMARK_BOX_SHIFT) * box.size
    return box_crop(centre - half, centre + half, crop_size)


def image_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """``(B, 3, S, S)`` float in [0, 1] from ``(S, S, 3)`` uint8 crops."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)


@torch.no_grad()
def hourglass_landmarks(landmark_model: LandmarkHourglass, images: list[np.ndarray],
                        boxes: list[FaceBox]) -> list[tuple[np.ndarray, float]]:
    """The hourglass on the crop of each face's detector box (:func:`detector_box_crop`), batched over the
    faces: ``(68, 2)`` photo-pixel landmarks and the mean of the 68 heatmap maxima (its confidence)."""
    size = landmark_model.grid.crop_size
    crops = [detector_box_crop(box, size) for box in boxes]
    batch = {"image": image_batch([resample_crop(image, crop, size) for image, crop in zip(images, crops)])}
    heatmaps = landmark_model.eval()(batch)["heatmaps"]
    peaks = heatmaps.flatten(2).max(dim=-1).values.mean(dim=1).tolist()
    return [(crop.invert(points), peak) for crop, points, peak in zip(crops, decode_heatmaps(heatmaps).numpy(), peaks)]


class PhotoReconstructor:
    """Faces of photos -> meshes with a volume ``model`` (any registered variant) and, optionally, a
    ``landmark_model`` (a landmark hourglass; a guided model needs one)."""

    def __init__(self, model: VRNModule, landmark_model: LandmarkHourglass | None = None,
                 detector: FaceDetector | None = None):
        if not hasattr(model, "target_frame") or model.target_frame is None:
            raise ValueError(f"{type(model).__name__} predicts no volume: give a volume model's checkpoint "
                             f"(a landmark hourglass goes to --landmarks)")
        if isinstance(model, VRNGuided) and landmark_model is None:
            raise ValueError(f"{type(model).__name__} is guided by landmarks: give a landmark hourglass checkpoint "
                             f"with --landmarks")
        if landmark_model is not None and not isinstance(landmark_model, LandmarkHourglass):
            raise ValueError(f"the landmark model must be a landmark_hourglass, got {type(landmark_model).__name__}")
        self.model, self.landmark_model = model.eval(), landmark_model
        if landmark_model is not None:
            landmark_model.eval()
        self.detector = detector or FaceDetector()

    def smallest_croppable_face_px(self) -> float:
        """The smallest detector box (sqrt(w * h), pixels) that is cropped (:data:`MAX_UPSAMPLING`)."""
        return LANDMARK_BOX_FRACTION * self.model.grid.crop_size / MAX_UPSAMPLING / LANDMARK_BOX_SCALE

    @torch.no_grad()
    def reconstruct(self, images: list[np.ndarray]) -> list[list[PhotoFace]]:
        """For each ``(H, W, 3)`` uint8 RGB photo, its faces by descending detector score."""
        per_photo = [[PhotoFace(box) for box in self.detector.detect(image)] for image in images]
        smallest = self.smallest_croppable_face_px()
        for face in (face for faces in per_photo for face in faces):
            if face.box.size < smallest:
                face.status = f"face too small to crop ({face.box.size:.0f} px < {smallest:.0f} px)"
        todo = [(image, face) for image, faces in zip(images, per_photo) for face in faces if face.status == "ok"]
        for first in range(0, len(todo), FACES_PER_PASS):
            chunk = todo[first:first + FACES_PER_PASS]
            self._find_landmarks(chunk)
            self._predict_meshes(chunk)
        return per_photo

    def _find_landmarks(self, todo: list[tuple[np.ndarray, PhotoFace]]) -> None:
        """Set each face's crop, landmarks and landmark source (module docstring, step 1)."""
        size = self.model.grid.crop_size
        if self.landmark_model is None:
            for _, face in todo:
                face.crop, face.landmark_source = detector_box_crop(face.box, size), "detector box"
            return
        found = hourglass_landmarks(self.landmark_model, [image for image, _ in todo], [face.box for _, face in todo])
        for (_, face), (points, peak) in zip(todo, found):
            face.landmarks = points
            if peak >= CONFIDENT_PEAK:
                face.crop, face.landmark_source = landmark_crop(points, size), f"hourglass (peak {peak:.2f})"
            else:
                face.crop = detector_box_crop(face.box, size)
                face.landmark_source = f"detector box (hourglass unsure: peak {peak:.2f})"

    def _predict_meshes(self, todo: list[tuple[np.ndarray, PhotoFace]]) -> None:
        """Run the volume model on every face's crop and map each iso-surface to its photo (steps 2 and 3)."""
        grid = self.model.grid
        batch = {"image": image_batch([resample_crop(image, face.crop, grid.crop_size) for image, face in todo])}
        if isinstance(self.model, VRNGuided):
            crop_points = torch.from_numpy(np.stack([face.crop.apply(face.landmarks) for _, face in todo])).float()
            batch["heatmaps"] = gaussian_heatmaps(crop_points, grid.height, grid.width, self.model.heatmap_sigma)
        volumes = occupancy(self.model(batch)["volume_logits"]).numpy()
        for (image, face), volume in zip(todo, volumes):
            vertices, face.triangles = volume_to_mesh(volume, grid)
            if not len(vertices):
                face.status = "empty volume: the model saw no face in the crop"
                continue
            face.vertices = face.crop.invert(vertices, z_shift=front_z(grid))
            face.colours = vertex_colours_from_image(face.vertices, image)
