"""Evaluate a checkpoint on a test file with the paper's NME, by the same test path training uses.

``python -m experiments.evaluate --checkpoint CKPT --data TEST.h5 [--out DIR] [--train-data TRAIN.h5]
[--landmarks-model DETECTOR.ckpt]``

The model (and each baseline) runs through ``Trainer.test`` on the DataModule with the
:class:`~lightning_vrn.callbacks.NMECallback`, exactly as training's test stage does, so the same
checkpoint and file give the same numbers to the last digit (at the same batch size). Writes into
``--out`` (default: ``RUN/eval/`` for a checkpoint in ``RUN/checkpoints/``, else ``NAME_eval/`` beside
the checkpoint file):

- ``metrics.json``: one summary per method (NME mean, median, per |yaw| bucket, rigidly aligned NME,
  failures): the model, and the baselines when ``--train-data`` is given; under ``"landmarks"``, per method,
  ``landmark_source`` and the 68-point landmark NMEs of the 3DDFA protocol (``landmark_nme``,
  ``_yaw_{lo}_{hi}``, ``_balanced``, and ``landmark_nme_reannotated...`` when the file has
  ``landmarks_2d_reannotated``; :func:`landmark_sources`);
- ``{method}/test.csv`` and ``{method}/test_summary.json``: the per-sample table and its summary;
- ``ced.png``: cumulative error curves of all methods (the paper's Figure 7);
- ``reconstruction.obj`` (the median-error sample's iso-surface, vertex colours from the image) and
  ``reconstruction.png`` (input, prediction and ground truth side by side);
- with ``--log-wandb`` (default: when the checkpoint's training had ``logger.wandb=true``), a W&B run with
  ``job_type=eval`` in ``OUT/wandb``, linked to the training run (see :func:`log_eval_run`).

``--landmarks-model``: a trained ``landmark_hourglass`` checkpoint. A VRN-Guided model is then guided by
its detected landmarks (:class:`~lightning_vrn.models.guided.DetectedGuidance`, the paper's realistic
setting) instead of the ground truth's, and the detector is scored as a method of its own
(``"landmark detector"``: landmark NMEs, no volume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules import FaceVolumeDataModule
from experiments.baselines import MeanShapeBaseline, MeanVolumeBaseline, mean_training_volume
from lightning_vrn.atomic import write_text
from experiments.config import LoggerSettings, load_config
from experiments.runs import check_writable, run_dir_of
from lightning_vrn.callbacks import NMECallback
from lightning_vrn.cli import run_command
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import write_obj
from lightning_vrn.heatmaps import gaussian_heatmaps
from lightning_vrn.models import LandmarkHourglass, VRNGuided, VRNModule, load_model
from lightning_vrn.models.guided import DetectedGuidance
from lightning_vrn.models.landmark_hourglass import LandmarkScoring
from lightning_vrn.visualise import save_ced, save_comparison, shade_mesh, vertex_colours_from_image

MODEL = "model"
DETECTOR = "landmark detector"


def slug(method: str) -> str:
    """Folder name of a method's report: ``"mean shape at GT pose"`` -> ``"mean_shape_at_GT_pose"``."""
    return "_".join(method.split())


def evaluation_report(module: pl.LightningModule, datamodule: FaceVolumeDataModule, out_dir: Path | None,
                max_samples: int | None = None) -> tuple[dict | None, dict | None, dict]:
    """Run ``module`` through ``Trainer.test``; returns the NME summary, the per-sample table and the logged metrics.

    With ``out_dir`` the NME callback scores the test steps' volumes and writes ``out_dir/test.csv``
    and ``out_dir/test_summary.json``; without it (a landmark detector, which predicts no volume)
    only the module's own logged test metrics come back, and the summary and table are None.
    """
    callbacks = [] if out_dir is None else [NMECallback(out_dir=out_dir, max_test_samples=max_samples)]
    limit = 1.0 if max_samples is None else math.ceil(max_samples / datamodule.hparams.batch_size)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, callbacks=callbacks, enable_checkpointing=False,
                         enable_model_summary=False, limit_test_batches=limit)
    logged = (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0]
    if out_dir is None:
        return None, None, logged
    return callbacks[0].summaries["test"], callbacks[0].tables["test"], logged


def landmark_scores(logged: dict) -> dict[str, float | None]:
    """The landmark NMEs among a test's logged metrics, without the stage: ``{"landmark_nme": ..., ...}``
    (None for an empty |yaw| bucket, as in the NME summaries)."""
    return {key.split("/", 1)[1]: None if math.isnan(float(value)) else float(value)
            for key, value in logged.items() if "landmark_nme" in key}


