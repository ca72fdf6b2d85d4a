"""300W-LP -> train and validation dataset files: ``python -m data_prep.w300lp --root DIR --bfm PATH --out DIR``.

``--root`` is the unpacked 300W-LP folder (``AFW/``, ``HELEN/``, ``IBUG/``, ``LFPW/``, each of
``NAME_N_M.jpg`` + ``NAME_N_M.mat``); every ``.mat`` below it is a sample, except those in the
``*_Flip`` folders (300W-LP's own mirrored copies, which ``--flip`` replaces with exact mirrors of
ours) and in ``landmarks/``. ``--flip`` adds a mirrored copy after each sample (docs/conventions.md,
"Landmarks": indices re-indexed with ``FLIP``).

Validation split: subject-disjoint and deterministic. A sample's subject is its source photo (all its
faces and profiled views), by the naming of each part of 300W-LP (:data:`SUBJECT_PATTERNS`):

=========  ==========================================  ===========================
part       sample name                                 subject
=========  ==========================================  ===========================
AFW        ``AFW_<id>_<face>_<view>``                  ``AFW_134212``
HELEN      ``HELEN_<id>_<face>_<view>``                ``HELEN_1000459319``
IBUG       ``IBUG_image_<id>_<face>_<view>``           ``IBUG_image_008``
LFPW       ``LFPW_image_<train|test>_<id>_<view>``     ``LFPW_image_train_0645``
=========  ==========================================  ===========================

(anything before the part's name, e.g. ``300WLP_IBUG_image_008_1_0``, stays in the subject). A name of
no known part loses a trailing ``_N_M`` (two numbers: ``foo_12_1_0`` -> ``foo_12``), else it is its own
subject (``foo_3`` -> ``foo_3``): deterministic, but only as subject-disjoint as its naming. A subject
goes to ``val.h5`` when the first 8 bytes of the SHA-256 of its name, as a fraction of 2^64, are below
``--val-fraction``, so the split does not depend on which other files are present. Samples are in the
order of their paths. Conversion, skipped samples, resuming and reruns: :mod:`data_prep.mat_faces`
(``OUT/train.skipped.csv``, ``OUT/train.sources.txt``, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from data_prep.arguments import unit_interval_argument
from data_prep.mat_faces import Conversion, Source, add_common_arguments, check_conversion, find_image, write_conversion
from data_prep.writing import check_output
from lightning_vrn import __version__
from lightning_vrn.cli import run_command

CREATED_BY = f"lightning_vrn.data_prep.w300lp {__version__}"
SUBJECT_PATTERNS = (
    re.compile(r"^(?P<subject>(?:.*_)?AFW_\d+)_\d+_\d+$", re.IGNORECASE),
    re.compile(r"^(?P<subject>(?:.*_)?HELEN_\d+)_\d+_\d+$", re.IGNORECASE),
    re.compile(r"^(?P<subject>(?:.*_)?IBUG_image_\d+)_\d+_\d+$", re.IGNORECASE),
    re.compile(r"^(?P<subject>(?:.*_)?LFPW_image_(?:train|test)_\d+)_\d+$", re.IGNORECASE),
)
"""The subject (source photo) of each part's sample names; the first that matches applies."""
FALLBACK_SUBJECT = re.compile(r"^(?P<subject>.+)_\d+_\d+$")
"""The subject of a name of no known part: without its trailing ``_N_M`` (else the whole name)."""
EXCLUDED_FOLDERS = re.compile(r"(_Flip|^landmarks)$", re.IGNORECASE)


def subject_of(name: str) -> str:
    """The source photo of a 300W-LP sample name (module docstring): by its part's pattern, else without a
    trailing ``_N_M``, else the whole name."""
    for pattern in (*SUBJECT_PATTERNS, FALLBACK_SUBJECT):
        match = pattern.match(name)
        if match:
            return match.group("subject")
    return name


def is_validation(subject: str, val_fraction: float) -> bool:
    """Whether ``subject`` belongs to the validation split (a hash of its name below ``val_fraction``)."""
    digest = int.from_bytes(hashlib.sha256(subject.encode("utf-8")).digest()[:8], "big")
    return digest / 2.0**64 < val_fraction


def w300lp_sources(root: Path, flip: bool) -> tuple[Source, ...]:
    """Every ``.mat`` under ``root`` outside the excluded folders, sorted by path, each followed by its
    mirrored copy when ``flip``."""
    if not root.is_dir():
        raise FileNotFoundError(f"300W-LP folder {root} does not exist; give the unpacked 300W_LP folder "
                                f"(with AFW/, HELEN/, IBUG/, LFPW/)")
    mats = sorted(path for path in root.rglob("*.mat")
                  if not any(EXCLUDED_FOLDERS.search(part) for part in path.relative_to(root).parts[:-1]))
    if not mats:
        raise FileNotFoundError(f"no .mat files under {root} (outside *_Flip and landmarks/); give the unpacked "
                                f"300W_LP folder")
    return tuple(Source(mat, find_image(mat), mirrored) for mat in mats for mirrored in ((False, True) if flip else (False,)))


def split_sources(sources: tuple[Source, ...], val_fraction: float) -> dict[str, tuple[Source, ...]]:
    """``{"train": ..., "val": ...}`` by subject (:func:`is_validation`); no "val" when the fraction is 0."""
    val = tuple(s for s in sources if is_validation(subject_of(s.mat_path.stem), val_fraction))
    train = tuple(s for s in sources if not is_validation(subject_of(s.mat_path.stem), val_fraction))
    return {"train": train, "val": val} if val_fraction > 0 else {"train": train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.w300lp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the unpacked 300W_LP folder")
    add_common_arguments(parser, "output folder; writes OUT/train.h5 and OUT/val.h5")
    parser.add_argument("--flip", action="store_true", help="add a mirrored copy of every sample")
    parser.add_argument("--val-fraction", type=unit_interval_argument("fraction", include_one=False), default=0.05,
                        metavar="F", help="fraction of subjects in val.h5 (default 0.05; 0: no validation file)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    splits = split_sources(w300lp_sources(args.root, args.flip), args.val_fraction)
    check_output(args.out, [args.out / f"{split}.h5" for split in splits], args.restart)
    checked = []  # every split is checked before any is written: a refusal changes nothing
    for split, sources in splits.items():
        if not sources:
            print(f"{split}: no samples (too few subjects for --val-fraction {args.val_fraction}); "
                  f"no {split}.h5 written", file=sys.stderr)
            continue
        conversion = Conversion(sources=sources, model_spec=f"bfm:{args.bfm}", grid=args.grid, landmark_field="pt2d",
                                mean_only=args.mean_only,
                                attrs={"source": "300W-LP", "source_root": str(args.root), "split": split,
                                       "created_by": CREATED_BY, "flip": bool(args.flip),
                                       "val_fraction": float(args.val_fraction)})
        checked.append(check_conversion(conversion, args.out / f"{split}.h5", workers=args.workers,
                                        restart=args.restart, desc=split))
    for split in checked:
        path, skipped = write_conversion(split, workers=args.workers)  # desc: the split's name, the file's stem
        print(f"wrote {path} ({len(split.kept)} samples, {skipped} skipped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
