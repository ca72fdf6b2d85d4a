"""The comparison of ``--config``: the data (:func:`prepare_data`, and the real photos: :func:`real_photos_file`),
the trainings (:func:`trained_checkpoint`), every method's test pass on each test file (:func:`score_methods`,
:func:`scored`, through :mod:`experiments.evaluation`, the path ``experiments.evaluate`` takes), the report
(:func:`run_compare`) and the methods' W&B eval runs (:func:`log_wandb_runs`). Everything is resumable: a finished
stage's files are reused."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
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
from experiments.compare.stats import contrast_rows, seed_mean_table, table_rows
from experiments.config import CONFIG_DIR, load_config
from experiments.evaluation import (
    Evaluation,
    evaluation_data,
    evaluation_report,
    ground_truth,
    log_eval_run,
    slug,
    wandb_wanted,
)
from lightning_vrn.atomic import file_sha256, write_text
from lightning_vrn.dataset_file import open_dataset
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


def trained_checkpoint(settings: CompareSettings, name: str, overrides: list[str], data_dir: Path,
                       training: int = 0) -> Path:
    """The best checkpoint of training number ``training`` (0-based) of ``name``, with seed ``seed + training``
    (``seed`` the training config's): trained, resumed, or reused when it finished before, through
    ``experiments.train``, which refuses a finished or interrupted run trained with other learning settings (a
    changed preset, say) instead of reusing it."""
    run_dir = Path(settings.out) / "runs" / (slug(name) + training_suffix(training))
    composed = [f"data.dir={data_dir}", f"grid={settings.data.grid}", f"run_dir={run_dir}",
                f"name={slug(name) + training_suffix(training)}", *settings.overrides, *overrides]
    cfg = load_config(CONFIG_DIR / settings.train_config, composed)
    if training:
        cfg = load_config(CONFIG_DIR / settings.train_config, [*composed, f"seed={cfg.seed + training}"])
    metrics = train.train(cfg, command=f"python -m experiments.compare ({settings.name}: {name}"
                                       f"{'' if not training else f', training {training + 1}'})")
    return Path(metrics.get("best_checkpoint") or run_dir / "checkpoints" / "last.ckpt")


def training_suffix(training: int) -> str:
    """What the run and evaluation folders of training number ``training`` (0-based) add to their name: nothing
    for the first (the folders a one-training comparison has), ``-seed1``, ``-seed2``, ... after it."""
    return f"-seed{training}" if training else ""


def real_photos_file(settings: CompareSettings) -> tuple[Path | None, str]:
    """The real photos of ``settings.real_photos`` converted by data_prep.aflw2000 into ``DATA_DIR/real.h5`` at the
    data's grid (the mean face at the fitted pose unless the BFM has bases; a finished file of the same photos and
    BFM is reused), with a line saying how many and which ground truth; ``(None, why)`` when they are skipped."""
    from data_prep.aflw2000 import aflw2000_conversion
    from data_prep.mat_faces import convert, has_bases

    real = settings.real_photos
    if real.root is None:
        return None, "Real photos: none (real_photos.root is not set)"
    if not Path(real.root).is_dir():
        return None, (f"Real photos skipped: real_photos.root {real.root} does not exist (relative to {Path.cwd()}), "
                      f"so the table has no real-photo columns")
    conversion = aflw2000_conversion(Path(real.root), Path(real.bfm), VoxelGrid.parse(settings.data.grid),
                                     mean_only=not has_bases(f"bfm:{real.bfm}"))
    path, _ = convert(conversion, Path(settings.data.dir) / "real.h5", workers=settings.data.workers,
                      desc="real photos")
    return path, f"Real photos: {len(open_dataset(path))} AFLW2000-3D photos of {real.root}; ground truth: " \
                 f"{ground_truth(path)}"


def scoring_data(settings: CompareSettings, test_path: Path, module: pl.LightningModule | None = None):
    """The test file ``test_path`` as ``module`` needs it (its heatmaps and target frame; None: neither), opened and
    checked."""
    return evaluation_data(test_path, VoxelGrid.parse(settings.data.grid), settings.batch_size,
                           getattr(module, "heatmap_sigma", None), getattr(module, "target_frame", None))


def scored(folder: Path, label: str, build: Callable[[], pl.LightningModule], data: Callable, inputs: dict,
           volume: bool = True) -> Evaluation:
    """The :class:`Evaluation` of the method labelled ``label`` from one test pass (no NME summary and table with
    ``volume=False``: a landmark detector), reported in ``folder/SLUG``: ``test.csv``, ``landmarks.json`` and, for
    a method with landmarks, ``landmarks_per_sample.json``. The report is reused when ``scored.json`` there records
    the same ``inputs`` (what was scored: the checkpoints' and files' SHA-256, the method); otherwise the method is
    scored again."""
    folder = folder / slug(label)
    landmarks_file, per_sample_file, record = (folder / name for name in
                                               ("landmarks.json", "landmarks_per_sample.json", "scored.json"))
    inputs = {"label": label, **inputs}
    same_inputs = record.is_file() and json.loads(record.read_text()) == inputs
    landmarks = json.loads(landmarks_file.read_text()) if landmarks_file.is_file() else None
    complete = landmarks is not None and (not landmarks or per_sample_file.is_file())  # NMEs with their samples
    if not (same_inputs and complete):
        module = build()
        evaluation = evaluation_report(module, data(module), folder if volume else None)
        if evaluation.landmark_table is not None:
            write_text(per_sample_file, json.dumps({key: values.tolist() for key, values in
                                                    evaluation.landmark_table.items()}) + "\n")
        write_text(landmarks_file, json.dumps(evaluation.landmarks, indent=2) + "\n")
        write_text(record, json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        landmarks = evaluation.landmarks
    table = read_per_sample_csv(folder / "test.csv") if volume else None
    landmark_table = ({key: np.asarray(values) for key, values in json.loads(per_sample_file.read_text()).items()}
                      if landmarks else None)
    return Evaluation(None if table is None else summarise(table), table, landmarks, landmark_table)


def nme_tables(evaluations: dict[str, Evaluation]) -> dict[str, dict]:
    """The per-sample NME tables of the methods with volumes among ``evaluations`` (the rows of the table)."""
    return {label: evaluation.table for label, evaluation in evaluations.items() if evaluation.table is not None}


class TrainedModels:
    """The comparison's trained checkpoints by name: their SHA-256 (``digests``) and each model, loaded once
    (``models(name)``)."""

    def __init__(self, checkpoints: dict[str, Path]):
        self.checkpoints = checkpoints
        self.digests = {name: file_sha256(path) for name, path in checkpoints.items()}
        self.loaded: dict[str, pl.LightningModule] = {}

    def __call__(self, name: str) -> pl.LightningModule:
        if name not in self.loaded:
            self.loaded[name] = load_model(self.checkpoints[name])
        return self.loaded[name]


def score_methods(settings: CompareSettings, models: TrainedModels, test_path: Path, folder: Path,
                  progress: Progress, where: str = "", first_training: dict[str, Evaluation] | None = None
                  ) -> dict[str, Evaluation]:
    """Every method, guided method with detected landmarks, detector and baseline scored on the test file
    ``test_path``, by label, reported in ``folder`` (:func:`scored`: reused when what it scored is unchanged); a
    guided method with detected landmarks and the 3DMM fit carry their detector's landmark NMEs. ``where`` ends the
    progress lines (``" on real photos"``). The baselines built from a face model (the 3DMM fit, the oracle) use the
    one the file records. ``first_training``: the first training's evaluations of every model on the same file,
    whose baselines that no training changes (the mean training volume, the oracle) are taken as they are."""
    trained, detected = trained_methods(settings), detected_methods(settings)
    data_dir, grid = Path(settings.data.dir), VoxelGrid.parse(settings.data.grid)
    test_digest = file_sha256(test_path)

    def data(module):
        return scoring_data(settings, test_path, module)

    def inputs(*names: str, **more) -> dict:
        """What a score depends on: the checkpoints of ``names`` and the test file (by content)."""
        return {"checkpoints": {name: models.digests[name] for name in names}, "test_file_sha256": test_digest, **more}

    evaluations = {}
    for method in trained:
        evaluations[method.label] = scored(folder, method.label, lambda name=method.name: models(name), data,
                                           inputs(method.name))
        progress(f"evaluated {method.label}{where}")
    for method in detected:
        detector = settings.guidance[method.name]
        evaluations[method.label] = scored(folder, method.label,
                                           lambda m=method.name, d=detector: DetectedGuidance(models(m), models(d)),
                                           data, inputs(method.name, detector))
        progress(f"evaluated {method.label} (detector {detector}){where}")
    for detector in settings.detectors:
        evaluations[detector] = scored(folder, detector, lambda d=detector: models(d), data, inputs(detector),
                                       volume=False)
        balanced = evaluations[detector].landmarks.get("landmark_nme_balanced", float("nan"))
        progress(f"landmark NME of {detector}{where}: {balanced:.4f}")

    test_file = scoring_data(settings, test_path).datasets["test"].file
    builders = {
        FIT: lambda: FittedShapeBaseline.for_file(test_file, grid, settings.fit_regularisation,
                                                  landmarks=models(settings.fit_detector).landmarks),
        MEAN_VOLUME: lambda: MeanVolumeBaseline(grid, mean_training_volume(data_dir / "train.h5", grid)),
        ORACLE: lambda: MeanShapeBaseline.for_file(test_file, grid),
    }
    baseline_inputs = {FIT: inputs(settings.fit_detector, fit_regularisation=settings.fit_regularisation),
                       MEAN_VOLUME: inputs(train_file_sha256=file_sha256(data_dir / "train.h5")), ORACLE: inputs()}
    for method in BASELINES:
        if first_training is not None and method in (MEAN_VOLUME, ORACLE):
            evaluations[method.label] = first_training[method.label]
            progress(f"baseline {method.label}{where}: the same for every training")
            continue
        evaluations[method.label] = scored(folder, method.label, builders[method], data, baseline_inputs[method])
        progress(f"evaluated baseline {method.label}{where}")
    landmarks_of = {**{method.label: settings.guidance[method.name] for method in detected},
                    FIT.label: settings.fit_detector}
    for label, detector in landmarks_of.items():  # their 2D landmarks are the detector's
        evaluations[label] = replace(evaluations[label], landmarks=evaluations[detector].landmarks,
                                     landmark_table=evaluations[detector].landmark_table)
    return evaluations


def run_compare(settings: CompareSettings, wandb: bool | None = None) -> dict:
    """Every stage; returns ``{method: row of the table}`` (with ``real``, its row on the real photos, when they
    are scored). Every detector and method is trained ``settings.seeds`` times (seeds ``seed``, ``seed + 1``, ...;
    the first training's folders are those of a one-training comparison) and each training scored; the intervals
    resample the trainings and the faces (:func:`~experiments.compare.stats.table_rows`). ``wandb``: log the first
    training's evaluation of each method to W&B (:func:`log_wandb_runs`; None: when the trainings had
    ``logger.wandb=true``)."""
    out = Path(settings.out)
    trained, detected = trained_methods(settings), detected_methods(settings)
    trainings = range(settings.seeds)
    per_file = len(trained) + len(detected) + len(settings.detectors) + len(BASELINES)
    progress = Progress(2 + settings.seeds * (len(settings.detectors) + len(settings.methods) + per_file) + 1)
    data_dir = prepare_data(settings)
    progress(f"data: {data_dir} (train {settings.data.train}, val {settings.data.val}, test {settings.data.test}, "
             f"grid {settings.data.grid})")
    real_path, real_note = real_photos_file(settings)
    progress.total += 0 if real_path is None else settings.seeds * per_file
    progress(real_note)

    checkpoints = [{} for _ in trainings]
    for training in trainings:
        for name in {**settings.detectors, **settings.methods}:
            checkpoints[training][name] = trained_checkpoint(settings, name, settings.training_overrides(name),
                                                             data_dir, training)
            progress(f"trained {name}{_of_trainings(training, settings.seeds)}: {checkpoints[training][name]}")
    files = {"eval": [], **({} if real_path is None else {"eval_real": []})}
    for training in trainings:
        models, suffix = TrainedModels(checkpoints[training]), training_suffix(training)
        for key, path, folder, where in (("eval", data_dir / "test.h5", out / f"eval{suffix}", ""),
                                         ("eval_real", real_path, out / f"eval-real{suffix}", " on real photos")):
            if key in files:
                files[key].append(score_methods(settings, models, path, folder, progress,
                                                where + _of_trainings(training, settings.seeds),
                                                first_training=files[key][0] if training else None))

    rows, contrasts = file_rows(settings, files["eval"]), file_contrasts(settings, files["eval"])
    title = f"{settings.name}: NME on the synthetic test split ({settings.data.test} faces, grid {settings.data.grid})"
    notes = [_trainings_note(settings.seeds)] + ([] if settings.real_photos.root is None else [real_note])
    if real_path is not None:
        for name, row in file_rows(settings, files["eval_real"]).items():
            rows[name]["real"] = row
        for name, contrast in file_contrasts(settings, files["eval_real"]).items():
            contrasts[name]["real"] = contrast
        title += f" and on {len(open_dataset(real_path))} real photos"
        notes[-1] = (f"{real_note}. The real columns score every method on them as on the synthetic faces; the 3DMM "
                     f"fit and the oracle use their file's face model. Real landmark NME: the balanced 68-point NME, "
                     f"its interval also resampling the photos within each |yaw| bucket.")
    write_tables(out, rows, settings.reference, title, notes, contrasts)
    guided = [method.label for method in [*trained, *detected] if method.name in settings.guidance]
    write_figures(out, mean_nme_tables(files["eval"]), [settings.reference, *guided],
                  open_dataset(data_dir / "test.h5").attrs.get("expression_names"), settings.bootstrap_resamples)
    progress(f"report: {out / 'table.md'}, {out / 'table.csv'}, {'contrasts.csv, ' if contrasts else ''}ced.png, "
             f"nme_vs_yaw.png, nme_per_expression.png")
    log_wandb_runs(settings, {key: evaluations[0] for key, evaluations in files.items()}, wandb)
    return rows


def _of_trainings(training: int, trainings: int) -> str:
    """``" (training 2 of 3)"``; nothing when there is one training."""
    return "" if trainings == 1 else f" (training {training + 1} of {trainings})"


def _trainings_note(trainings: int) -> str:
    """The table's note on what its intervals cover."""
    if trainings == 1:
        return ("One training per method: the intervals cover the test faces only, not the spread between "
                "trainings, which can be as large as the differences judged; a verdict may flip on a rerun (seeds: 3 "
                "covers both).")
    return (f"{trainings} trainings per method (seeds): each cell is their mean, the runs column the range of their "
            f"own means, and every interval and difference a two-level bootstrap over trainings and faces "
            f"(lightning_vrn.metrics.bootstrap.seeds_and_faces_mean); a verdict is printed from it alone.")


