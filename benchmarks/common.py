"""Shared benchmark helpers: timing and a face-like test mesh of any size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lightning_vrn.atomic import write_text


def median_ms(function: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``function()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def face_like_mesh(side: int, crop: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A ``side x side`` vertex height field shaped like a face (dome plus nose), in crop coordinates.

    Returns ``(side**2, 3)`` vertices (x, y in pixels across ~60% of the crop; z away from the camera)
    and ``(2 (side-1)**2, 3)`` triangles.
    """
    u, v = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side))
    dome = -np.sqrt(np.clip(1.2 - 0.6 * u**2 - 0.5 * v**2, 0, None))
    nose = -0.35 * np.exp(-(u**2 / 0.01 + (v - 0.05) ** 2 / 0.08))
    half = 0.3 * crop
    vertices = np.stack([crop / 2 + half * u, crop / 2 + half * v, half * (dome + nose)], -1).reshape(-1, 3)
    vertices[:, 2] -= vertices[:, 2].mean()
    index = np.arange(side * side).reshape(side, side)
    a, b, c, d = index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]
    triangles = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return vertices, triangles


def report(rows: Sequence[tuple[str, str]], out: Path | None = None) -> None:
    """Print ``(measurement, result)`` rows as a markdown table; also write it to ``out`` when given."""
    table = "| measurement | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if out:
        write_text(out, table + "\n")