def landmark_detector(path: Path, grid, trust: bool = False) -> LandmarkHourglass:
    """The trained ``landmark_hourglass`` of checkpoint ``path`` (``--landmarks-model``), on the model's ``grid``."""
    detector = load_model(path, trust=trust)
    if not isinstance(detector, LandmarkHourglass):
        raise ValueError(f"--landmarks-model {path} holds a {detector.variant!r} checkpoint, not a landmark detector: "
                         f"give a trained landmark_hourglass "
                         f"(python -m experiments.train model.name=landmark_hourglass)")
    if detector.grid != grid:
        raise ValueError(f"--landmarks-model {path} was trained on grid {detector.grid.describe()}, the model on "
                         f"{grid.describe()}: the detector must see the model's crop; train it on that grid")
    return detector


def landmark_sources(methods: dict[str, pl.LightningModule], detector_path: Path | None) -> dict[str, str | None]:
    """Where each method's 68 landmarks come from: ``"model"`` (its own heatmap heads: VRN-Multitask, the
    detector), ``"detector PATH"`` for the checkpoint's volume-only model when ``--landmarks-model`` is given
    (its 2D landmarks are the detector's, lifted onto the predicted surface for 3D: its 2D landmark NME is
    the detector's), else None (the baselines; a volume-only model without a detector)."""
    def source(name: str, module: pl.LightningModule) -> str | None:
        if isinstance(module, LandmarkScoring):
            return "model"
        return f"detector {detector_path}" if name == MODEL and detector_path is not None else None

    return {name: source(name, module) for name, module in methods.items()}


def wandb_wanted(flag: bool | None, run_dir: Path | None) -> bool:
    """``--log-wandb`` / ``--no-log-wandb`` when given, else whether the training config of ``run_dir`` had logger.wandb."""
    if flag is not None:
        return flag
    return run_dir is not None and bool(load_config(run_dir / "config.yaml").logger.wandb)


def log_eval_run(out: Path, run_dir: Path | None, results: dict[str, tuple[dict, dict, dict]], config: dict,
                 group: str, name: str | None = None) -> str:
    """Log an evaluation into a new W&B run with ``job_type=eval`` in ``out/wandb``; returns its id.

    The run is linked to the training of ``run_dir``: the same project, entity, group and tags, and the
    config field ``training_run_id`` naming its W&B run (None when it logged none, or without a run
    directory: then the default project and ``group``). ``results``: key prefix (``eval``,
    ``eval/{method}``) -> (NME summary, per-sample table, landmark NMEs; the summary and table None for a
    method without volumes, the landmark detector); logged as summary values ``{prefix}/{key}`` (NME mean,
    median, per yaw bucket, landmark NMEs, ...; the same numbers as ``metrics.json``), ``{prefix}/per_sample``
    (a ``wandb.Table``) and one cumulative error plot ``ced`` of every prefix with a table.
    Offline like training (no ``WANDB_API_KEY``, or ``WANDB_MODE=offline``); the run id is derived from
    ``out``, so evaluating into the same folder again resumes that run.
    """
    import wandb

    from experiments.wandb_project import wandb_offline, wandb_run_id
    from lightning_vrn.wandb_media import ced_plot, per_sample_table

    training = load_config(run_dir / "config.yaml") if run_dir is not None else None
    logger = training.logger if training is not None else LoggerSettings()
    training_run_id = wandb_run_id(training, run_dir) if training is not None and training.logger.wandb else None
    run_id = f"eval-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=logger.project, entity=logger.entity, id=run_id, resume="allow", dir=str(out),
                     name=name or f"{training.name if training is not None else group}-eval", job_type="eval",
                     group=(logger.group or training.model.name) if training is not None else group,
                     tags=list(logger.tags), mode="offline" if wandb_offline() else None,
                     config={**config, "training_run_id": training_run_id,
                             "training_run_dir": None if run_dir is None else str(run_dir)})
    with run:
        for prefix, (summary, table, landmarks) in results.items():
            run.summary.update({f"{prefix}/{key}": value for key, value in {**(summary or {}), **landmarks}.items()})
            if table is not None:
                run.log({f"{prefix}/per_sample": per_sample_table(table)})
        run.log({"ced": ced_plot({prefix: table for prefix, (_, table, _) in results.items() if table is not None},
                                 "NME cumulative error curve")})
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="test split HDF5 file")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--train-data", type=Path, default=None, help="training split: enables the baselines")
    parser.add_argument("--landmarks-model", type=Path, default=None, metavar="DETECTOR_CKPT",
                        help="a trained landmark_hourglass checkpoint: guide a VRN-Guided model with its landmarks "
                             "(not the ground truth's), take a volume-only model's landmarks from it, and score it")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that holds more than tensors and plain values (runs its code)")
    parser.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log into a W&B eval run linked to the training run (default: when the training "
                             "config had logger.wandb=true)")
    args = parser.parse_args(argv)

    for flag, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be a positive number of samples, got {value}")
    for flag, path in (("checkpoint", args.checkpoint), ("--landmarks-model", args.landmarks_model)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path} does not exist: train first (python -m experiments.train ...)")
    model = load_model(args.checkpoint, trust=args.trust_checkpoint)
    grid = model.grid
    detector = None if args.landmarks_model is None else landmark_detector(args.landmarks_model, grid,
                                                                            args.trust_checkpoint)
    run_dir = run_dir_of(args.checkpoint)
    out = args.out or (run_dir / "eval" if run_dir else args.checkpoint.with_name(f"{args.checkpoint.stem}_eval"))
    check_writable(out, what="--out")

    def evaluation_data(sigma: float | None) -> FaceVolumeDataModule:
        datamodule = FaceVolumeDataModule(test_path=args.data, grid=grid, batch_size=args.batch_size,
                                          num_workers=args.num_workers, heatmap_sigma=sigma,
                                          target_volume=model.target_frame or "aligned", persistent_workers=False,
                                          grid_source=f"checkpoint {args.checkpoint}")
        datamodule.check_files("test")
        return datamodule

    datamodule = evaluation_data(model.heatmap_sigma)
    guided = detector is not None and isinstance(model, VRNGuided)
    methods: dict[str, pl.LightningModule] = {MODEL: DetectedGuidance(model, detector) if guided else model}
    if args.train_data is not None:
        methods["mean training volume"] = MeanVolumeBaseline(grid, mean_training_volume(args.train_data, grid))
        methods["mean shape at GT pose"] = MeanShapeBaseline.for_file(datamodule.datasets["test"].file, grid)

    metrics, tables, landmarks = {}, {}, {}
    for name, module in methods.items():
        print(f"NME ({name})", file=sys.stderr)
        metrics[name], tables[name], logged = evaluation_report(module, datamodule, out / slug(name), args.max_samples)
        landmarks[name] = landmark_scores(logged)
    sources = landmark_sources(methods, args.landmarks_model)
    if detector is not None:
        print(f"landmark NME ({DETECTOR})", file=sys.stderr)
        sources[DETECTOR] = "model"
        landmarks[DETECTOR] = landmark_scores(evaluation_report(detector, evaluation_data(detector.heatmap_sigma), None,
                                                          args.max_samples)[2])
        if sources[MODEL] != "model":  # a volume-only model's 2D landmarks are the detector's
            landmarks[MODEL] = landmarks[DETECTOR]
    metrics["landmarks"] = {name: {"landmark_source": sources[name], **landmarks[name]} for name in sources}
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.data), grid=grid.describe(),
                   landmarks_model=None if args.landmarks_model is None else str(args.landmarks_model))
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_ced(out / "ced.png", {name: table["nme"][~table["failed"]] for name, table in tables.items()})
    _write_reconstruction(out, methods[MODEL], args.data, tables[MODEL])
    if wandb_wanted(args.log_wandb, run_dir):
        results = {("eval" if name == MODEL else f"eval/{slug(name)}"):
                   (metrics.get(name), tables.get(name), landmarks[name]) for name in sources}
        log_eval_run(out, run_dir, results, {"checkpoint": str(args.checkpoint), "data": str(args.data),
                                             "grid": grid.describe(), "landmark_sources": sources},
                     group=model.variant)

    print(json.dumps(metrics, indent=2))
    print(f"metrics:        {out / 'metrics.json'}")
    print(f"per sample:     {out / MODEL / 'test.csv'}")
    print(f"error curve:    {out / 'ced.png'}")
    print(f"mesh:           {out / 'reconstruction.obj'}")
    print(f"picture:        {out / 'reconstruction.png'}")
    return 0