def file_rows(settings: CompareSettings, trainings: list[dict[str, Evaluation]]) -> dict:
    """The table's rows of one test file's evaluations, one dict of them per training
    (:func:`~experiments.compare.stats.table_rows`)."""
    landmarks = {}
    for label in trainings[0]:
        scores = [e[label].landmarks.get("landmark_nme_balanced") for e in trainings if e[label].landmarks]
        if scores and None not in scores:
            landmarks[label] = float(np.mean(scores))
    landmark_tables = {label: [e[label].landmark_table for e in trainings] for label in trainings[0]
                       if trainings[0][label].landmark_table is not None}
    return table_rows(tables_by_method(trainings), landmarks, settings.reference, settings.bootstrap_resamples,
                      landmark_tables)


def file_contrasts(settings: CompareSettings, trainings: list[dict[str, Evaluation]]) -> dict:
    """The config's contrasts on one test file's evaluations, one dict of them per training
    (:func:`~experiments.compare.stats.contrast_rows`)."""
    return contrast_rows(tables_by_method(trainings), settings.contrasts, settings.bootstrap_resamples)


def tables_by_method(trainings: list[dict[str, Evaluation]]) -> dict[str, list[dict]]:
    """Each method with volumes (by label) -> its per-sample NME tables, one per training of ``trainings``."""
    return {label: [e[label].table for e in trainings] for label, evaluation in trainings[0].items()
            if evaluation.table is not None}


