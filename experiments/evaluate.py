"""Evaluate a checkpoint on a test file with the paper's NME, by the same test path training uses.

``python -m experiments.evaluate --checkpoint CKPT --data TEST.h5 [--real-data REAL.h5] [--out DIR]
[--train-data TRAIN.h5] [--landmarks-model DETECTOR.ckpt] [--nme-workers N] [--icp-subsample K]``

The model (and each baseline) runs through ``Trainer.test`` on the DataModule with the
:class:`~lightning_vrn.callbacks.NMECallback`, exactly as training's test stage does, so the same
checkpoint and file give the same numbers to the last digit (at the same batch size and ``--icp-subsample``;
``--nme-workers``, the processes that score the samples, changes no number: one pool serves every method and
file, one per core by default). Writes into
``--out`` (default: ``RUN/eval/`` for a checkpoint in ``RUN/checkpoints/``, else ``NAME_eval/`` beside
the checkpoint file):

- ``metrics.json``: one summary per method (NME mean, median, per |yaw| bucket, rigidly aligned NME,
  failures): the model, and the baselines when ``--train-data`` is given; under ``"landmarks"``, per method,
  ``landmark_source`` and the 68-point landmark NMEs of the 3DDFA protocol (``landmark_nme``,
  ``_yaw_{lo}_{hi}``, ``_balanced``, and ``landmark_nme_reannotated...`` when the file has
  ``landmarks_2d_reannotated``; :func:`landmark_sources`); ``data`` and ``ground_truth``, the test file and
  what its meshes are (:func:`~experiments.evaluation.ground_truth`: a converted file's ``ground_truth``
  attribute, such as the BFM's mean face at the fitted pose);
- ``{method}/test.csv`` and ``{method}/test_summary.json``: the per-sample table and its summary;
- ``ced.png``: cumulative error curves of all methods (the paper's Figure 7);
- ``reconstruction.obj`` (the median-error sample's iso-surface, vertex colours from the image) and
  ``reconstruction.png`` (input, prediction and ground truth side by side);
- with ``--log-wandb`` (default: when the checkpoint's training had ``logger.wandb=true``), a W&B run with
  ``job_type=eval`` in ``OUT/wandb``, linked to the training run (see :func:`log_eval_run`).

``--real-data``: a second test file, real photos converted by ``python -m data_prep.aflw2000`` at the checkpoint's
grid. Every method (model, baselines, detector) is scored on it by the same :func:`score_file` as on ``--data``:
its part of ``metrics.json`` (the same structure) is ``"real"``, its reports, ``ced.png`` and reconstruction are
in ``OUT/real/``, and its W&B values are ``eval_real/...``. Both files are checked before either is scored.

``--landmarks-model``: a trained ``landmark_hourglass`` checkpoint. A VRN-Guided model is then guided by
its detected landmarks (:class:`~lightning_vrn.models.guided.DetectedGuidance`, the paper's realistic
setting) instead of the ground truth's, and the detector is scored as a method of its own
(``"landmark detector"``: landmark NMEs, no volume).

A ``landmark_hourglass`` checkpoint itself is scored by its landmark NMEs alone: ``metrics.json`` holds them
under ``"landmarks"``, and there is no volume, error curve or reconstruction to write.
"""

from __future__ import annotations

if __name__ == "__main__":  # the NME workers' forkserver imports this program (~5 s) while this process does
    from lightning_vrn.metrics.pool import start_forkserver  # (and idles if one worker, this process, scores)

    start_forkserver()

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from experiments.baselines import MeanShapeBaseline, MeanVolumeBaseline, mean_training_volume
from experiments.evaluation import (
    EVAL_BATCH_SIZE,
    DETECTOR,
    MODEL,
    Evaluation,
    evaluation_data,
    evaluation_report,
    ground_truth,
    landmark_detector,
    landmark_sources,
    log_eval_run,
    slug,
    wandb_wanted,
    write_reconstruction,
)
from experiments.runs import check_writable, run_dir_of
from lightning_vrn.atomic import write_text
from lightning_vrn.callbacks import NMESettings
from lightning_vrn.cli import run_command
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.metrics.pool import NMEPool
from lightning_vrn.models import LandmarkHourglass, VRNGuided, load_model
from lightning_vrn.models.guided import DetectedGuidance
from lightning_vrn.visualise import save_ced


