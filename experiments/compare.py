"""The paper's comparison by one command: ``python -m experiments.compare --config experiments/configs/compare_quickstart.yaml``.

Stages (a progress line each; everything resumable, so rerunning the command continues where it stopped):

1. data: the train/val/test splits, with frontal volumes for the no-alignment ablation (the
   synthetic generator resumes a partial file and skips a finished one);
2. training: each landmark detector and each method, in ``OUT/runs/NAME`` (a finished run, one with
   ``metrics.json``, is reused; an interrupted one resumes from its ``last.ckpt``);
3. evaluation: every method, VRN-Guided with ground-truth and with detected landmarks, and the
   baselines (the 3DMM fit to detected landmarks, the mean training volume, and the mean shape at
   the ground-truth pose, an oracle), all on the same test split through the same test path as
   ``experiments.evaluate`` (``OUT/eval/NAME/test.csv``; a finished report is reused);
4. the report in ``OUT``: ``table.md`` and ``table.csv`` in the layout of the paper's Table 1 with
   bootstrap 95% intervals and each method's paired difference from the reference method (VRN),
   ``ced.png`` (Figure 7), ``nme_vs_yaw.png`` (Figure 10), ``nme_per_expression.png`` (Figure 11).

The settings are :class:`CompareSettings`; ``experiments/configs/compare_quickstart.yaml`` (CPU, under
an hour on 2 cores) and ``compare_paper.yaml`` (the paper's sizes, for a GPU) are the shipped ones.

``--runs DIR...`` makes the same report from finished runs (:func:`compare_runs`), and ``--wandb
ENTITY/PROJECT`` from the finished trainings of a W&B project (:mod:`experiments.wandb_project`);
docs/dashboards.md says how runs are grouped and what the intervals cover. ``--runs`` refuses, in one line
naming the run and the fix: a run still training (its ``run.lock`` held; in a folder of runs it is left out
with a note, as an unfinished one is), runs tested on different test files (by content: the SHA-256 each
test recorded in metrics.json), and a damaged (say truncated) config.yaml, metrics.json or nme/test.csv. A run
tested before the SHA-256 was recorded is assumed to have been tested on the file now at its path, as a
note on stderr and in the report says.
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import yaml
from omegaconf import DictConfig, OmegaConf

from datamodules import FaceVolumeDataModule
from datamodules.datamodule import split_path
from experiments import evaluate, train
from experiments.baselines import (
    DEFAULT_REGULARISATION,
    FittedShapeBaseline,
    MeanShapeBaseline,
    MeanVolumeBaseline,
    mean_training_volume,
)
from experiments.config import CONFIG_DIR, ConfigError, flat_keys, load_config
from experiments.runs import LOCK_NAME, lock_holder, newest_attempt
from experiments.wandb_project import fetch_runs
from lightning_vrn.atomic import atomic_path, file_sha256, write_text
from lightning_vrn.cli import run_command
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.metrics.bootstrap import DEFAULT_RESAMPLES, bootstrap_mean, paired_difference
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, read_per_sample_csv, summarise
from lightning_vrn.models import load_model
from lightning_vrn.models.guided import DetectedGuidance
from lightning_vrn.settings import SettingsError, parse_settings
from lightning_vrn.visualise import save_ced, save_grouped_means, save_nme_vs_yaw


@dataclass
class DataSplits:
    """The synthetic data of the comparison (made with ``--frontal``), in ``dir``."""

    dir: str = "data/compare"
    grid: str = "100,96,96"
    train: int = 800
    val: int = 32
    test: int = 100
    seed: int = 0
    workers: int = 2


@dataclass
class CompareSettings:
    """A comparison. ``train_config``: the experiment config every training extends (in
    experiments/configs); ``overrides``: ``key=value`` for every training; ``detectors`` and
    ``methods``: name -> its own overrides; ``guidance``: guided method -> the detector that guides
    it at evaluation; ``fit_detector``: the detector whose landmarks the 3DMM fit uses;
    ``fit_regularisation``: the fit's Tikhonov lambda; ``reference``: the method every other is
    compared with."""

    name: str = "compare"
    out: str = "runs/compare"
    data: DataSplits = field(default_factory=DataSplits)
    train_config: str = "quickstart.yaml"
    overrides: list = field(default_factory=list)
    detectors: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    guidance: dict = field(default_factory=dict)
    fit_detector: str = "detector"
    fit_regularisation: float = DEFAULT_REGULARISATION
    reference: str = "VRN"
    batch_size: int = 8
    bootstrap_resamples: int = 2000


def load_compare_settings(path: str | Path, overrides: list[str] = ()) -> CompareSettings:
    """The comparison settings at ``path`` with ``a.b=c`` overrides, checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compare config {path} does not exist; shipped: "
                          f"{', '.join(p.name for p in sorted(CONFIG_DIR.glob('compare_*.yaml')))}")
    merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    try:
        settings = parse_settings(CompareSettings, OmegaConf.to_container(merged, resolve=True), where=str(path))
    except SettingsError as error:
        raise ConfigError(str(error)) from None
    unknown = sorted((set(settings.guidance.values()) | {settings.fit_detector}) - set(settings.detectors))
    if unknown:
        raise ConfigError(f"{path}: guidance or fit_detector name detectors {unknown} that 'detectors' does not "
                          f"define ({sorted(settings.detectors)})")
    if settings.reference not in settings.methods:
        raise ConfigError(f"{path}: reference {settings.reference!r} is not one of the methods {sorted(settings.methods)}")
    return settings


