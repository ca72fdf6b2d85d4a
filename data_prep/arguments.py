"""Command-line arguments every dataset command shares: ``--grid D,H,W`` and ``--workers N``; argparse types."""

from __future__ import annotations

import argparse
from typing import Callable

from lightning_vrn.geometry.grid import VoxelGrid


def grid_argument(text: str) -> VoxelGrid:
    """argparse type of ``--grid D,H,W`` (:meth:`VoxelGrid.parse`), for every data_prep command."""
    try:
        return VoxelGrid.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def workers_argument(text: str) -> int:
    """argparse type of ``--workers N``: a whole number of processes, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, at least 1; got {text!r}")
    return value


def unit_interval_argument(noun: str, include_one: bool) -> Callable[[str], float]:
    """argparse type of a number in [0, 1] (``include_one``) or [0, 1), refused as "must be a ``noun`` in ..."."""
    interval = "[0, 1]" if include_one else "[0, 1)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"must be a {noun} in {interval}, got {text!r}")
        return value

    return parse


def add_grid_and_workers(parser: argparse.ArgumentParser, workers_help: str) -> None:
    """``--grid`` (default the paper's 200,192,192) and ``--workers`` (default 1; ``workers_help`` says what they do)."""
    parser.add_argument("--grid", type=grid_argument, default=grid_argument("200,192,192"), metavar="D,H,W",
                        help="volume depth, height, width; the crop is H x W pixels (default 200,192,192)")
    parser.add_argument("--workers", type=workers_argument, default=1, help=f"{workers_help} (default 1)")