REAL = "real"
"""The part of ``metrics.json`` and the folder under ``--out`` that hold the ``--real-data`` results."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="test split HDF5 file")
    parser.add_argument("--real-data", type=Path, default=None, metavar="REAL.h5",
                        help="a second test file of real photos (python -m data_prep.aflw2000): every method is scored "
                             "on it too, into OUT/real/ and metrics.json's \"real\" part")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--train-data", type=Path, default=None, help="training split: enables the baselines")
    parser.add_argument("--landmarks-model", type=Path, default=None, metavar="DETECTOR_CKPT",
                        help="a trained landmark_hourglass checkpoint: guide a VRN-Guided model with its landmarks "
                             "(not the ground truth's), take a volume-only model's landmarks from it, and score it")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--nme-workers", type=int, default=None, metavar="N",
                        help="processes that score the NME (default: one per core this process may use; 1: in this "
                             "process); the numbers do not depend on it")
    parser.add_argument("--icp-subsample", type=int, default=NMESettings.icp_subsample, metavar="K",
                        help=f"ICP fits every K-th ground-truth vertex (default {NMESettings.icp_subsample}: all); "
                             f"K > 1 is faster but moves per-sample NMEs (docs/evaluation.md, 'Speed')")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that holds more than tensors and plain values (runs its code)")
    parser.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log into a W&B eval run linked to the training run (default: when the training "
                             "config had logger.wandb=true)")
    args = parser.parse_args(argv)

    for flag, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be a positive number of samples, got {value}")
    if args.nme_workers is not None and args.nme_workers < 0:
        parser.error(f"--nme-workers must be >= 0 (0: one per core this process may use), got {args.nme_workers}")
    if args.icp_subsample < 1:
        parser.error(f"--icp-subsample must be >= 1 (1: every ground-truth vertex), got {args.icp_subsample}")
    for flag, path in (("checkpoint", args.checkpoint), ("--landmarks-model", args.landmarks_model)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path} does not exist: train first (python -m experiments.train ...)")
    model = load_model(args.checkpoint, trust=args.trust_checkpoint)
    if model.target_frame is None and (args.landmarks_model is not None or args.train_data is not None):
        parser.error(f"{args.checkpoint} is a {model.variant}, which predicts landmarks, not a volume: it is scored "
                     f"by its landmark NME alone; --landmarks-model and --train-data go with a volume model")
    grid = model.grid
    detector = None if args.landmarks_model is None else landmark_detector(args.landmarks_model, grid,
                                                                            args.trust_checkpoint)
    run_dir = run_dir_of(args.checkpoint)
    out = args.out or (run_dir / "eval" if run_dir else args.checkpoint.with_name(f"{args.checkpoint.stem}_eval"))
    check_writable(out, what="--out")
    folders = {out: args.data, **({out / REAL: args.real_data} if args.real_data is not None else {})}
    for path in folders.values():  # every test file is checked before any is scored
        open_dataset(path, expected_grid=grid, grid_source=f"checkpoint {args.checkpoint}")
    mean_volume = None if args.train_data is None else mean_training_volume(args.train_data, grid)

    parts, results = {}, {}
    with NMEPool(args.nme_workers if model.target_frame is not None else 1) as pool:  # landmarks alone: no NME
        for folder, data in folders.items():
            parts[folder], evaluations = score_file(data, folder, model, detector, mean_volume, args, pool)
            prefix = "eval" if folder == out else f"eval_{REAL}"
            results.update({(prefix if name == MODEL else f"{prefix}/{slug(name)}"): evaluation
                            for name, evaluation in evaluations.items()})
    metrics = {**parts[out], "checkpoint": str(args.checkpoint), "grid": grid.describe(),
               "landmarks_model": None if args.landmarks_model is None else str(args.landmarks_model)}
    if args.real_data is not None:
        metrics[REAL] = parts[out / REAL]
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if wandb_wanted(args.log_wandb, run_dir):
        sources = {name: entry["landmark_source"] for name, entry in metrics["landmarks"].items()}
        log_eval_run(out, run_dir, results,
                     {"checkpoint": str(args.checkpoint), "data": str(args.data), "grid": grid.describe(),
                      "landmark_sources": sources,
                      "real_data": None if args.real_data is None else str(args.real_data)}, group=model.variant)

    print(json.dumps(metrics, indent=2))
    print(f"metrics:        {out / 'metrics.json'}")
    for folder, part in parts.items():
        print(f"test file:      {part['data']} (ground truth: {part['ground_truth']})")
        if model.target_frame is not None:
            print(f"per sample:     {folder / MODEL / 'test.csv'}")
            print(f"error curve:    {folder / 'ced.png'}")
            print(f"mesh, picture:  {folder / 'reconstruction.obj'}, {folder / 'reconstruction.png'}")
    return 0


def score_file(data: Path, out: Path, model: pl.LightningModule, detector: LandmarkHourglass | None,
               mean_volume: np.ndarray | None, args, pool: NMEPool) -> tuple[dict, dict[str, Evaluation]]:
    """Every method on test file ``data``, reported under ``out``; returns the file's part of metrics.json (per
    method with volumes its NME summary; ``landmarks``: per method its ``landmark_source`` and landmark NMEs;
    ``data``; ``ground_truth``) and each method's :class:`Evaluation`. ``mean_volume`` (D, H, W): the mean
    training volume when ``--train-data`` is given; ``pool``: the NME worker pool every method is scored in. A
    volume model's file also gets ``ced.png`` and the median-error reconstruction; a landmark detector checkpoint
    is scored by its landmark NMEs alone."""
    def split_for(heatmap_sigma: float | None):
        """The test split with ``heatmap_sigma`` maps (the model's or the detector's), volumes in the model's frame."""
        return evaluation_data(data, model.grid, args.batch_size, heatmap_sigma, model.target_frame, args.num_workers,
                               grid_source=f"checkpoint {args.checkpoint}")

    datamodule, volume = split_for(model.heatmap_sigma), model.target_frame is not None
    guided = detector is not None and isinstance(model, VRNGuided)
    methods: dict[str, pl.LightningModule] = {MODEL: DetectedGuidance(model, detector) if guided else model}
    if mean_volume is not None:
        methods["mean training volume"] = MeanVolumeBaseline(model.grid, mean_volume)
        methods["mean shape at GT pose"] = MeanShapeBaseline.for_file(datamodule.datasets["test"].file, model.grid)
    evaluations = {}
    for name, module in methods.items():
        print(f"{'NME' if volume else 'landmark NME'} ({name}) on {data}", file=sys.stderr)
        evaluations[name] = evaluation_report(module, datamodule, out / slug(name) if volume else None,
                                              args.max_samples, NMESettings(icp_subsample=args.icp_subsample), pool)
    sources = landmark_sources(methods, args.landmarks_model)
    landmarks = {name: evaluation.landmarks for name, evaluation in evaluations.items()}
    if detector is not None:
        print(f"landmark NME ({DETECTOR}) on {data}", file=sys.stderr)
        evaluations[DETECTOR] = evaluation_report(detector, split_for(detector.heatmap_sigma), None, args.max_samples)
        sources[DETECTOR], landmarks[DETECTOR] = "model", evaluations[DETECTOR].landmarks
        if sources[MODEL] != "model":  # a volume-only model's 2D landmarks are the detector's
            landmarks[MODEL] = landmarks[DETECTOR]
    part = {name: evaluation.summary for name, evaluation in evaluations.items() if evaluation.summary is not None}
    part.update(landmarks={name: {"landmark_source": sources[name], **landmarks[name]} for name in sources},
                data=str(data), ground_truth=ground_truth(data))
    if volume:
        save_ced(out / "ced.png", {name: e.table["nme"][~e.table["failed"]] for name, e in evaluations.items()
                                   if e.table is not None})
        write_reconstruction(out, methods[MODEL], data, evaluations[MODEL].table)
    return part, {name: replace(evaluation, landmarks=landmarks[name]) for name, evaluation in evaluations.items()}


if __name__ == "__main__":
    sys.exit(run_command(main))
