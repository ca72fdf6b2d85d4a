"""The one evaluation report: a per-sample table and its summary, written the same way by every command.

A per-sample table is a dict of equal-length 1-D arrays with the columns of :data:`COLUMNS`:
``index`` (dataset sample index, int64), ``yaw_deg`` (ground-truth yaw, degrees), ``expression``
(dominant-expression label id, -1 when the data does not say), ``nme``, ``nme_aligned`` and
``nme_closest`` (the closest-point error without ICP; NaN for a failed sample), ``failed`` (bool:
the prediction had no surface). :func:`summarise` turns it
into the summary (mean, median, aligned mean, failures and the per-|yaw| bucket means of the
AFLW2000-3D protocol: 0-30, 30-60, 60-90 degrees). Training's test stage, ``experiments.evaluate``
and ``experiments.compare`` all write these two files through :func:`write_report`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from lightning_vrn.atomic import atomic_path, write_text

COLUMNS = ("index", "yaw_deg", "expression", "nme", "nme_aligned", "nme_closest", "failed")
YAW_BUCKETS_DEG = ((0, 30), (30, 60), (60, 90))
"""|yaw| buckets in degrees; the last one also takes |yaw| >= 90."""


def in_yaw_bucket(yaw_deg: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Boolean mask of ``lo <= |yaw| < hi`` degrees (the last bucket also takes ``|yaw| >= hi``)."""
    magnitude = np.abs(np.asarray(yaw_deg, dtype=np.float64))
    return (magnitude >= lo) & ((magnitude < hi) | (hi == YAW_BUCKETS_DEG[-1][1]))


def yaw_bucket_means(values: np.ndarray, yaw_deg: np.ndarray) -> np.ndarray:
    """``(3,)`` float64 mean of ``values`` (N,) in each |yaw| bucket of :data:`YAW_BUCKETS_DEG` (NaN when empty)."""
    values = np.asarray(values, dtype=np.float64)
    masks = [in_yaw_bucket(yaw_deg, lo, hi) for lo, hi in YAW_BUCKETS_DEG]
    return np.array([values[inside].mean() if inside.any() else np.nan for inside in masks])


def balanced_mean(bucket_means: np.ndarray) -> float:
    """The mean of the non-empty buckets' means (NaN when all are empty): the 3DDFA protocol's headline."""
    finite = bucket_means[~np.isnan(bucket_means)]
    return float(finite.mean()) if len(finite) else float("nan")


def summarise(table: Mapping[str, np.ndarray]) -> dict:
    """Mean and median NME, the rigidly aligned mean, failures, and the mean per |yaw| bucket.

    Means are over the samples that did not fail; a mean over no sample is None.
    """
    nme = np.asarray(table["nme"], dtype=np.float64)
    ok = ~np.asarray(table["failed"], dtype=bool)

    def mean(values, mask):
        return float(np.mean(np.asarray(values, dtype=np.float64)[mask])) if mask.any() else None

    summary = {
        "nme_mean": mean(nme, ok),
        "nme_median": float(np.median(nme[ok])) if ok.any() else None,
        "nme_aligned_mean": mean(table["nme_aligned"], ok),
        "nme_closest_mean": mean(table["nme_closest"], ok),
        "num_samples": int(len(nme)),
        "num_failed": int((~ok).sum()),
    }
    for lo, hi in YAW_BUCKETS_DEG:
        inside = ok & in_yaw_bucket(table["yaw_deg"], lo, hi)
        summary[f"nme_yaw_{lo}_{hi}"] = mean(nme, inside)
        summary[f"count_yaw_{lo}_{hi}"] = int(inside.sum())
    return summary


def write_per_sample_csv(path: str | Path, table: Mapping[str, np.ndarray]) -> None:
    """Write a per-sample table atomically (columns :data:`COLUMNS`; empty expression when unknown)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for index, yaw_deg, expression, nme, nme_aligned, nme_closest, failed in zip(*(table[c] for c in COLUMNS)):
            writer.writerow([int(index), f"{yaw_deg:.3f}", int(expression) if expression >= 0 else "",
                             repr(float(nme)), repr(float(nme_aligned)), repr(float(nme_closest)), int(bool(failed))])


def read_per_sample_csv(path: str | Path) -> dict[str, np.ndarray]:
    """A table written by :func:`write_per_sample_csv` (values exactly as written); a ValueError names the file
    and line of a missing column or an incomplete or unreadable row (a damaged or truncated file)."""
    columns = {column: [] for column in COLUMNS}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)}")
        for row in reader:
            try:
                values = (int(row["index"]), float(row["yaw_deg"]), int(row["expression"] or -1), float(row["nme"]),
                          float(row["nme_aligned"]), float(row["nme_closest"]), {"0": False, "1": True}[row["failed"]])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}, line {reader.line_num}: an incomplete or unreadable row "
                                 f"({','.join(map(str, row.values()))})") from None
            for column, value in zip(COLUMNS, values):
                columns[column].append(value)
    dtypes = {"index": np.int64, "expression": np.int64, "failed": bool}
    return {column: np.array(values, dtype=dtypes.get(column, np.float64)) for column, values in columns.items()}


def write_report(out_dir: str | Path, name: str, table: Mapping[str, np.ndarray]) -> dict:
    """Write ``out_dir/{name}.csv`` (per sample) and ``out_dir/{name}_summary.json``; returns the summary."""
    out_dir = Path(out_dir)
    summary = summarise(table)
    write_per_sample_csv(out_dir / f"{name}.csv", table)
    write_text(out_dir / f"{name}_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
