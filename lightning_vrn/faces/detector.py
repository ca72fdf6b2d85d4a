"""Face boxes and five points in a photo: MTCNN (Zhang et al. 2016) with the weights of the facenet-pytorch wheel.

MTCNN is a cascade of three small networks: P-Net slides over an image pyramid and proposes boxes,
R-Net rejects most of them from 24x24 patches, O-Net scores the rest from 48x48 patches and regresses
five points (eye centres, nose tip, mouth corners). Each stage refines its boxes by a regressed offset,
makes them square and drops overlapping ones (non-maximum suppression).

Why this detector (docs/reconstruct.md has the measurements): its weights ship inside the
``facenet-pytorch==2.5.3`` wheel (MIT; 2.0 MB of weight files), so nothing downloads at run time, and it needs only torch.
The package itself cannot be imported beside the suite's CPU torch build: it imports torchvision, whose
PyPI wheels link the CUDA torch libraries. So the Makefile installs it with ``--no-deps`` and this module
reads its three weight files and runs the cascade itself (the networks' layer names are the files' keys).

Coordinates: boxes ``(x0, y0, x1, y1)`` and points ``(x, y)`` in pixels of the photo, pixel centres at
integers (docs/conventions.md). Images: ``(H, W, 3)`` uint8 RGB.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_PACKAGE = "facenet_pytorch"
INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.5.3 (its torchvision dependency is not needed)"
PYRAMID_FACTOR = 0.709
"""Scale between pyramid levels (the MTCNN authors' released code)."""
STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
"""Face probability each stage needs to keep a box (the MTCNN authors' released code)."""


@dataclass(frozen=True)
class FaceBox:
    """One detected face: ``box`` ``(x0, y0, x1, y1)`` float pixels, ``score`` the O-Net face probability,
    ``points`` ``(5, 2)`` float pixels: left eye, right eye (as seen in the photo), nose tip, mouth corners."""

    box: tuple[float, float, float, float]
    score: float
    points: np.ndarray

    @property
    def size(self) -> float:
        """sqrt(width * height) of the box in pixels."""
        return float(np.sqrt(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)))


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output pixel at stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> face probability ``(B, H', W')`` and box offsets ``(B, 4, H', W')``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24x24 patches."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, 24, 24)`` -> face probability ``(B,)`` and box offsets ``(B, 4)``."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_caffe_flatten(x)))
        return self.dense5_1(x).softmax(dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 patches: probability, box offsets and five points."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 3, 48, 48)`` -> probability ``(B,)``, box offsets ``(B, 4)``, points ``(B, 10)`` (5 x, then 5 y,
        as fractions of the patch)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_caffe_flatten(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).softmax(dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, W * H * C)`` in the (W, H, C) order the converted Caffe weights expect."""
    return x.permute(0, 3, 2, 1).reshape(len(x), -1)


def weights_folder() -> Path:
    """The installed facenet-pytorch wheel's ``data/`` folder (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folder = None if spec is None or not spec.submodule_search_locations else \
        Path(next(iter(spec.submodule_search_locations))) / "data"
    if folder is None or not all((folder / f"{name}.pt").is_file() for name in ("pnet", "rnet", "onet")):
        raise FileNotFoundError(f"the face detector's weights (facenet-pytorch's data/pnet.pt, rnet.pt, onet.pt) "
                                f"are not installed: {INSTALL_HINT}")
    return folder


