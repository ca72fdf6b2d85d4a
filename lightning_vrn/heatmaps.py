"""Landmark heatmaps: one unnormalised 2D Gaussian (peak 1) per landmark, and back to landmarks.

Encoded by the DataModule (targets of the landmark hourglass, guidance maps of VRN-Guided) and by
models from predicted landmarks; decoded from a detector's predicted maps with sub-pixel refinement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


CENTROID_RADIUS = 6
"""Half-side (pixels) of the window around the argmax whose centroid :func:`decode_heatmaps` takes: 3 sigma
of the widest supported Gaussian (2 px), and 1.5 cells of a quarter-resolution head upsampled x4."""

LOG_FLOOR = 1e-6
"""Smallest heatmap value (relative to each map's peak) the border fit takes the log of; a sigma 0.5 px
Gaussian is still 4e-6 of its peak 2.5 px away, so exact Gaussians are not clipped."""


@dataclass
class HeatmapSettings:
    """A model's landmark maps (targets or guidance): a Gaussian of ``sigma_px`` pixels of the model's own crop.

    Not scaled with the crop (unlike the other pixel settings, given at 192 px): a heatmap resolves nothing
    below a pixel, so the paper's 1 px at 192 stays 1 px at a 96 px crop, and one preset serves every size
    (docs/conventions.md, "Heatmaps")."""

    sigma_px: float = 1.0

    def __post_init__(self):
        if self.sigma_px <= 0:
            raise ValueError(f"model.sigma_px must be a positive number of pixels, got {self.sigma_px}")


@dataclass
class HeatmapRegressionSettings(HeatmapSettings):
    """A model that regresses heatmaps: ``foreground_weight`` w weights each pixel's squared error by
    ``1 + w * target`` (0: the paper's plain MSE). Maps a pixel or two wide are almost all background,
    and a short CPU training settles on empty maps with plain MSE; a weight of 100 lets the quickstart
    detector learn them (docs/variants.md; measured in benchmarks/results_settings.md)."""

    foreground_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.foreground_weight < 0:
            raise ValueError(f"model.foreground_weight must be >= 0, got {self.foreground_weight}")


def heatmap_loss(predicted: torch.Tensor, target: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """Mean over all but the leading dimensions of ``(1 + foreground_weight * target) * (predicted - target)^2``.

    ``predicted`` ``(B, ..., L, H, W)`` (any leading extra axes, e.g. stacks, broadcast against the
    target ``(B, L, H, W)`` placed last); returns ``(...)``: one value per extra axis (a scalar without).
    """
    extra = predicted.ndim - target.ndim
    target = target.reshape(target.shape[:1] + (1,) * extra + target.shape[1:])
    errors = (1.0 + foreground_weight * target) * (predicted.float() - target) ** 2
    dims = (0, *range(extra + 1, predicted.ndim))
    return errors.mean(dim=dims)


def gaussian_heatmaps(landmarks_2d: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """``(B, L, 2)`` landmark crop pixels ``(x, y)`` -> ``(B, L, height, width)`` Gaussians.

    Heatmap ``[b, l, row, col] = exp(-((col - x)^2 + (row - y)^2) / (2 sigma^2))`` with ``sigma``
    in pixels; it is 1 at a landmark that sits on a pixel centre. Built as the outer product of
    two 1D Gaussians, in the landmarks' float dtype (float32 for integer input) and device.
    """
    if landmarks_2d.ndim != 3 or landmarks_2d.shape[-1] != 2:
        raise ValueError(f"landmarks_2d must be (B, L, 2), got {tuple(landmarks_2d.shape)}")
    if sigma <= 0:
        raise ValueError(f"heatmap sigma must be positive (pixels), got {sigma}")
    dtype = landmarks_2d.dtype if landmarks_2d.is_floating_point() else torch.float32
    landmarks_2d = landmarks_2d.to(dtype)
    cols = torch.arange(width, dtype=dtype, device=landmarks_2d.device)
    rows = torch.arange(height, dtype=dtype, device=landmarks_2d.device)
    scale = -0.5 / float(sigma) ** 2
    along_x = torch.exp(scale * (cols - landmarks_2d[..., 0:1]) ** 2)  # (B, L, W)
    along_y = torch.exp(scale * (rows - landmarks_2d[..., 1:2]) ** 2)  # (B, L, H)
    return along_y[..., :, None] * along_x[..., None, :]


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, W)`` heatmaps -> ``(B, L, 2)`` float32 crop pixels ``(x, y)`` of their peaks.

    Per axis, the centroid of the map's positive part in the ``(2 r + 1)^2`` window centred on the
    argmax (``r`` = :data:`CENTROID_RADIUS`); where that window sticks out of the crop (a cut-off
    Gaussian's centroid moves inwards), the vertex of the parabola through the log of the argmax and
    its two neighbours along the axis instead (next to the border: the border pixel and the two
    inside it). On an exact Gaussian both find its centre (the parabola exactly, a Gaussian's log being
    one; the centroid to a small fraction of a pixel). A network whose quarter-resolution heatmaps are
    upsampled bilinearly x4 cannot draw a peak narrower than about 8 px, flat-topped between its nodes:
    on such maps the centroid lands much closer to the true centre than the parabola alone (measured in
    benchmarks/results_settings.md). The parabola never leaves the argmax by more than half a pixel; a
    map without a positive value decodes to its argmax.
    """
    if heatmaps.ndim != 4 or min(heatmaps.shape[-2:]) < 3:
        raise ValueError(f"heatmaps must be (B, L, H, W) with H, W >= 3, got {tuple(heatmaps.shape)}")
    maps = heatmaps.detach().float()
    b, l, height, width = maps.shape
    peak, flat_index = maps.flatten(2).max(dim=-1)  # (B, L)
    rows, cols = flat_index // width, flat_index % width
    centroid_x, centroid_y = _window_centroid(maps, rows, cols)
    floor = peak.clamp_min(torch.finfo(torch.float32).tiny)[..., None] * LOG_FLOOR  # (B, L, 1)
    row_profile = maps.gather(2, rows[..., None, None].expand(b, l, 1, width))[:, :, 0]  # (B, L, W)
    col_profile = maps.gather(3, cols[..., None, None].expand(b, l, height, 1))[..., 0]  # (B, L, H)
    parabola_x = _log_parabola_peak(torch.log(torch.maximum(row_profile, floor)), cols)
    parabola_y = _log_parabola_peak(torch.log(torch.maximum(col_profile, floor)), rows)
    r = CENTROID_RADIUS
    x = torch.where((cols >= r) & (cols < width - r), centroid_x, parabola_x)
    y = torch.where((rows >= r) & (rows < height - r), centroid_y, parabola_y)
    return torch.stack([x, y], dim=-1)


def _window_centroid(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid ``(x, y)``, each ``(B, L)``, of the positive part of ``(B, L, H, W)`` maps in the window
    of half-side :data:`CENTROID_RADIUS` around ``(rows, cols)`` (``(B, L)``); pixels outside the crop count 0."""
    b, l, height, width = maps.shape
    offsets = torch.arange(-CENTROID_RADIUS, CENTROID_RADIUS + 1, device=maps.device)
    window_rows, window_cols = rows[..., None] + offsets, cols[..., None] + offsets  # (B, L, K)
    window = maps[
        torch.arange(b, device=maps.device)[:, None, None, None],
        torch.arange(l, device=maps.device)[None, :, None, None],
        window_rows.clamp(0, height - 1)[..., :, None],
        window_cols.clamp(0, width - 1)[..., None, :],
    ].clamp_min(0)  # (B, L, K, K)
    inside = ((window_rows >= 0) & (window_rows < height))[..., :, None] & (
        (window_cols >= 0) & (window_cols < width))[..., None, :]
    window = window * inside
    mass = window.sum(dim=(-2, -1))
    found = mass > 0
    mass = torch.where(found, mass, torch.ones_like(mass))
    x = cols + torch.where(found, (window.sum(dim=-2) * offsets).sum(dim=-1) / mass, 0.0)
    y = rows + torch.where(found, (window.sum(dim=-1) * offsets).sum(dim=-1) / mass, 0.0)
    return x, y


def _log_parabola_peak(log_profile: torch.Tensor, peak_index: torch.Tensor) -> torch.Tensor:
    """Sub-pixel peak ``(B, L)`` of ``(B, L, N)`` log-profiles whose maximum is at ``peak_index`` ``(B, L)``."""
    size = log_profile.shape[-1]
    centre = peak_index.clamp(1, size - 2)
    before, at, after = (log_profile.gather(-1, (centre + step)[..., None])[..., 0] for step in (-1, 0, 1))
    slope, curvature = (after - before) / 2, after - 2 * at + before
    concave = curvature < 0
    vertex = centre - slope / torch.where(concave, curvature, -torch.ones_like(curvature))
    position = torch.where(concave, vertex, peak_index.to(vertex.dtype))
    return torch.minimum(torch.maximum(position, peak_index - 0.5), peak_index + 0.5)
