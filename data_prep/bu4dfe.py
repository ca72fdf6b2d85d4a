"""BU-4DFE -> a test file: frames of the happy and surprise sequences rendered at the paper's 21 poses
(docs/datasets_scans.md).

``python -m data_prep.bu4dfe --root PATH --out FILE.h5 (--landmarks-model CKPT | --landmarks DIR)
[--frames K | --frames all] [--workers K] [--grid D,H,W]``

Layout: ``ROOT/<subject>/<sequence>/<frame>.wrl`` with the frame's texture image beside it (the
``ImageTexture`` url), sequences ``Happy`` and ``Surprise`` (case-insensitive). Frames: ``--frames K``
evenly spaced frames of each sequence (default 1: its middle frame, near the expression's apex; the paper
does not say which frames it used), or ``all``.

Poses (degrees, roll-major then pitch): pitch -20, 0 and 20 (:data:`PITCHES_DEG`) and seven rolls from
-80 to 80 (:data:`SECOND_ANGLES_DEG`: -80, -53.3, -26.7, 0, 26.7, 53.3, 80), as the paper states;
``--second-axis yaw`` rotates about the vertical axis instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.scans.conversion import add_common_arguments, run_cli
from data_prep.scans.reading import ScanSet, find_scans, scan_id
from lightning_vrn.cli import run_command

PITCHES_DEG = (-20.0, 0.0, 20.0)
SECOND_ANGLES_DEG = tuple(np.linspace(-80.0, 80.0, 7).tolist())
SEQUENCES = ("happy", "surprise")
EXPRESSION_NAMES = ("neutral", *SEQUENCES)
"""Label id -> name of the file's ``expression_label`` (a frame is labelled by its sequence)."""


def bu4dfe_poses(second_axis: str = "roll") -> np.ndarray:
    """``(21, 3)`` pitch, yaw, roll in degrees: each angle of ``second_axis`` (roll or yaw) with each pitch."""
    column = {"yaw": 1, "roll": 2}[second_axis]
    poses = np.zeros((len(PITCHES_DEG) * len(SECOND_ANGLES_DEG), 3))
    for row, (angle, pitch) in enumerate((a, p) for a in SECOND_ANGLES_DEG for p in PITCHES_DEG):
        poses[row, 0], poses[row, column] = pitch, angle
    return poses


def pick_frames(frames: list[Path], count: int | None) -> list[Path]:
    """``count`` evenly spaced frames of a sorted sequence (1: the middle one; None: all)."""
    if count is None or count >= len(frames):
        return frames
    if count == 1:
        return [frames[len(frames) // 2]]
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def _parse_frames(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--frames must be a positive number or 'all', got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.bu4dfe", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--frames", type=_parse_frames, default=1, metavar="K|all",
                        help="evenly spaced frames per sequence (default 1: the middle frame), or 'all'")
    parser.add_argument("--second-axis", choices=("roll", "yaw"), default="roll",
                        help="axis of the seven -80..80 degree rotations (default roll, as the paper states)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = find_scans(args.root, "*/*/*.wrl", "<subject>/<sequence>/<frame>.wrl")
    sequences: dict[Path, list[Path]] = {}
    for path in paths:
        if path.parent.name.lower() in SEQUENCES:
            sequences.setdefault(path.parent, []).append(path)
    if not sequences:
        raise FileNotFoundError(f"no {'/'.join(s.capitalize() for s in SEQUENCES)} sequence folder with .wrl frames "
                                f"under {args.root} (expected ROOT/<subject>/Happy/000.wrl)")
    chosen = [frame for folder in sorted(sequences) for frame in pick_frames(sorted(sequences[folder]), args.frames)]
    labels = [EXPRESSION_NAMES.index(path.parent.name.lower()) for path in chosen]
    scans = ScanSet("bu4dfe", chosen, [scan_id(path, args.root) for path in chosen], bu4dfe_poses(args.second_axis),
                    labels, EXPRESSION_NAMES)
    return run_cli(parser, args, scans)


if __name__ == "__main__":
    sys.exit(run_command(main))
