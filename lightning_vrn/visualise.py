"""Pictures for evaluation: shaded meshes in the crop, vertex colours from the image, error curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from lightning_vrn.atomic import atomic_path
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.raster import rasterise


def shade_mesh(vertices: np.ndarray, triangles: np.ndarray, size: int | tuple[int, int],
               background: int = 255) -> np.ndarray:
    """Grey Lambertian picture ``(H, W, 3)`` uint8 of a crop-coordinate mesh lit from the camera (``size``: ``S``
    for ``S x S`` or ``(H, W)``); pixels the mesh misses keep ``background``."""
    grey, covered = _shaded_grey(vertices, triangles, (size, size) if isinstance(size, int) else size)
    image = np.full((*covered.shape, 3), background, dtype=np.uint8)
    image[covered] = grey[covered, None]
    return image


def draw_mesh_over(image: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, opacity: float = 0.75) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 with the shaded mesh (pixel coordinates of that image) blended over it."""
    grey, covered = _shaded_grey(vertices, triangles, image.shape[:2])
    out = image.copy()
    out[covered] = ((1 - opacity) * image[covered] + opacity * grey[covered, None]).astype(np.uint8)
    return out


def _shaded_grey(vertices: np.ndarray, triangles: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` uint8 grey shading (40-240 by the normal's z) and ``(H, W)`` bool coverage of a mesh."""
    height, width = shape
    if len(triangles) == 0:
        return np.zeros(shape, np.uint8), np.zeros(shape, bool)
    vertices = np.asarray(vertices, dtype=np.float64)
    raster = rasterise(vertices, triangles, height, width)
    normals = raster.interpolate(vertex_normals(vertices, triangles), triangles)
    # The camera looks along +z (crop z grows away from it); either winding faces it.
    intensity = np.abs(normals[..., 2]) / np.maximum(np.linalg.norm(normals, axis=-1), 1e-12)
    return (40 + 200 * intensity).astype(np.uint8), raster.mask


def vertex_colours_from_image(vertices: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``(V, 3)`` float colours in [0, 1] sampled bilinearly from ``(H, W, 3)`` uint8 at each vertex's (x, y)."""
    h, w = image.shape[:2]
    x = np.clip(vertices[:, 0], 0, w - 1)
    y = np.clip(vertices[:, 1], 0, h - 1)
    x0, y0 = np.minimum(x.astype(int), w - 2), np.minimum(y.astype(int), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64) / 255.0
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def save_comparison(path: Path, image: np.ndarray, panels: Mapping[str, np.ndarray], title: str = "") -> None:
    """PNG with the input crop followed by titled ``(H, W, 3)`` panels, side by side."""
    plt = _pyplot()
    pictures = {"input": image, **panels}
    fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 3.6))
    for ax, (name, picture) in zip(axes, pictures.items()):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, Path(path))


def save_ced(path: Path, errors: Mapping[str, np.ndarray], max_nme: float | None = None) -> None:
    """Cumulative error distribution (fraction of images with NME <= x) like the paper's Figure 7.

    ``max_nme``: right end of the x axis; default: 0.1 (the paper's) or further when a curve's 90th
    percentile lies beyond it.
    """
    if max_nme is None:
        tails = [np.percentile(v, 90) for v in errors.values() if len(v)]
        max_nme = max([0.1] + [1.1 * t for t in tails])
    plt = _pyplot()
    many = len(errors) > 4  # the legend goes beside the axes
    fig, ax = plt.subplots(figsize=(9.5 if many else 5, 4))
    for name, values in errors.items():
        values = np.sort(np.asarray(values, dtype=np.float64))
        if len(values) == 0:
            continue
        fraction = np.arange(1, len(values) + 1) / len(values)
        ax.step(values, fraction, where="post", label=f"{name} (mean {values.mean():.4f})")
    ax.set_xlim(0, max_nme)
    ax.set_ylim(0, 1)
    ax.set_xlabel("NME normalised by outer interocular distance")
    ax.set_ylabel("fraction of images")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    _save_figure(fig, Path(path))


def save_nme_vs_yaw(path: Path, results: Mapping[str, tuple[np.ndarray, np.ndarray]], bin_deg: float = 15.0) -> None:
    """NME against |yaw| like the paper's Figure 10: each method's samples as dots, their mean per
    ``bin_deg`` bin as a line. ``results``: method -> (yaw degrees (N,), NME (N,))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    edges = np.arange(0.0, 90.0 + bin_deg, bin_deg)
    for name, (yaw_deg, nme) in results.items():
        yaw, nme = np.abs(np.asarray(yaw_deg, dtype=np.float64)), np.asarray(nme, dtype=np.float64)
        ok = np.isfinite(nme)
        dots = ax.scatter(yaw[ok], nme[ok], s=8, alpha=0.35)
        which = np.clip(np.digitize(yaw[ok], edges) - 1, 0, len(edges) - 2)
        centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1) if (which == i).any()]
        means = [nme[ok][which == i].mean() for i in range(len(edges) - 1) if (which == i).any()]
        ax.plot(centres, means, marker="o", color=dots.get_facecolor()[0][:3], label=f"{name} (mean {nme[ok].mean():.4f})")
    ax.set_xlabel("absolute yaw (degrees)")
    ax.set_ylabel("NME")
    ax.set_xlim(0, 90)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))


def save_grouped_means(path: Path, groups: list[str], means: Mapping[str, list[tuple[float, float, float]]],
                       ylabel: str = "NME") -> None:
    """Bars of each method's mean per group with their intervals, like the paper's Figure 11 (NME per expression).

    ``means``: method -> one ``(mean, low, high)`` per group (NaN where the group has no sample).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.11 * len(groups) * len(means) + 4.0), 4.5))
    width = 0.8 / max(1, len(means))
    for k, (name, values) in enumerate(means.items()):
        mean, low, high = (np.array(column, dtype=np.float64) for column in zip(*values))
        x = np.arange(len(groups)) + (k - (len(means) - 1) / 2) * width
        ax.bar(x, mean, width, label=name, yerr=np.abs(np.stack([mean - low, high - mean])), capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: many methods
    fig.tight_layout()
    _save_figure(fig, Path(path))


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    _pyplot().close(fig)
