"""The files of a comparison's report: ``table.md``, ``table.csv`` and ``contrasts.csv`` (:func:`write_tables`),
the figures (:func:`write_figures`: ``ced.png``, ``nme_vs_yaw.png``, ``nme_per_expression.png``) and, for
finished runs, ``runs.csv`` (:func:`write_run_list`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lightning_vrn.atomic import atomic_path, write_text
from lightning_vrn.metrics.bootstrap import Interval, bootstrap_mean, verdict
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG
from lightning_vrn.visualise import save_ced, save_grouped_means, save_nme_vs_yaw

if TYPE_CHECKING:
    from experiments.compare.finished_runs import FinishedRun


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


COLUMNS = ("method", "NME mean [95% CI]", "median", "yaw 0-30", "yaw 30-60", "yaw 60-90", "aligned NME",
           "closest-point error", "landmark NME (balanced)", "difference from {reference} [95% CI]", "failed")
REAL_COLUMNS = ("real: NME mean [95% CI]", "real: aligned NME [95% CI]", "real: landmark NME (balanced) [95% CI]",
                "real: difference from {reference} [95% CI]", "real: failed")
"""The columns of rows with ``real`` (their row on the real photos)."""


RUNS_COLUMN = "runs: their NME range"


def _runs_text(run_means: list[float]) -> str:
    """``"3: 0.2410-0.2533"`` (the number of runs and the range of their own mean NMEs)."""
    return f"{len(run_means)}: {_number(min(run_means))}" + ("" if len(run_means) == 1 else f"-{_number(max(run_means))}")


def _verdict_text(difference: Interval) -> str:
    """A paired difference with its interval and the verdict of that interval: ``*better*``, ``*worse*`` or
    ``*within noise*``."""
    return f"{difference.text(4)} *{verdict(difference)}*"


def _difference_text(row: dict) -> str:
    """A row's paired difference from the reference (:func:`_verdict_text`), with how many faces were paired when
    not all."""
    difference = row.get("difference")
    if difference is None:
        return "reference"
    return (_verdict_text(difference)
            + ("" if row["paired"] == row["num_samples"] else f" ({row['paired']} faces paired)"))


def _interval_fields(name: str, interval: Interval | None) -> dict:
    """CSV fields ``name``, ``name_low``, ``name_high`` of ``interval`` (None: empty)."""
    values = (None, None, None) if interval is None else (interval.estimate, interval.low, interval.high)
    return dict(zip((name, f"{name}_low", f"{name}_high"), values))


def _real_cells(real: dict) -> tuple[list[str], dict]:
    """The real-photo cells of a row (:data:`REAL_COLUMNS`) and its ``real_*`` CSV fields."""
    landmark = real.get("landmark")
    cells = [real["nme"].text(4), real["aligned"].text(4), "-" if landmark is None else landmark.text(4),
             _difference_text(real), f"{real['num_failed']}/{real['num_samples']}"]
    fields = {**_interval_fields("real_nme", real["nme"]), **_interval_fields("real_nme_aligned", real["aligned"]),
              **_interval_fields("real_landmark_nme_balanced", landmark),
              **_interval_fields("real_difference", real.get("difference")),
              "real_num_failed": real["num_failed"], "real_num_samples": real["num_samples"]}
    return cells, fields


def write_tables(out: Path, rows: dict, reference: str, title: str, notes: list[str] = (),
                 contrasts: dict | None = None) -> None:
    """``table.md`` (Table 1's layout, with intervals, under ``title`` and ``notes`` paragraphs) and
    ``table.csv`` (the same numbers, one per column). Rows with ``runs`` (each run's own NME mean: several
    runs of one variant) get a runs column, and ``num_runs``, ``run_nme_min``, ``run_nme_max`` in the CSV; rows
    with ``real`` (their row on real photos) get :data:`REAL_COLUMNS`, and ``real_*`` in the CSV. ``contrasts``
    (:func:`~experiments.compare.stats.contrast_rows`, each with ``real`` when the photos were scored) add a
    second table to ``table.md`` and ``contrasts.csv``."""
    with_runs = any("runs" in row for row in rows.values())
    with_real = any("real" in row for row in rows.values())
    header = [c.format(reference=reference) for c in COLUMNS + (REAL_COLUMNS if with_real else ())]
    if with_runs:
        header.insert(1, RUNS_COLUMN)
    lines = [f"# {title}", "",
             "Bootstrap 95% intervals; the difference is each method's paired difference from "
             f"{reference} (negative: better), with the verdict of its interval: *better* or *worse* when it "
             "excludes 0, else *within noise*.", *(line for note in notes for line in ("", note)), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for name, row in rows.items():
        real_cells, real_fields = _real_cells(row["real"]) if with_real else ([], {})
        cells = [name, *([_runs_text(row["runs"])] if with_runs else []), row["nme"].text(4), _number(row["nme_median"]),
                 *(_number(row[f"nme_yaw_{lo}_{hi}"]) for lo, hi in YAW_BUCKETS_DEG),
                 _number(row["nme_aligned_mean"]), _number(row["nme_closest_mean"]),
                 _number(row["landmark_nme_balanced"]), _difference_text(row),
                 f"{row['num_failed']}/{row['num_samples']}", *real_cells]
        lines.append("| " + " | ".join(cells) + " |")
        csv_rows.append({"method": name, "nme_mean": row["nme"].estimate, "nme_low": row["nme"].low,
                         "nme_high": row["nme"].high, "nme_median": row["nme_median"],
                         **{f"nme_yaw_{lo}_{hi}": row[f"nme_yaw_{lo}_{hi}"] for lo, hi in YAW_BUCKETS_DEG},
                         "nme_aligned": row["nme_aligned_mean"], "nme_closest": row["nme_closest_mean"],
                         "landmark_nme_balanced": row["landmark_nme_balanced"],
                         **_interval_fields("difference", row.get("difference")),
                         "num_failed": row["num_failed"], "num_samples": row["num_samples"],
                         **({"num_runs": len(row["runs"]), "run_nme_min": min(row["runs"]),
                             "run_nme_max": max(row["runs"])} if with_runs else {}), **real_fields})
    if contrasts:
        contrasts_real = all("real" in c for c in contrasts.values())
        lines += _contrast_lines(contrasts, contrasts_real)
        _write_csv(out / "contrasts.csv", [_contrast_fields(name, c, contrasts_real) for name, c in contrasts.items()])
    else:  # a rerun into the same folder without contrasts leaves no stale file
        (out / "contrasts.csv").unlink(missing_ok=True)
    write_text(out / "table.md", "\n".join(lines) + "\n")
    _write_csv(out / "table.csv", csv_rows)


def _contrast_lines(contrasts: dict, with_real: bool) -> list[str]:
    """The markdown of the contrasts' table: each one's paired difference, first minus second, with its verdict
    (on the real photos too with ``with_real``: every contrast has ``real``)."""
    header = ["contrast", "first minus second", "difference [95% CI]", "faces",
              *(["real: difference [95% CI]", "real: photos"] if with_real else [])]
    lines = ["", "Contrasts: paired differences between two rows, first minus second (negative: the first is better), "
             "from the same two-level bootstrap, with the verdict of their interval.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, c in contrasts.items():
        cells = [name, f"{c['first']} minus {c['second']}", _verdict_text(c["difference"]), str(c["paired"]),
                 *([_verdict_text(c["real"]["difference"]), str(c["real"]["paired"])] if with_real else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _contrast_fields(name: str, contrast: dict, with_real: bool) -> dict:
    """A contrast's ``contrasts.csv`` row: its rows, paired difference and count (``real_*`` too with
    ``with_real``)."""
    fields = {"contrast": name, "first": contrast["first"], "second": contrast["second"],
              **_interval_fields("difference", contrast["difference"]), "paired": contrast["paired"]}
    if with_real:
        fields.update(_interval_fields("real_difference", contrast["real"]["difference"]),
                      real_paired=contrast["real"]["paired"])
    return fields


def _write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header, written atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_figures(out: Path, tables: dict, yaw_methods: list[str], expression_names, resamples: int) -> None:
    """Figure 7 (CED of every method), Figure 10 (NME against yaw of ``yaw_methods``) and Figure 11 (NME
    per dominant expression of each method, with ``resamples``-bootstrap intervals)."""
    save_ced(out / "ced.png", {name: t["nme"][~t["failed"]] for name, t in tables.items()})
    save_nme_vs_yaw(out / "nme_vs_yaw.png", {name: (tables[name]["yaw_deg"], tables[name]["nme"])
                                             for name in yaw_methods})
    labels = sorted({int(label) for t in tables.values() for label in t["expression"] if label >= 0})
    names = list(expression_names or [])
    groups = [names[label] if label < len(names) else f"expression {label}" for label in labels] or ["unknown"]
    means = {}
    for name, table in tables.items():
        values = []
        for label in labels or [-1]:
            interval = bootstrap_mean(table["nme"][table["expression"] == label], resamples)
            values.append((interval.estimate, interval.low, interval.high))
        means[name] = values
    save_grouped_means(out / "nme_per_expression.png", groups, means)


def write_run_list(path: Path, groups: dict[str, list[FinishedRun]]) -> None:
    """``runs.csv``: each run's group, directory, seed and own test NME (mean over its faces, as metrics.json)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "run_dir", "seed", "nme_mean", "num_samples", "num_failed"])
        for label, group in groups.items():
            for run in group:
                writer.writerow([label, run.dir, run.config.get("seed"), repr(run.summary["nme_mean"]),
                                 run.summary["num_samples"], run.summary["num_failed"]])