def mean_nme_tables(trainings: list[dict[str, Evaluation]]) -> dict[str, dict]:
    """Each method's per-sample NME table averaged per face over its trainings (:func:`seed_mean_table`), for the
    figures."""
    return {label: seed_mean_table(tables) for label, tables in tables_by_method(trainings).items()}


def log_wandb_runs(settings: CompareSettings, files: dict[str, dict[str, Evaluation]], wanted: bool | None) -> None:
    """One W&B eval run per method with volumes (by label) in ``OUT/eval/SLUG/wandb``
    (:func:`experiments.evaluation.log_eval_run`), with its evaluation on each test file of ``files`` under its key
    (``eval``: the synthetic test split, ``eval_real``: the real photos; summary ``eval/nme_mean``, ..., the
    per-sample table, the error curves), when ``wanted`` or, with None, when a method's training had
    ``logger.wandb=true``. A trained method's runs (ground-truth and detected landmarks) are linked to its training
    run; a baseline's run is grouped by its own name."""
    out = Path(settings.out)
    run_dirs = {name: out / "runs" / slug(name) for name in settings.methods}
    if not any(wandb_wanted(wanted, run_dir) for run_dir in run_dirs.values()):
        return
    methods = {method.label: method for method in compared_methods(settings)}
    for label in nme_tables(files["eval"]):
        method = methods.get(label)
        run_dir = None if method is None else run_dirs.get(method.name)
        log_eval_run(out / "eval" / slug(label), run_dir,
                     {prefix: evaluations[label] for prefix, evaluations in files.items()},
                     {"compare": settings.name, "method": label}, group=slug(label), name=f"{slug(label)}-eval")