class Progress:
    """``[compare 3/12, 42 s] text`` lines on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def __call__(self, text: str) -> None:
        self.done += 1
        print(f"[compare {self.done}/{self.total}, {time.time() - self.start:.0f} s] {text}", file=sys.stderr, flush=True)


def prepare_data(settings: CompareSettings) -> Path:
    """Generate (or finish, or reuse) the train, val and test splits; returns their folder."""
    from data_prep.synthetic import generate_split

    data = settings.data
    folder = Path(data.dir)
    for split in ("train", "val", "test"):
        generate_split(folder / f"{split}.h5", "builtin", VoxelGrid.parse(data.grid), getattr(data, split), data.seed,
                       split, workers=data.workers, with_frontal=True)
    return folder


def trained_checkpoint(settings: CompareSettings, name: str, overrides: list[str], data_dir: Path) -> Path:
    """The best checkpoint of training ``name``, training (or resuming) it unless it finished before."""
    run_dir = Path(settings.out) / "runs" / evaluate.slug(name)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        cfg = load_config(CONFIG_DIR / settings.train_config,
                          [f"data.dir={data_dir}", f"grid={settings.data.grid}", f"run_dir={run_dir}",
                           f"name={evaluate.slug(name)}", *settings.overrides, *overrides])
        train.train(cfg, command=f"python -m experiments.compare ({settings.name}: {name})")
    best = json.loads(metrics_file.read_text()).get("best_checkpoint") or str(run_dir / "checkpoints" / "last.ckpt")
    return Path(best)


def evaluation_data(settings: CompareSettings, data_dir: Path, model) -> FaceVolumeDataModule:
    """The test split as ``model`` needs it (its target frame and heatmaps)."""
    return FaceVolumeDataModule(test_path=data_dir / "test.h5", grid=VoxelGrid.parse(settings.data.grid),
                                batch_size=settings.batch_size, num_workers=0, persistent_workers=False,
                                heatmap_sigma=getattr(model, "heatmap_sigma", None),
                                target_volume=getattr(model, "target_frame", None) or "aligned")


def scored(out: Path, name: str, build: Callable[[], pl.LightningModule], data: Callable,
           volume: bool = True) -> tuple[dict | None, dict]:
    """Method ``name``'s per-sample NME table (None with ``volume=False``: a landmark detector) and its
    landmark NMEs (``landmark_nme*``, empty for a model without landmarks), from one test pass whose
    report ``out/eval/NAME`` is reused when it exists."""
    folder = out / "eval" / evaluate.slug(name)
    landmarks_file = folder / "landmarks.json"
    if not landmarks_file.is_file():
        module = build()
        _, _, logged = evaluate.evaluation_report(module, data(module), folder if volume else None)
        scores = evaluate.landmark_scores(logged)
        write_text(landmarks_file, json.dumps(scores, indent=2) + "\n")
    table = read_per_sample_csv(folder / "test.csv") if volume else None
    return table, json.loads(landmarks_file.read_text())


def run_compare(settings: CompareSettings, wandb: bool | None = None) -> dict:
    """Every stage; returns ``{method: row of the table}``. ``wandb``: log each method's evaluation to W&B
    (:func:`log_wandb_runs`; None: when the trainings had ``logger.wandb=true``)."""
    out = Path(settings.out)
    guided_detected = {f"{method} (detected landmarks)": detector for method, detector in settings.guidance.items()}
    baselines = ["3DMM fit to detected landmarks", "mean training volume", "mean shape at GT pose (oracle)"]
    progress = Progress(1 + len(settings.detectors) + len(settings.methods) + len(settings.methods)
                        + len(guided_detected) + len(settings.detectors) + len(baselines) + 1)
    data_dir = prepare_data(settings)
    progress(f"data: {data_dir} (train {settings.data.train}, val {settings.data.val}, test {settings.data.test}, "
             f"grid {settings.data.grid})")

    checkpoints = {}
    for name, overrides in {**settings.detectors, **settings.methods}.items():
        checkpoints[name] = trained_checkpoint(settings, name, list(overrides), data_dir)
        progress(f"trained {name}: {checkpoints[name]}")

    def data(module):
        return evaluation_data(settings, data_dir, module)

    models = {}

    def model(name: str) -> pl.LightningModule:
        """The trained model ``name``, loaded once."""
        if name not in models:
            models[name] = load_model(checkpoints[name])
        return models[name]

    tables, landmarks = {}, {}
    for name in settings.methods:
        label = f"{name} (ground-truth landmarks)" if name in settings.guidance else name
        tables[label], scores = scored(out, label, lambda name=name: model(name), data)
        if scores:  # VRN-Multitask predicts landmarks too
            landmarks[label] = scores
        progress(f"evaluated {label}")
    for name, detector in guided_detected.items():
        method = name.split(" (")[0]
        tables[name], _ = scored(out, name, lambda m=method, d=detector: DetectedGuidance(model(m), model(d)), data)
        progress(f"evaluated {name} (detector {detector})")
    for detector in settings.detectors:
        landmarks[detector] = scored(out, detector, lambda d=detector: model(d), data, volume=False)[1]
        progress(f"landmark NME of {detector}: {landmarks[detector].get('landmark_nme_balanced', float('nan')):.4f}")
    for name in guided_detected:
        landmarks[name] = landmarks[guided_detected[name]]

    grid = VoxelGrid.parse(settings.data.grid)
    test_file = evaluation_data(settings, data_dir, None)
    test_file.check_files("test")
    test_file = test_file.datasets["test"].file
    builders = {
        baselines[0]: lambda: FittedShapeBaseline.for_file(test_file, grid, settings.fit_regularisation,
                                                           landmarks=model(settings.fit_detector).landmarks),
        baselines[1]: lambda: MeanVolumeBaseline(grid, mean_training_volume(data_dir / "train.h5", grid)),
        baselines[2]: lambda: MeanShapeBaseline.for_file(test_file, grid),
    }
    for name in baselines:
        tables[name], _ = scored(out, name, builders[name], data)
        progress(f"evaluated baseline {name}")
    landmarks[baselines[0]] = landmarks[settings.fit_detector]

    rows = table_rows(tables, landmarks, settings.reference, settings.bootstrap_resamples)
    write_tables(out, rows, settings.reference, f"{settings.name}: NME on the synthetic test split "
                 f"({settings.data.test} faces, grid {settings.data.grid})")
    guided = [name for name in tables if name in settings.guidance or name.split(" (")[0] in settings.guidance]
    write_figures(out, tables, [settings.reference, *guided], test_file.attrs.get("expression_names"),
                  settings.bootstrap_resamples)
    progress(f"report: {out / 'table.md'}, {out / 'table.csv'}, ced.png, nme_vs_yaw.png, nme_per_expression.png")
    log_wandb_runs(settings, tables, landmarks, wandb)
    return rows


def log_wandb_runs(settings: CompareSettings, tables: dict, landmarks: dict, wanted: bool | None) -> None:
    """One W&B eval run per method of ``tables`` in ``OUT/eval/NAME/wandb`` (:func:`experiments.evaluate.log_eval_run`:
    summary ``eval/nme_mean``, ..., the per-sample table, the error curve), when ``wanted`` or, with None, when a
    method's training had ``logger.wandb=true``. A trained method's runs (ground-truth and detected landmarks)
    are linked to its training run; a baseline's run is grouped by its own name."""
    out = Path(settings.out)
    run_dirs = {name: out / "runs" / evaluate.slug(name) for name in settings.methods}
    if not any(evaluate.wandb_wanted(wanted, run_dir) for run_dir in run_dirs.values()):
        return
    method_of = {label: name for name in settings.methods
                 for label in (name, f"{name} (ground-truth landmarks)", f"{name} (detected landmarks)")}
    for label, table in tables.items():
        run_dir = run_dirs.get(method_of.get(label))
        evaluate.log_eval_run(out / "eval" / evaluate.slug(label), run_dir,
                              {"eval": (summarise(table), table, landmarks.get(label, {}))},
                              {"compare": settings.name, "method": label}, group=evaluate.slug(label),
                              name=f"{evaluate.slug(label)}-eval")


