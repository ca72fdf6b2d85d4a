"""Florence (MICC) 3D faces -> a test file: each scan rendered at the paper's 15 poses (docs/datasets_scans.md).

``python -m data_prep.florence --root PATH --out FILE.h5 (--landmarks-model CKPT | --landmarks DIR)
[--workers K] [--grid D,H,W]``

Poses (degrees, :data:`PITCHES_DEG` x :data:`YAWS_DEG`, roll 0): pitch -15, 20 and 25, each with five
evenly spaced yaws from -80 to 80 (-80, -40, 0, 40, 80), as the VRN paper states. Scans: ``--pattern``
under ``--root`` (default: each subject's ``frontal1`` scan, ``subject_XX/Model/frontal1/obj/*.obj``
with its ``.mtl`` and texture image).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data_prep.scans.conversion import add_common_arguments, run_cli
from data_prep.scans.reading import ScanSet, find_scans, scan_id
from lightning_vrn.cli import run_command

PITCHES_DEG = (-15.0, 20.0, 25.0)
YAWS_DEG = tuple(np.linspace(-80.0, 80.0, 5).tolist())
DEFAULT_PATTERN = "**/frontal1/**/*.obj"


def florence_poses() -> np.ndarray:
    """``(15, 3)`` pitch, yaw, roll in degrees, pitch-major."""
    return np.array([(pitch, yaw, 0.0) for pitch in PITCHES_DEG for yaw in YAWS_DEG])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.florence", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--pattern", default=DEFAULT_PATTERN,
                        help=f"glob of the scans under --root (default {DEFAULT_PATTERN!r})")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = find_scans(args.root, args.pattern, "textured .obj")
    scans = ScanSet("florence", paths, [scan_id(path, args.root) for path in paths], florence_poses())
    return run_cli(parser, args, scans)


if __name__ == "__main__":
    sys.exit(run_command(main))
