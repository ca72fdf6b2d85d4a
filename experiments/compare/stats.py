"""The numbers of a comparison's table: per-method summaries with bootstrap intervals and paired differences
(:func:`table_rows`) over the test faces two per-sample tables share (:func:`shared_positions`), and the
per-face mean of several runs (seeds) of one variant (:func:`seed_mean_table`)."""

from __future__ import annotations

import numpy as np

from lightning_vrn.metrics.bootstrap import bootstrap_balanced_mean, bootstrap_mean, paired_difference
from lightning_vrn.metrics.report import summarise


def table_rows(tables: dict, landmarks: dict, reference: str, resamples: int,
               landmark_tables: dict | None = None) -> dict:
    """One row per method of ``tables``: its summary, bootstrap intervals of the NME (``nme``) and the rigidly
    aligned NME (``aligned``), the balanced landmark NME of ``landmarks`` (``landmark_nme_balanced``) with its
    interval (``landmark``) where ``landmark_tables`` has the method's per-sample landmark NMEs (``index``,
    ``yaw_deg``, ``landmark_nme``), and the paired difference from ``reference`` over the test samples both were
    scored on (``paired``: how many)."""
    landmark_tables = landmark_tables or {}
    rows = {}
    for name, table in tables.items():
        summary = summarise(table)
        ok = ~table["failed"]
        row = {**summary, "nme": bootstrap_mean(table["nme"][ok], resamples),
               "aligned": bootstrap_mean(table["nme_aligned"][ok], resamples),
               "landmark_nme_balanced": landmarks.get(name, {}).get("landmark_nme_balanced")}
        if name in landmark_tables:
            samples = landmark_tables[name]
            row["landmark"] = bootstrap_balanced_mean(samples["landmark_nme"], samples["yaw_deg"], resamples)
        if name != reference:
            mine, theirs = shared_positions(table["index"], tables[reference]["index"])
            if not len(mine):
                raise ValueError(f"{name} and {reference} share no test sample: there is no paired difference")
            row["difference"] = paired_difference(table["nme"][mine], tables[reference]["nme"][theirs], resamples)
            row["paired"] = len(mine)
        rows[name] = row
    return rows


def shared_positions(indices: np.ndarray, other_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (K,) in two per-sample tables of the K test samples (by dataset index) both hold, in the
    order of the first table."""
    position = {int(index): k for k, index in enumerate(other_indices)}
    mine = np.array([k for k, index in enumerate(indices) if int(index) in position], dtype=np.int64)
    return mine, np.array([position[int(indices[k])] for k in mine], dtype=np.int64)


def seed_mean_table(tables: list[dict]) -> dict:
    """Per-face mean of several runs' per-sample tables (one variant, e.g. several seeds) over the faces every
    run was scored on, in the first table's order; a face that failed in any run is failed (NaN NMEs)."""
    order = tables[0]["index"][np.all([np.isin(tables[0]["index"], t["index"]) for t in tables], axis=0)]
    picked = [{column: values[shared_positions(order, t["index"])[1]] for column, values in t.items()} for t in tables]
    failed = np.any([p["failed"] for p in picked], axis=0)
    mean = {"index": order, "yaw_deg": picked[0]["yaw_deg"], "expression": picked[0]["expression"], "failed": failed}
    for column in ("nme", "nme_aligned", "nme_closest"):
        mean[column] = np.where(failed, np.nan, np.mean([p[column] for p in picked], axis=0))
    return mean
