"""The numbers of a comparison's table: per-method summaries with two-level bootstrap intervals (over trainings,
then faces) and paired differences (:func:`table_rows`), over the test faces per-sample tables share
(:func:`shared_positions`), the further paired differences a config's ``contrasts`` name (:func:`contrast_rows`),
and the per-face mean of several trainings (:func:`seed_mean_table`: the summary columns and the figures)."""

from __future__ import annotations

import numpy as np

from lightning_vrn.metrics.bootstrap import seeds_and_faces_difference, seeds_and_faces_mean
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, in_yaw_bucket, summarise


def table_rows(tables: dict[str, list[dict]], landmarks: dict[str, float], reference: str, resamples: int,
               landmark_tables: dict[str, list[dict]] | None = None) -> dict:
    """One row per method of ``tables`` (method -> its trainings' per-sample tables, one or more):

    the summary of the per-face mean over the trainings (:func:`seed_mean_table`; median, |yaw| buckets,
    failures: a face failed in any training is failed there), two-level intervals of the NME (``nme``) and the
    rigidly aligned NME (``aligned``) over every finite (training, face) cell, with several trainings each
    one's mean NME (``runs``), the balanced landmark NME ``landmarks[method]`` (``landmark_nme_balanced``) with a
    two-level interval balanced over |yaw| buckets (``landmark``) where ``landmark_tables`` has the trainings'
    per-sample landmark NMEs (``index``, ``yaw_deg``, ``landmark_nme``), and the paired difference from
    ``reference`` over the test faces both were scored on (``difference``, ``paired``: how many), trainings
    paired by index when both have as many."""
    landmark_tables = landmark_tables or {}
    rows = {}
    for name, trainings in tables.items():
        mean_table = seed_mean_table(trainings)
        nme, aligned = (_by_face(trainings, mean_table["index"], column) for column in ("nme", "nme_aligned"))
        row = {**summarise(mean_table), "nme": seeds_and_faces_mean(nme, resamples),
               "aligned": seeds_and_faces_mean(aligned, resamples), "landmark_nme_balanced": landmarks.get(name)}
        if len(trainings) > 1:
            row["runs"] = [float(np.nanmean(n)) for n in nme]
        if name in landmark_tables:
            row["landmark"] = _balanced_landmarks(landmark_tables[name], resamples)
        if name != reference:
            row.update(paired_difference(tables, name, reference, resamples))
        rows[name] = row
    return rows


def paired_difference(tables: dict[str, list[dict]], first: str, second: str, resamples: int) -> dict:
    """The NME of method ``first`` minus method ``second`` (``tables``: method -> its trainings' per-sample
    tables) over the test faces both were scored on: ``difference``, its two-level interval (trainings paired by
    index when both have as many, the same faces drawn for both), and ``paired``, how many faces."""
    faces = common_faces([seed_mean_table(tables[first]), seed_mean_table(tables[second])])
    if not len(faces):
        raise ValueError(f"{first} and {second} share no test sample: there is no paired difference")
    return {"difference": seeds_and_faces_difference(_by_face(tables[first], faces, "nme"),
                                                     _by_face(tables[second], faces, "nme"), resamples),
            "paired": len(faces)}


def contrast_rows(tables: dict[str, list[dict]], contrasts: dict[str, list[str]], resamples: int) -> dict:
    """Each contrast of ``contrasts`` (name -> ``[first, second]``, two methods of ``tables``) as
    ``{"first", "second", "difference", "paired"}``: first minus second (:func:`paired_difference`)."""
    return {name: {"first": first, "second": second, **paired_difference(tables, first, second, resamples)}
            for name, (first, second) in contrasts.items()}


def _by_face(tables: list[dict], faces: np.ndarray, column: str) -> np.ndarray:
    """(trainings, faces) ``column`` of each training's table at the dataset ``faces``; NaN where it failed."""
    rows = []
    for table in tables:
        positions = shared_positions(faces, table["index"])[1]
        rows.append(np.where(table["failed"][positions], np.nan, table[column][positions]))
    return np.asarray(rows, dtype=np.float64)


def _balanced_landmarks(tables: list[dict], resamples: int):
    """The trainings' balanced 68-point landmark NME with its two-level interval, faces drawn within |yaw|
    buckets, over the faces every training was scored on."""
    faces = common_faces(tables)
    yaw = tables[0]["yaw_deg"][shared_positions(faces, tables[0]["index"])[1]]
    bucket = np.full(len(faces), -1)
    for number, (lo, hi) in enumerate(YAW_BUCKETS_DEG):
        bucket[in_yaw_bucket(yaw, lo, hi)] = number
    values = np.asarray([t["landmark_nme"][shared_positions(faces, t["index"])[1]] for t in tables], dtype=np.float64)
    return seeds_and_faces_mean(values[:, bucket >= 0], resamples, strata=bucket[bucket >= 0])


def shared_positions(indices: np.ndarray, other_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (K,) in two per-sample tables of the K test samples (by dataset index) both hold, in the
    order of the first table."""
    position = {int(index): k for k, index in enumerate(other_indices)}
    mine = np.array([k for k, index in enumerate(indices) if int(index) in position], dtype=np.int64)
    return mine, np.array([position[int(indices[k])] for k in mine], dtype=np.int64)


def common_faces(tables: list[dict]) -> np.ndarray:
    """Dataset indices (K,) of the test faces every one of ``tables`` holds, in the first table's order."""
    return tables[0]["index"][np.all([np.isin(tables[0]["index"], t["index"]) for t in tables], axis=0)]


def seed_mean_table(tables: list[dict]) -> dict:
    """Per-face mean of several runs' per-sample tables (one variant, e.g. several seeds) over the faces every
    run was scored on, in the first table's order; a face that failed in any run is failed (NaN NMEs)."""
    order = common_faces(tables)
    picked = [{column: values[shared_positions(order, t["index"])[1]] for column, values in t.items()} for t in tables]
    failed = np.any([p["failed"] for p in picked], axis=0)
    mean = {"index": order, "yaw_deg": picked[0]["yaw_deg"], "expression": picked[0]["expression"], "failed": failed}
    for column in ("nme", "nme_aligned", "nme_closest"):
        mean[column] = np.where(failed, np.nan, np.mean([p[column] for p in picked], axis=0))
    return mean
