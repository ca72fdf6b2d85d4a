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
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
from omegaconf import OmegaConf

from datamodules import FaceVolumeDataModule
from experiments import evaluate, train
from experiments.baselines import (
    DEFAULT_REGULARISATION,
    FittedShapeBaseline,
    MeanShapeBaseline,
    MeanVolumeBaseline,
    mean_training_volume,
)
from experiments.config import CONFIG_DIR, ConfigError, load_config
from lightning_vrn.atomic import atomic_path, write_text
from lightning_vrn.cli import run_command
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.metrics.bootstrap import bootstrap_mean, paired_difference
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


def test_data(settings: CompareSettings, data_dir: Path, model) -> FaceVolumeDataModule:
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
        _, _, logged = evaluate.test_report(module, data(module), folder if volume else None)
        scores = {key.split("/", 1)[1]: float(value) for key, value in logged.items() if "landmark_nme" in key}
        write_text(landmarks_file, json.dumps(scores, indent=2) + "\n")
    table = read_per_sample_csv(folder / "test.csv") if volume else None
    return table, json.loads(landmarks_file.read_text())


def run_compare(settings: CompareSettings) -> dict:
    """Every stage; returns ``{method: row of the table}``."""
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
        return test_data(settings, data_dir, module)

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
    test_file = test_data(settings, data_dir, None)
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
    write_tables(out, rows, settings)
    write_figures(out, tables, settings, test_file.attrs.get("expression_names"))
    progress(f"report: {out / 'table.md'}, {out / 'table.csv'}, ced.png, nme_vs_yaw.png, nme_per_expression.png")
    return rows


def table_rows(tables: dict, landmarks: dict, reference: str, resamples: int) -> dict:
    """One row per method: summary, bootstrap intervals and the paired difference from ``reference``."""
    rows = {}
    for name, table in tables.items():
        summary = summarise(table)
        ok = ~table["failed"]
        row = {**summary, "nme": bootstrap_mean(table["nme"][ok], resamples),
               "landmark_nme_balanced": landmarks.get(name, {}).get("landmark_nme_balanced")}
        if name != reference:
            if not np.array_equal(table["index"], tables[reference]["index"]):
                raise ValueError(f"{name} and {reference} were scored on different test samples")
            row["difference"] = paired_difference(table["nme"], tables[reference]["nme"], resamples)
        rows[name] = row
    return rows


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


COLUMNS = ("method", "NME mean [95% CI]", "median", "yaw 0-30", "yaw 30-60", "yaw 60-90", "aligned NME",
           "closest-point error", "landmark NME (balanced)", "difference from {reference} [95% CI]", "failed")


def write_tables(out: Path, rows: dict, settings: CompareSettings) -> None:
    """``table.md`` (Table 1's layout, with intervals) and ``table.csv`` (the same numbers, one per column)."""
    header = [c.format(reference=settings.reference) for c in COLUMNS]
    lines = [f"# {settings.name}: NME on the synthetic test split ({settings.data.test} faces, grid "
             f"{settings.data.grid})", "",
             "Bootstrap 95% intervals over the test faces; the difference is each method's paired per-face "
             f"difference from {settings.reference} (negative: better), marked *within noise* when its "
             "interval contains 0.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for name, row in rows.items():
        difference = row.get("difference")
        diff_text = "reference" if difference is None else (
            difference.text(4) + ("" if difference.excludes_zero else " *within noise*"))
        cells = [name, row["nme"].text(4), _number(row["nme_median"]),
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
                         "num_failed": row["num_failed"], "num_samples": row["num_samples"]})
    write_text(out / "table.md", "\n".join(lines) + "\n")
    with atomic_path(out / "table.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)


def write_figures(out: Path, tables: dict, settings: CompareSettings, expression_names) -> None:
    """Figure 7 (CED of every method), Figure 10 (NME against yaw of the guided methods and the reference)
    and Figure 11 (NME per dominant expression of each method, with intervals)."""
    save_ced(out / "ced.png", {name: t["nme"][~t["failed"]] for name, t in tables.items()})
    guided = [name for name in tables if name in settings.guidance or name.split(" (")[0] in settings.guidance]
    save_nme_vs_yaw(out / "nme_vs_yaw.png", {name: (tables[name]["yaw_deg"], tables[name]["nme"])
                                             for name in [settings.reference, *guided]})
    labels = sorted({int(label) for t in tables.values() for label in t["expression"] if label >= 0})
    names = list(expression_names or [])
    groups = [names[label] if label < len(names) else f"expression {label}" for label in labels] or ["unknown"]
    means = {}
    for name, table in tables.items():
        values = []
        for label in labels or [-1]:
            interval = bootstrap_mean(table["nme"][table["expression"] == label], settings.bootstrap_resamples)
            values.append((interval.estimate, interval.low, interval.high))
        means[name] = values
    save_grouped_means(out / "nme_per_expression.png", groups, means)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="e.g. experiments/configs/compare_quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the compare settings")
    args = parser.parse_args(argv)
    settings = load_compare_settings(args.config, args.overrides)
    start = time.time()
    run_compare(settings)
    print((Path(settings.out) / "table.md").read_text())
    print(f"compare finished in {(time.time() - start) / 60:.1f} min; outputs in {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