def _write_reconstruction(out: Path, model: VRNModule | DetectedGuidance, data: Path, table: dict) -> None:
    """The median-error sample: coloured .obj of the prediction and a side-by-side PNG (a guided model without a
    detector is guided by the sample's ground-truth landmarks)."""
    grid = model.grid
    ok = np.flatnonzero(~table["failed"])
    row = int(ok[np.argsort(table["nme"][ok])[len(ok) // 2]]) if len(ok) else 0
    index, nme = int(table["index"][row]), float(table["nme"][row])
    test_file = open_dataset(data, grid, grid_source="the checkpoint")
    scan = test_file.per_sample_topology  # scans: each sample has its own triangles
    sample = test_file.read(index, ["images", "vertices", "landmarks_2d"] + (["triangles"] if scan else []))
    image = sample["images"]
    batch = {"image": torch.from_numpy(image[None]).permute(0, 3, 1, 2).float().div(255.0)}
    if isinstance(model, VRNGuided):
        batch["heatmaps"] = gaussian_heatmaps(torch.from_numpy(sample["landmarks_2d"][None]), grid.height, grid.width,
                                              model.heatmap_sigma)
    with torch.no_grad():
        volume = model.predict_step(batch)[0].numpy()
    vertices, triangles = volume_to_mesh(volume, grid)
    write_obj(out / "reconstruction.obj", vertices, triangles, vertex_colours_from_image(vertices, image))
    panels = {
        "prediction": shade_mesh(vertices, triangles, grid.crop_size),
        "ground truth": shade_mesh(sample["vertices"], sample["triangles"] if scan else test_file.triangles,
                                   grid.crop_size),
    }
    save_comparison(out / "reconstruction.png", image, panels, title=f"sample {index}: NME {nme:.4f}")


if __name__ == "__main__":
    sys.exit(run_command(main))