def table_rows(tables: dict, landmarks: dict, reference: str, resamples: int) -> dict:
    """One row per method: summary, bootstrap intervals and the paired difference from ``reference`` over
    the test samples both were scored on (``paired``: how many)."""
    rows = {}
    for name, table in tables.items():
        summary = summarise(table)
        ok = ~table["failed"]
        row = {**summary, "nme": bootstrap_mean(table["nme"][ok], resamples),
               "landmark_nme_balanced": landmarks.get(name, {}).get("landmark_nme_balanced")}
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


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


COLUMNS = ("method", "NME mean [95% CI]", "median", "yaw 0-30", "yaw 30-60", "yaw 60-90", "aligned NME",
           "closest-point error", "landmark NME (balanced)", "difference from {reference} [95% CI]", "failed")


RUNS_COLUMN = "runs: their NME range"


def _runs_text(run_means: list[float]) -> str:
    """``"3: 0.2410-0.2533"`` (the number of runs and the range of their own mean NMEs)."""
    return f"{len(run_means)}: {_number(min(run_means))}" + ("" if len(run_means) == 1 else f"-{_number(max(run_means))}")


def write_tables(out: Path, rows: dict, reference: str, title: str, notes: list[str] = ()) -> None:
    """``table.md`` (Table 1's layout, with intervals, under ``title`` and ``notes`` paragraphs) and
    ``table.csv`` (the same numbers, one per column). Rows with ``runs`` (each run's own NME mean: several
    runs of one variant) get a runs column, and ``num_runs``, ``run_nme_min``, ``run_nme_max`` in the CSV."""
    with_runs = any("runs" in row for row in rows.values())
    header = [c.format(reference=reference) for c in COLUMNS]
    if with_runs:
        header.insert(1, RUNS_COLUMN)
    lines = [f"# {title}", "",
             "Bootstrap 95% intervals over the test faces; the difference is each method's paired per-face "
             f"difference from {reference} (negative: better), marked *within noise* when its "
             "interval contains 0.", *(line for note in notes for line in ("", note)), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for name, row in rows.items():
        difference = row.get("difference")
        diff_text = "reference" if difference is None else (
            difference.text(4) + ("" if difference.excludes_zero else " *within noise*")
            + ("" if row["paired"] == row["num_samples"] else f" ({row['paired']} faces paired)"))
        cells = [name, *([_runs_text(row["runs"])] if with_runs else []), row["nme"].text(4), _number(row["nme_median"]),
                 *(_number(row[f"nme_yaw_{lo}_{hi}"]) for lo, hi in YAW_BUCKETS_DEG),
                 _number(row["nme_aligned_mean"]), _number(row["nme_closest_mean"]),
                 _number(row["landmark_nme_balanced"]), diff_text, f"{row['num_failed']}/{row['num_samples']}"]
        lines.append("| " + " | ".join(cells) + " |")
        csv_rows.append({"method": name, "nme_mean": row["nme"].estimate, "nme_low": row["nme"].low,
                         "nme_high": row["nme"].high, "nme_median": row["nme_median"],
                         **{f"nme_yaw_{lo}_{hi}": row[f"nme_yaw_{lo}_{hi}"] for lo, hi in YAW_BUCKETS_DEG},
                         "nme_aligned": row["nme_aligned_mean"], "nme_closest": row["nme_closest_mean"],
                         "landmark_nme_balanced": row["landmark_nme_balanced"],
                         "difference": None if difference is None else difference.estimate,
                         "difference_low": None if difference is None else difference.low,
                         "difference_high": None if difference is None else difference.high,
                         "num_failed": row["num_failed"], "num_samples": row["num_samples"],
                         **({"num_runs": len(row["runs"]), "run_nme_min": min(row["runs"]),
                             "run_nme_max": max(row["runs"])} if with_runs else {})})
    write_text(out / "table.md", "\n".join(lines) + "\n")
    with atomic_path(out / "table.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)


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


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run: its directory, resolved ``config`` (config.yaml), ``metrics`` (metrics.json),
    ``table`` (the test stage's per-sample NME table, nme/test.csv), its ``summary`` (:func:`summarise` of the
    table), ``test_file`` (absolute path) and ``test_sha256``, that file's SHA-256 when its test recorded it
    (metrics.json's ``test_file_sha256``; None for a run tested before it was recorded)."""

    dir: Path
    config: DictConfig
    metrics: dict
    table: dict
    summary: dict
    test_file: Path
    test_sha256: str | None


def collect_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories ``paths`` name: each a run directory (it holds config.yaml) or a folder of them,
    such as a sweep's ``runs/sweeps/NAME``. A run still training (its ``run.lock`` held: :func:`_still_training`)
    is refused when named, and a folder's trial still training or unfinished (without metrics.json) is left out
    with a note on stderr."""
    found = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            training = _still_training(path)
            if training:
                raise ConfigError(f"run {path} is {training}; wait for it to finish, or leave it out of --runs")
            found.append(path)
            continue
        trials = sorted(config.parent for config in path.glob("*/config.yaml"))
        if not trials:
            raise ConfigError(f"{path} is neither a run directory (no config.yaml) nor a folder of run directories "
                              f"(such as runs/sweeps/NAME)")
        for trial in trials:
            training = _still_training(trial)
            if training:
                print(f"[compare] {trial}: {training}, left out", file=sys.stderr, flush=True)
            elif (trial / "metrics.json").is_file():
                found.append(trial)
            else:
                print(f"[compare] {trial}: not finished (no metrics.json), left out", file=sys.stderr, flush=True)
    unique = {path.resolve(): path for path in found}
    return list(unique.values())


def _still_training(run_dir: Path) -> str | None:
    """Who is still training ``run_dir`` (the holder of its ``run.lock``: a live process, or one on another host,
    which cannot be checked), None when no one is: its metrics.json may be an earlier attempt's."""
    holder = lock_holder(run_dir)
    if holder is None:
        return None
    unchecked = "" if holder.get("host") == socket.gethostname() else \
        f" (another host's: if it is gone, delete {run_dir / LOCK_NAME})"
    return (f"still training: {LOCK_NAME} is held by process {holder.get('pid')} on host {holder.get('host')} "
            f"since {holder.get('started')}{unchecked}")


def _retest_fix(run_dir: Path) -> str:
    """How to test a finished run again: its training resumed with its last attempt's config, which only tests."""
    return (f"delete {run_dir / 'metrics.json'} and test the run again with `python -m experiments.train --config "
            f"{_config_path(run_dir)} resume={run_dir}` (its finished training only tests), or leave the run out")


def _config_path(run_dir: Path) -> Path:
    """The config the run's results come from: its newest attempt's (a run may restart with resume=false), or, for
    a run from before attempts were recorded, its config.yaml."""
    attempt = newest_attempt(run_dir)
    return attempt / "config.yaml" if attempt is not None else run_dir / "config.yaml"


def read_run(run_dir: Path) -> FinishedRun:
    """The finished run in ``run_dir``, with the config of its newest attempt, checked: a damaged config
    (:func:`_run_config`), metrics.json or nme/test.csv (truncated, say) is a ConfigError naming the file and the
    fix, and so is a per-sample table that is not the test metrics.json reports."""
    missing = {"metrics.json": "it has not finished: rerun its training command to resume it",
               "nme/test.csv": "its test ran without the NME (nme.every_n_epochs=0); train with nme.every_n_epochs "
                               "of 1 or more to compare it here"}
    for name, fix in missing.items():
        if not (run_dir / name).is_file():
            raise ConfigError(f"run {run_dir} has no {name}: {fix}")
    config, test = _run_config(run_dir)
    if test is None:
        raise ConfigError(f"run {run_dir} has no test split (data.test={config.data.test})")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ConfigError(f"run {run_dir}: metrics.json is damaged ({error}); {_retest_fix(run_dir)}") from None
    try:
        table = read_per_sample_csv(run_dir / "nme" / "test.csv")
    except ValueError as error:
        raise ConfigError(f"run {run_dir}: nme/test.csv is damaged ({error}); {_retest_fix(run_dir)}") from None
    summary = summarise(table)
    nme, reported = summary["nme_mean"], metrics.get("test/nme")
    if reported is None or nme is None or not np.isclose(nme, reported, rtol=1e-9, atol=0):
        raise ConfigError(f"run {run_dir}: nme/test.csv (mean NME {nme}) is not the test metrics.json reports "
                          f"(test/nme={reported}); {_retest_fix(run_dir)}")
    return FinishedRun(run_dir, config, metrics, table, summary, Path(test).resolve(), metrics.get("test_file_sha256"))


def _run_config(run_dir: Path) -> tuple[DictConfig, str | None]:
    """The config the run's results come from (:func:`_config_path`) and its test file (None: no test split),
    checked: YAML with ``data``, and for a run of one attempt the same bytes as the run's ``config.yaml``, which
    training writes with it (so a truncation that still parses is found)."""
    path, top = _config_path(run_dir), run_dir / "config.yaml"
    if path != top and path.parent.name == "001" and top.is_file() and path.read_bytes() != top.read_bytes():
        raise ConfigError(f"run {run_dir}: {top} and {path} differ, though training writes them alike: one is damaged "
                          f"(truncated, say); restore it from the other, or leave the run out")
    try:
        config = OmegaConf.load(path)
        return config, split_path(config.data, "test")
    except (ValueError, yaml.YAMLError) as error:
        why = " ".join(str(error).split())
    except (AttributeError, KeyError, TypeError):
        why = "no data.test or data.dir"
    raise ConfigError(f"run {run_dir}: {path} is damaged ({why}); restore it, or leave the run out")


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


def differing_settings(configs: list[DictConfig], same_by_design: set[str]) -> list[str]:
    """The dotted config keys whose values differ between ``configs``, other than ``same_by_design``."""
    flat = [flat_keys(OmegaConf.to_container(config, resolve=True)) for config in configs]
    keys = sorted(set().union(*flat) - same_by_design)
    return [key for key in keys if len({repr(f.get(key)) for f in flat}) > 1]


def compare_runs(paths: list[str | Path], out: Path, group_by: str = "model.name", reference: str | None = None,
                 resamples: int = DEFAULT_RESAMPLES) -> dict:
    """The compare command's table and figures for finished runs, one row per value of ``group_by``;
    returns ``{group: row}`` (each row's ``runs``: its runs' own mean NMEs).

    The runs are :func:`collect_run_dirs` (a run still training is refused) read by :func:`read_run` (a damaged
    file is refused), all tested on the same test file, by content (:func:`common_test_file`: else a ConfigError
    names two runs that differ). The runs of one group are averaged per face (:func:`seed_mean_table`) before the
    bootstrap over faces; ``reference`` (default ``vrn`` when present, else the first group) is the row every
    other is paired with. Writes ``table.md`` (titled with the test file's path and SHA-256 prefix), ``table.csv``,
    ``runs.csv`` (one row per run) and the figures into ``out``.
    """
    runs = [read_run(run_dir) for run_dir in collect_run_dirs(paths)]
    digest, file_notes = common_test_file(runs)
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        value = OmegaConf.select(run.config, group_by, default=None)
        if value is None:
            raise ConfigError(f"run {run.dir}: its config has no {group_by} to group by (--group-by)")
        groups.setdefault(str(value), []).append(run)
    reference = reference or ("vrn" if "vrn" in groups else next(iter(groups)))
    if reference not in groups:
        raise ConfigError(f"--reference {reference} is none of the {group_by} values of the runs: {sorted(groups)}")
    tables = {label: seed_mean_table([run.table for run in group]) for label, group in groups.items()}
    for label, table in tables.items():
        if not len(table["index"]):
            raise ConfigError(f"the {label} runs share no test face: {', '.join(str(run.dir) for run in groups[label])}")
    landmarks = {}
    for label, group in groups.items():
        scores = [run.metrics["test/landmark_nme_balanced"] for run in group
                  if run.metrics.get("test/landmark_nme_balanced") is not None]
        if scores:
            landmarks[label] = {"landmark_nme_balanced": float(np.mean(scores))}
    rows = table_rows(tables, landmarks, reference, resamples)
    for label, group in groups.items():
        rows[label]["runs"] = [run.summary["nme_mean"] for run in group]
    same_by_design = {"seed", "run_dir", "name", "resume", group_by}
    notes = [f"One row per {group_by} ({len(runs)} runs). Where several runs (seeds) share a row, each face's "
             "NME is averaged over them first (a face that failed in any run counts as failed), so the interval is "
             "over test faces and leaves out seed-to-seed variation: the runs column gives the number of runs and "
             "the range of their own mean NMEs, the seed spread; the landmark NME is their mean."]
    notes += [f"{label} averages runs that also differ in {', '.join(keys)} (separate them with --group-by)."
              for label, group in groups.items()
              if (keys := differing_settings([run.config for run in group], same_by_design))]
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, rows, reference, f"runs: NME on {runs[0].test_file} (sha256 {digest[:12]})", notes + file_notes)
    write_figures(out, tables, list(tables), _expression_names(runs[0].test_file), resamples)
    write_run_list(out / "runs.csv", groups)
    return rows


def common_test_file(runs: list[FinishedRun]) -> tuple[str, list[str]]:
    """The SHA-256 of the one test file every run was tested on (metrics.json's ``test_file_sha256``), and the
    report's notes about it. A run tested before the digest was recorded is assumed to have been tested on the
    file now at its path, said in a note (on stderr too). A ConfigError names two runs tested on different files,
    or a run without a recorded digest whose file is gone."""
    now: dict[Path, str] = {}  # digests of unrecorded runs' files, each file read once
    unrecorded: dict[Path, list[str]] = {}
    for run in runs:
        if run.test_sha256 is None:
            if not run.test_file.is_file():
                raise ConfigError(f"run {run.dir} did not record which test file it was tested on (test_file_sha256: "
                                  f"it was tested before that was recorded) and {run.test_file} no longer exists: its "
                                  f"faces cannot be matched with other runs'; leave it out")
            if run.test_file not in now:
                now[run.test_file] = file_sha256(run.test_file)
            unrecorded.setdefault(run.test_file, []).append(str(run.dir))
    notes = [f"The test file's identity was not recorded by {', '.join(dirs)} (tested before test_file_sha256 was "
             f"recorded): it is assumed to be the file now at {path} (sha256 {now[path][:12]})."
             for path, dirs in unrecorded.items()]
    for note in notes:
        print(f"[compare] {note}", file=sys.stderr, flush=True)
    digests = [run.test_sha256 or now[run.test_file] for run in runs]
    for run, digest in zip(runs, digests):
        if digest != digests[0]:
            same_path = run.test_file == runs[0].test_file
            changed = " (the file at that path changed between their tests)" if same_path else ""
            raise ConfigError(f"runs {runs[0].dir} and {run.dir} were tested on different files ({runs[0].test_file}, "
                              f"sha256 {digests[0][:12]}, and {run.test_file}, sha256 {digest[:12]}){changed}: their "
                              f"faces cannot be paired; compare them in separate --runs calls")
    paths = sorted({str(run.test_file) for run in runs})
    if len(paths) > 1:
        notes.append(f"The runs' test files at {', '.join(paths)} are the same file (sha256 {digests[0][:12]}).")
    return digests[0], notes


def _expression_names(test_file: Path):
    """The test file's expression names (label id -> name), None when the file is gone or has none."""
    if not test_file.is_file():
        return None
    return open_dataset(test_file).expression_names or None


def write_run_list(path: Path, groups: dict[str, list[FinishedRun]]) -> None:
    """``runs.csv``: each run's group, directory, seed and own test NME (mean over its faces, as metrics.json)."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "run_dir", "seed", "nme_mean", "num_samples", "num_failed"])
        for label, group in groups.items():
            for run in group:
                writer.writerow([label, run.dir, run.config.get("seed"), repr(run.summary["nme_mean"]),
                                 run.summary["num_samples"], run.summary["num_failed"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="train and evaluate: e.g. experiments/configs/compare_quickstart.yaml")
    source.add_argument("--runs", nargs="+", type=Path,
                        help="collect finished runs: run directories or folders of them (runs/sweeps/NAME)")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="collect the finished training runs of a W&B project (needs the network and an API key)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the compare settings (--config)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-runs"),
                        help="--runs, --wandb: the report's folder")
    parser.add_argument("--wandb-tag", action="append", default=[], metavar="TAG",
                        help="--wandb: only runs with this tag (repeat for several: runs with all of them)")
    parser.add_argument("--group-by", default="model.name",
                        help="--runs, --wandb: config key of the rows (default model.name)")
    parser.add_argument("--reference", default=None,
                        help="--runs, --wandb: the row others are paired with (default vrn)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="--runs, --wandb: bootstrap resamples")
    parser.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="--config: log each method's evaluation into a W&B eval run linked to its training run "
                             "(default: when the trainings had logger.wandb=true)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after --options
    if args.wandb_tag and not args.wandb:
        parser.error("--wandb-tag selects runs of --wandb ENTITY/PROJECT")
    if args.runs or args.wandb:
        if args.overrides:
            parser.error(f"key=value overrides are for --config, not --runs or --wandb: {args.overrides}")
        runs = args.runs or fetch_runs(args.wandb, args.out / "wandb-runs", args.wandb_tag)
        compare_runs(runs, args.out, args.group_by, args.reference, args.resamples)
        print((args.out / "table.md").read_text())
        print(f"outputs in {args.out}: table.md, table.csv, runs.csv, ced.png, nme_vs_yaw.png, nme_per_expression.png")
        return 0
    settings = load_compare_settings(args.config, args.overrides)
    start = time.time()
    run_compare(settings, wandb=args.log_wandb)
    print((Path(settings.out) / "table.md").read_text())
    print(f"compare finished in {(time.time() - start) / 60:.1f} min; outputs in {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
