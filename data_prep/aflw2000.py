"""AFLW2000-3D -> one dataset file (the test set): ``python -m data_prep.aflw2000 --root DIR --bfm PATH --out FILE.h5``.

``--root`` holds the 2,000 ``imageNNNNN.jpg`` + ``imageNNNNN.mat`` pairs of AFLW2000-3D; ``--bfm``
is a Basel Face Model in one of the layouts of :mod:`data_prep.bfm`: the meshes (the ground truth of
volumes and vertices) are the full BFM's, the first 40 + 10 parameters on 3DDFA's ``train.configs``
bases, or with ``--mean-only`` the mean face at the fitted pose; the file's ``ground_truth``
attribute says which (docs/datasets.md). Samples are in the order of
the ``.mat`` names; ``landmarks_3d`` is ``pt3d_68`` (the original annotation). The conversion
(vertices, crop, volumes, skipped samples) is :mod:`data_prep.mat_faces`; beside ``FILE.h5`` it
writes ``FILE.skipped.csv`` (sources left out and why) and ``FILE.sources.txt`` (sample i's source).
A killed run rerun with the same arguments continues where it stopped; a finished file made with the
same arguments is left as it is, one made otherwise is refused unless ``--restart``.

``--reannotated FILE.npy``: 3DDFA's ``AFLW2000-3D-Reannotated.pts68.npy`` (:func:`read_reannotated`), stored
as ``landmarks_2d_reannotated`` (docs/datasets.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.mat_faces import Conversion, Source, add_common_arguments, convert, find_image
from lightning_vrn import __version__
from lightning_vrn.cli import run_command
from lightning_vrn.geometry.grid import VoxelGrid

CREATED_BY = f"lightning_vrn.data_prep.aflw2000 {__version__}"


def aflw2000_sources(root: Path) -> tuple[Source, ...]:
    """Every ``*.mat`` directly in ``root`` (sorted by name) with its photo (None if absent)."""
    if not root.is_dir():
        raise FileNotFoundError(f"AFLW2000-3D folder {root} does not exist; give the folder holding "
                                f"imageNNNNN.jpg and imageNNNNN.mat (unpacked AFLW2000-3D.zip)")
    mats = sorted(root.glob("*.mat"))
    if not mats:
        raise FileNotFoundError(f"no .mat files in {root}; give the folder holding imageNNNNN.jpg and imageNNNNN.mat")
    return tuple(Source(mat, find_image(mat)) for mat in mats)


def read_reannotated(path: Path, sources: tuple[Source, ...]) -> dict[str, np.ndarray]:
    """3DDFA's re-annotated AFLW2000-3D landmarks -> ``{source name: (68, 2) 0-based photo pixels}``.

    ``path``: a ``.npy`` of shape (N, 2 or 3, 68) (3DDFA's layout) or (N, 68, 2 or 3), 1-based photo pixels
    like ``pt3d_68``; row i is the i-th image of the full set in sorted name order, i.e. of ``sources``
    (the ``.mat`` files of ``--root``, sorted), so N must be their number.
    """
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--reannotated {path} cannot be read as a .npy array ({error}); give 3DDFA's "
                         f"AFLW2000-3D-Reannotated.pts68.npy") from None
    if values.ndim != 3 or values.shape[1:] not in ((2, 68), (3, 68), (68, 2), (68, 3)):
        raise ValueError(f"--reannotated {path} has shape {values.shape}, expected (N, 2 or 3, 68) as 3DDFA's "
                         f"AFLW2000-3D-Reannotated.pts68.npy, or (N, 68, 2 or 3)")
    points = (values[:, :2].transpose(0, 2, 1) if values.shape[1] != 68 else values[:, :, :2]).astype(np.float64)
    if len(points) != len(sources):
        raise ValueError(f"--reannotated {path} has {len(points)} rows but --root holds {len(sources)} .mat files: "
                         f"its rows are the images of the full AFLW2000-3D set (2,000) in sorted name order, so "
                         f"--root must hold the whole set")
    if not np.isfinite(points).all():
        raise ValueError(f"--reannotated {path} contains NaN or inf")
    return {source.name: row - 1.0 for source, row in zip(sources, points)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.aflw2000", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder of AFLW2000-3D image + .mat pairs")
    add_common_arguments(parser, "output dataset file, e.g. data/aflw2000/test.h5")
    parser.add_argument("--reannotated", type=Path, default=None, metavar="FILE.npy",
                        help="3DDFA's AFLW2000-3D-Reannotated.pts68.npy: store the re-annotated landmarks as "
                             "landmarks_2d_reannotated (rows: the full set's images in sorted name order)")
    return parser


def aflw2000_conversion(root: Path, bfm: Path, grid: VoxelGrid, mean_only: bool,
                        reannotated: Path | None = None) -> Conversion:
    """The conversion of the AFLW2000-3D folder ``root`` with the BFM at ``bfm`` onto ``grid`` (``mean_only``: the
    mean face at the fitted pose); ``reannotated``: 3DDFA's re-annotated landmarks (:func:`read_reannotated`)."""
    sources = aflw2000_sources(root)
    landmarks = None if reannotated is None else read_reannotated(reannotated, sources)
    return Conversion(sources=sources, model_spec=f"bfm:{bfm}", grid=grid, landmark_field="pt3d_68",
                      mean_only=mean_only,
                      attrs={"source": "AFLW2000-3D", "source_root": str(root), "created_by": CREATED_BY,
                             "landmarks": "pt3d_68 (original annotation)",
                             "landmarks_reannotated": "" if reannotated is None else str(reannotated)},
                      reannotated=landmarks)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    conversion = aflw2000_conversion(args.root, args.bfm, args.grid, args.mean_only, args.reannotated)
    path, skipped = convert(conversion, args.out, workers=args.workers, restart=args.restart, desc="aflw2000")
    print(f"wrote {path} ({len(conversion.sources) - skipped} samples, {skipped} skipped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
