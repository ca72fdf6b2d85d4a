"""The comparison of ``--config``: the data (:func:`prepare_data`), the trainings (:func:`trained_checkpoint`),
every method's test pass (:func:`scored`, through :mod:`experiments.evaluation`, the path
``experiments.evaluate`` takes), the report (:func:`run_compare`) and the methods' W&B eval runs
(:func:`log_wandb_runs`). Everything is resumable: a finished stage's files are reused."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl

from experiments import train
from experiments.baselines import FittedShapeBaseline, MeanShapeBaseline, MeanVolumeBaseline, mean_training_volume
from experiments.compare.methods import (
    BASELINES,
    FIT,
    MEAN_VOLUME,
    ORACLE,
    compared_methods,
    detected_methods,
    trained_methods,
)
from experiments.compare.report import write_figures, write_tables
from experiments.compare.settings import CompareSettings
from experiments.compare.stats import table_rows
from experiments.config import CONFIG_DIR, load_config
from experiments.evaluation import evaluation_data, evaluation_report, landmark_scores, log_eval_run, slug, wandb_wanted
from lightning_vrn.atomic import file_sha256, write_text
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.metrics.report import read_per_sample_csv, summarise
from lightning_vrn.models import load_model
from lightning_vrn.models.guided import DetectedGuidance


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
    """The best checkpoint of training ``name``: trained, resumed, or reused when it finished before, through
    ``experiments.train``, which refuses a finished or interrupted run trained with other learning settings (a
    changed preset, say) instead of reusing it."""
    run_dir = Path(settings.out) / "runs" / slug(name)
    cfg = load_config(CONFIG_DIR / settings.train_config,
                      [f"data.dir={data_dir}", f"grid={settings.data.grid}", f"run_dir={run_dir}",
                       f"name={slug(name)}", *settings.overrides, *overrides])
    metrics = train.train(cfg, command=f"python -m experiments.compare ({settings.name}: {name})")
    return Path(metrics.get("best_checkpoint") or run_dir / "checkpoints" / "last.ckpt")


def scoring_data(settings: CompareSettings, data_dir: Path, module: pl.LightningModule | None = None):
    """The test split as ``module`` needs it (its heatmaps and target frame; None: neither), opened and checked."""
    return evaluation_data(data_dir / "test.h5", VoxelGrid.parse(settings.data.grid), settings.batch_size,
                           getattr(module, "heatmap_sigma", None), getattr(module, "target_frame", None))


def scored(out: Path, label: str, build: Callable[[], pl.LightningModule], data: Callable, inputs: dict,
           volume: bool = True) -> tuple[dict | None, dict]:
    """The per-sample NME table of the method labelled ``label`` (None with ``volume=False``: a landmark detector)
    and its landmark NMEs (``landmark_nme*``, empty for a model without landmarks), from one test pass. Its
    report ``out/eval/SLUG`` is reused when ``scored.json`` there records the same ``inputs`` (what was scored:
    the checkpoints' and files' SHA-256, the method); otherwise the method is scored again."""
    folder = out / "eval" / slug(label)
    landmarks_file, record = folder / "landmarks.json", folder / "scored.json"
    inputs = {"label": label, **inputs}
    if not (landmarks_file.is_file() and record.is_file() and json.loads(record.read_text()) == inputs):
        module = build()
        _, _, logged = evaluation_report(module, data(module), folder if volume else None)
        write_text(landmarks_file, json.dumps(landmark_scores(logged), indent=2) + "\n")
        write_text(record, json.dumps(inputs, indent=2, sort_keys=True) + "\n")
    table = read_per_sample_csv(folder / "test.csv") if volume else None
    return table, json.loads(landmarks_file.read_text())


def run_compare(settings: CompareSettings, wandb: bool | None = None) -> dict:
    """Every stage; returns ``{method: row of the table}``. ``wandb``: log each method's evaluation to W&B
    (:func:`log_wandb_runs`; None: when the trainings had ``logger.wandb=true``)."""
    out = Path(settings.out)
    trained, detected = trained_methods(settings), detected_methods(settings)
    progress = Progress(1 + len(settings.detectors) + len(settings.methods) + len(trained)
                        + len(detected) + len(settings.detectors) + len(BASELINES) + 1)
    data_dir = prepare_data(settings)
    progress(f"data: {data_dir} (train {settings.data.train}, val {settings.data.val}, test {settings.data.test}, "
             f"grid {settings.data.grid})")

    checkpoints = {}
    for name in {**settings.detectors, **settings.methods}:
        checkpoints[name] = trained_checkpoint(settings, name, settings.training_overrides(name), data_dir)
        progress(f"trained {name}: {checkpoints[name]}")

    def data(module):
        return scoring_data(settings, data_dir, module)

    models = {}

    def model(name: str) -> pl.LightningModule:
        """The trained model ``name``, loaded once."""
        if name not in models:
            models[name] = load_model(checkpoints[name])
        return models[name]

    digests = {name: file_sha256(path) for name, path in checkpoints.items()}
    test_digest = file_sha256(data_dir / "test.h5")

    def inputs(*names: str, **more) -> dict:
        """What a score depends on: the checkpoints of ``names`` and the test file (by content)."""
        return {"checkpoints": {name: digests[name] for name in names}, "test_file_sha256": test_digest, **more}

    tables, landmarks = {}, {}
    for method in trained:
        tables[method.label], scores = scored(out, method.label, lambda name=method.name: model(name), data,
                                              inputs(method.name))
        if scores:  # VRN-Multitask predicts landmarks too
            landmarks[method.label] = scores
        progress(f"evaluated {method.label}")
    for method in detected:
        detector = settings.guidance[method.name]
        tables[method.label], _ = scored(out, method.label,
                                         lambda m=method.name, d=detector: DetectedGuidance(model(m), model(d)), data,
                                         inputs(method.name, detector))
        progress(f"evaluated {method.label} (detector {detector})")
    for detector in settings.detectors:
        landmarks[detector] = scored(out, detector, lambda d=detector: model(d), data, inputs(detector), volume=False)[1]
        progress(f"landmark NME of {detector}: {landmarks[detector].get('landmark_nme_balanced', float('nan')):.4f}")
    for method in detected:
        landmarks[method.label] = landmarks[settings.guidance[method.name]]

    grid = VoxelGrid.parse(settings.data.grid)
    test_file = scoring_data(settings, data_dir).datasets["test"].file
    builders = {
        FIT: lambda: FittedShapeBaseline.for_file(test_file, grid, settings.fit_regularisation,
                                                  landmarks=model(settings.fit_detector).landmarks),
        MEAN_VOLUME: lambda: MeanVolumeBaseline(grid, mean_training_volume(data_dir / "train.h5", grid)),
        ORACLE: lambda: MeanShapeBaseline.for_file(test_file, grid),
    }
    baseline_inputs = {FIT: inputs(settings.fit_detector, fit_regularisation=settings.fit_regularisation),
                       MEAN_VOLUME: inputs(train_file_sha256=file_sha256(data_dir / "train.h5")), ORACLE: inputs()}
    for method in BASELINES:
        tables[method.label], _ = scored(out, method.label, builders[method], data, baseline_inputs[method])
        progress(f"evaluated baseline {method.label}")
    landmarks[FIT.label] = landmarks[settings.fit_detector]

    rows = table_rows(tables, landmarks, settings.reference, settings.bootstrap_resamples)
    write_tables(out, rows, settings.reference, f"{settings.name}: NME on the synthetic test split "
                 f"({settings.data.test} faces, grid {settings.data.grid})")
    guided = [method.label for method in [*trained, *detected] if method.name in settings.guidance]
    write_figures(out, tables, [settings.reference, *guided], test_file.attrs.get("expression_names"),
                  settings.bootstrap_resamples)
    progress(f"report: {out / 'table.md'}, {out / 'table.csv'}, ced.png, nme_vs_yaw.png, nme_per_expression.png")
    log_wandb_runs(settings, tables, landmarks, wandb)
    return rows


def log_wandb_runs(settings: CompareSettings, tables: dict, landmarks: dict, wanted: bool | None) -> None:
    """One W&B eval run per method of ``tables`` (by label) in ``OUT/eval/SLUG/wandb``
    (:func:`experiments.evaluation.log_eval_run`: summary ``eval/nme_mean``, ..., the per-sample table, the error
    curve), when ``wanted`` or, with None, when a method's training had ``logger.wandb=true``. A trained method's
    runs (ground-truth and detected landmarks) are linked to its training run; a baseline's run is grouped by its
    own name."""
    out = Path(settings.out)
    run_dirs = {name: out / "runs" / slug(name) for name in settings.methods}
    if not any(wandb_wanted(wanted, run_dir) for run_dir in run_dirs.values()):
        return
    methods = {method.label: method for method in compared_methods(settings)}
    for label, table in tables.items():
        method = methods.get(label)
        run_dir = None if method is None else run_dirs.get(method.name)
        log_eval_run(out / "eval" / slug(label), run_dir, {"eval": (summarise(table), table, landmarks.get(label, {}))},
                     {"compare": settings.name, "method": label}, group=slug(label), name=f"{slug(label)}-eval")
