"""Command-line arguments every dataset command shares: ``--grid D,H,W`` and ``--workers N``."""

from __future__ import annotations

import argparse

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


def add_grid_and_workers(parser: argparse.ArgumentParser, workers_help: str) -> None:
    """``--grid`` (default the paper's 200,192,192) and ``--workers`` (default 1; ``workers_help`` says what they do)."""
    parser.add_argument("--grid", type=grid_argument, default=grid_argument("200,192,192"), metavar="D,H,W",
                        help="volume depth, height, width; the crop is H x W pixels (default 200,192,192)")
    parser.add_argument("--workers", type=workers_argument, default=1, help=f"{workers_help} (default 1)")