class FaceDetector:
    """MTCNN on CPU or GPU: :meth:`detect` gives every face of at least ``min_face_px`` pixels, best first."""

    def __init__(self, min_face_px: float = 20.0, device: str | torch.device = "cpu"):
        if min_face_px < 12:
            raise ValueError(f"min_face_px must be at least 12 (P-Net's window), got {min_face_px}")
        self.min_face_px, self.device = float(min_face_px), torch.device(device)
        folder = weights_folder()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
            net.to(self.device).eval()

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in an ``(H, W, 3)`` uint8 RGB photo, by descending score (empty when there is none).

        On the CPU the cascade runs on one thread: its thousands of tiny operations ran 9x slower on two threads
        than on one when another process shared the two cores (2.6 s against 24 s for a 1920x1080 photo)."""
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._detect(image)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def _detect(self, image: np.ndarray) -> list[FaceBox]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"the image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        pixels = torch.from_numpy(np.array(image)).to(self.device).permute(2, 0, 1)[None].float()
        pixels = normalised(pixels)
        boxes = self._propose(pixels)
        if len(boxes):
            boxes = self._refine(pixels, boxes)
        if not len(boxes):
            return []
        boxes, scores, points = self._output(pixels, boxes)
        order = torch.argsort(scores, descending=True).tolist()
        return [FaceBox(tuple(float(v) for v in boxes[i]), float(scores[i]), points[i].cpu().numpy().astype(np.float64))
                for i in order]

    def _propose(self, pixels: torch.Tensor) -> torch.Tensor:
        """P-Net over the pyramid: ``(N, 4)`` square candidate boxes."""
        height, width = pixels.shape[-2:]
        scale = 12.0 / self.min_face_px
        windows, scores, offsets = [], [], []
        while min(height, width) * scale >= 12:
            level = F.interpolate(pixels, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            probability, level_offsets = self.pnet(level)
            rows, cols = torch.nonzero(probability[0] >= STAGE_THRESHOLDS[0], as_tuple=True)
            # Each output pixel is a 12x12 window at stride 2 of the level; these photo pixels, rounded as in
            # training (1-based there, hence the + 1 and - 1):
            cells = torch.stack([cols, rows], dim=1).float() * 2
            level_windows = torch.floor(torch.cat([cells + 1, cells + 12], dim=1) / scale) - 1
            level_scores = probability[0, rows, cols]
            keep = nms(level_windows, level_scores, 0.5)
            windows.append(level_windows[keep])
            scores.append(level_scores[keep])
            offsets.append(level_offsets[0, :, rows, cols].T[keep])
            scale *= PYRAMID_FACTOR
        if not windows:
            return torch.zeros(0, 4, device=pixels.device)
        windows, scores, offsets = torch.cat(windows), torch.cat(scores), torch.cat(offsets)
        kept = nms(windows, scores, 0.7)
        return _square(_shift_by_offsets(windows[kept], offsets[kept], plus_one=False))

    def _refine(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """R-Net: the candidates it keeps, shifted and squared."""
        probability, offsets = self.rnet(_patches(pixels, boxes, 24))
        keep = probability > STAGE_THRESHOLDS[1]
        boxes, probability, offsets = boxes[keep], probability[keep], offsets[keep]
        kept = nms(boxes, probability, 0.7)
        return _square(_shift_by_offsets(boxes[kept], offsets[kept], plus_one=True))

    def _output(self, pixels: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net: final boxes ``(F, 4)``, scores ``(F,)`` and points ``(F, 5, 2)``."""
        probability, offsets, fractions = self.onet(_patches(pixels, boxes, 48))
        keep = probability > STAGE_THRESHOLDS[2]
        boxes, probability, offsets, fractions = boxes[keep], probability[keep], offsets[keep], fractions[keep]
        size = (boxes[:, 2:] - boxes[:, :2] + 1)[:, None, :]
        points = boxes[:, None, :2] + torch.stack([fractions[:, :5], fractions[:, 5:]], dim=2) * size
        boxes = _shift_by_offsets(boxes, offsets, plus_one=True)
        kept = nms(boxes, probability, 0.7, by_smaller_area=True)
        return boxes[kept], probability[kept], points[kept]


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 pixel values -> the nets' input scale, about [-1, 1]."""
    return (pixels - 127.5) / 128.0


BLACK = float(normalised(torch.tensor(0.0)))
"""A black pixel on the nets' input scale (what a patch reaching outside the photo is padded with)."""


def _shift_by_offsets(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Boxes moved by regressed offsets ``(N, 4)``, each a fraction of the box's width or height (P-Net's are of
    the size without the ``+ 1``: how the weights were trained)."""
    size = boxes[:, 2:] - boxes[:, :2] + (1 if plus_one else 0)
    return boxes + offsets * size.repeat(1, 2)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square about the same centre, side ``max(width, height)``."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _patches(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 3, size, size)``: each box's pixels (black outside the photo, as the authors' code pads) area-resampled
    to the net's input."""
    height, width = pixels.shape[-2:]
    whole = boxes.trunc().long()
    pad = int(max(0, -whole[:, :2].min().item(), (whole[:, 2] - width + 1).max().item(),
                  (whole[:, 3] - height + 1).max().item()))
    padded = F.pad(pixels, (pad, pad, pad, pad), value=BLACK)
    patches = [F.interpolate(padded[:, :, y0 + pad:y1 + pad + 1, x0 + pad:x1 + pad + 1], size=(size, size), mode="area")
               for x0, y0, x1, y1 in whole.tolist()]
    return torch.cat(patches)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_smaller_area: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best first. A box is dropped when its overlap
    with a kept one exceeds ``threshold``: intersection over union, or over the smaller box's area. (In numpy: a
    photo's P-Net proposals number thousands, and per-box torch calls cost more than the arithmetic.)"""
    order = np.argsort(-scores.cpu().numpy(), kind="stable")
    corners = boxes.cpu().numpy()[order]
    area = (corners[:, 2] - corners[:, 0] + 1) * (corners[:, 3] - corners[:, 1] + 1)
    dropped = np.zeros(len(order), bool)
    for i in range(len(order)):
        if dropped[i]:
            continue
        rest = np.flatnonzero(~dropped[i + 1:]) + i + 1
        low = np.maximum(corners[i, :2], corners[rest, :2])
        high = np.minimum(corners[i, 2:], corners[rest, 2:])
        intersection = np.prod(np.clip(high - low + 1, 0, None), axis=1)
        base = np.minimum(area[i], area[rest]) if by_smaller_area else area[i] + area[rest] - intersection
        dropped[rest[intersection / base > threshold]] = True
    return torch.from_numpy(order[~dropped]).to(boxes.device)
